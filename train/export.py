"""Export a training checkpoint (any backend, any world size) to one directory other tools read.

stripes format (the default; every stripe pattern):

    OUT/model.safetensors   every parameter of the bare StripedLM under its stripes name,
                            full (unsharded) tensors, dtype as trained
    OUT/model.yaml          the model config (`model:` ...), loadable by `stripes inspect`
    OUT/tokenizer.model     the training data's sentencepiece model, when it can be found

`load_exported(OUT)` rebuilds the model from the first two; `stripes generate OUT` also finds
the tokenizer there. The Hugging Face format (train/export_hf.py) is for models that are
Llama networks: attention and SwiGLU in every layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from stripes.arch.config import ArchFile, ModelConfig
from stripes.arch.model import StripedLM
from stripes.core.config import ConfigError, load_config, to_typed
from stripes.data.format import write_atomic
from stripes.train.checkpoint import load_weights, resolve_checkpoint, saved_record

WEIGHTS, MODEL_YAML, TOKENIZER = "model.safetensors", "model.yaml", "tokenizer.model"
FORMATS = ("stripes", "hf")


def read_trained(path: str | Path, key: str = "checkpoint") -> tuple[Path, dict[str, Any]]:
    """(the checkpoint directory, its saved training config) from a checkpoint or run
    directory, nothing loaded; the config must hold `model`."""
    checkpoint = resolve_checkpoint(path, key)
    config = yaml.safe_load((checkpoint / "config.yaml").read_text())
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ConfigError(key, str(checkpoint), "a checkpoint whose config.yaml has `model`")
    return checkpoint, config


def load_trained(path: str | Path, key: str = "checkpoint"
                 ) -> tuple[StripedLM, dict[str, Any], Path]:
    """(model on CPU with the checkpoint's weights, the saved training config, the checkpoint
    directory) from a checkpoint or run directory."""
    checkpoint, config = read_trained(path, key)
    with torch.device("meta"):
        model = StripedLM(to_typed(ModelConfig, config["model"], prefix="model"))
    model.to_empty(device="cpu")
    load_weights(checkpoint, model, key)
    return model, config, checkpoint


def load_model(path: str | Path, key: str = "model"
               ) -> tuple[StripedLM, dict[str, Any], Path | None]:
    """(model on CPU, its run's training config or {} for an export, its tokenizer or None)
    from an export, checkpoint or run directory: what generate and eval take."""
    path = Path(path)
    if (path / MODEL_YAML).is_file():
        tokenizer = path / TOKENIZER
        return load_exported(path), {}, tokenizer if tokenizer.is_file() else None
    model, config, _ = load_trained(path, key)
    return model, config, training_tokenizer(config)


def training_tokenizer(config: dict[str, Any]) -> Path | None:
    """The sentencepiece model of a run's first data source, if it is still there."""
    sources = (config.get("data") or {}).get("sources") or []
    found = Path(sources[0]["path"]) / TOKENIZER if sources else None
    return found if found is not None and found.is_file() else None


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path,
                      fmt: str = "stripes") -> Path:
    """Write `checkpoint` (or a run's latest) to OUT in format `fmt`; returns OUT."""
    if fmt not in FORMATS:
        raise ConfigError("--format", fmt, ", ".join(FORMATS))
    # An export of the other format left in OUT would be read instead of this one.
    other = Path(out_dir) / ("config.json" if fmt == "stripes" else MODEL_YAML)
    if other.exists():
        raise ConfigError("out", str(out_dir), f"a new directory or an earlier {fmt} export",
                          f"it holds {other.name} of the other format")
    model, config, found = load_trained(checkpoint)
    metadata = {"step": str(saved_record(found)["step"]), "source": str(found)}
    if fmt == "hf":
        from stripes.train.export_hf import llama_config, write_llama
        # refuses a model Llama cannot express, before anything is written
        llama = llama_config(model.cfg, model.embed.weight.dtype)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "hf":
        write_llama(model, llama, out_dir, training_tokenizer(config), metadata)
        return out_dir
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    save_safetensors(tensors, out_dir / WEIGHTS, {"format": "stripes", **metadata})
    write_atomic(out_dir / MODEL_YAML, yaml.safe_dump({"model": config["model"]},
                                                      sort_keys=False).encode())
    copy_tokenizer(training_tokenizer(config), out_dir)
    return out_dir


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path,
                     metadata: dict[str, str]) -> Path:
    """Write through a temporary name: never a half-written weights file under the real one."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def copy_tokenizer(tokenizer: Path | None, out_dir: Path) -> list[Path]:
    if tokenizer is None:
        return []
    write_atomic(out_dir / TOKENIZER, tokenizer.read_bytes())
    return [out_dir / TOKENIZER]


def load_exported(out_dir: str | Path, device: str | torch.device = "cpu") -> StripedLM:
    """The StripedLM an export holds, on `device`, weights loaded strictly."""
    out_dir = Path(out_dir)
    cfg = load_config(ArchFile, out_dir / MODEL_YAML).model
    with torch.device("meta"):
        model = StripedLM(cfg)
    model.to_empty(device=device)
    model.load_state_dict(load_file(str(out_dir / WEIGHTS), device=str(device)), strict=True)
    return model

