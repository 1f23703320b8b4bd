"""Export a training checkpoint (any backend, any world size) to one consolidated file:

    OUT/model.safetensors   every parameter of the bare StripedLM, full (unsharded) tensors
    OUT/model.yaml          the model config (`model:` ...), loadable by `stripes inspect`

so the rest of stripes (decoding, grafting, evaluation) and other tools read one format.
`load_exported(OUT)` rebuilds the model from the two files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from stripes.arch.config import ArchFile, ModelConfig
from stripes.arch.model import StripedLM
from stripes.core.config import load_config, to_typed
from stripes.data.format import write_atomic
from stripes.train.checkpoint import DcpStates, load_checkpoint

WEIGHTS, MODEL_YAML = "model.safetensors", "model.yaml"


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write OUT/model.safetensors and OUT/model.yaml from `checkpoint`; returns OUT."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    saved = yaml.safe_load((checkpoint / "config.yaml").read_text())
    model_raw = saved.get("model") if isinstance(saved, dict) else None
    if not isinstance(model_raw, dict):
        raise ValueError(f"{checkpoint / 'config.yaml'}: no `model` section")
    cfg = to_typed(ModelConfig, model_raw, prefix="model")
    with torch.device("meta"):
        model = StripedLM(cfg)
    model.to_empty(device="cpu")
    load_checkpoint(checkpoint, DcpStates(model, None))
    step = json.loads((checkpoint / "trainer.json").read_text())["step"]

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    tmp = out_dir / f".{WEIGHTS}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "stripes", "step": str(step),
                                           "source": str(checkpoint)})
    tmp.replace(out_dir / WEIGHTS)  # never a half-written weights file under the real name
    write_atomic(out_dir / MODEL_YAML, yaml.safe_dump({"model": model_raw},
                                                      sort_keys=False).encode())
    return out_dir


def load_exported(out_dir: str | Path, device: str | torch.device = "cpu") -> StripedLM:
    """The StripedLM an export holds, on `device`, weights loaded strictly."""
    out_dir = Path(out_dir)
    cfg = load_config(ArchFile, out_dir / MODEL_YAML).model
    with torch.device("meta"):
        model = StripedLM(cfg)
    model.to_empty(device=device)
    model.load_state_dict(load_file(str(out_dir / WEIGHTS), device=str(device)), strict=True)
    return model
