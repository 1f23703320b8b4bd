"""`stripes generate MODEL --prompt TEXT`: sample a continuation with recurrent decoding.

MODEL is an export directory (model.yaml + model.safetensors), a checkpoint directory, or a
run directory (its latest checkpoint). The tokenizer defaults to the one of the training
data (`data.sources[0].path/tokenizer.model` in the checkpoint's config).
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample text from a trained model",
                       description="Continue a prompt with the model's recurrent decoding "
                       "(prefill once, then one step per token).")
    p.add_argument("model", help="export, checkpoint or run directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--tokenizer", help="sentencepiece .model (default: the training data's)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import sentencepiece as spm
    import torch

    from stripes.arch.generate import generate
    from stripes.core.config import ConfigError

    model, config = _load(Path(args.model))
    tokenizer = args.tokenizer or _training_tokenizer(config)
    if tokenizer is None or not Path(tokenizer).is_file():
        raise ConfigError("--tokenizer", tokenizer, "a sentencepiece .model file",
                          "not found (and none recorded in the checkpoint's config)")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    prompt = torch.tensor([sp.encode(args.prompt)])
    if prompt.numel() == 0:
        raise ConfigError("--prompt", args.prompt, "text that encodes to at least one token")
    out = generate(model.eval(), prompt, args.max_new_tokens, args.temperature, args.top_k,
                   torch.Generator().manual_seed(args.seed), stop_token=sp.eos_id())
    print(sp.decode([t for t in out[0].tolist() if t != sp.eos_id()]))
    return 0


def _load(path):
    """(model, training config dict or {}) from an export, checkpoint or run directory."""
    import torch
    import yaml

    from stripes.arch.config import ModelConfig
    from stripes.arch.model import StripedLM
    from stripes.core.config import ConfigError, to_typed
    from stripes.train.checkpoint import DcpStates, find_checkpoint, load_checkpoint
    from stripes.train.export import MODEL_YAML, load_exported

    if (path / MODEL_YAML).is_file():
        return load_exported(path), {}
    try:
        if (path / "checkpoints").is_dir():
            path = find_checkpoint(path, "auto") or path
        path = find_checkpoint(path.parent, str(path))
    except ConfigError as err:
        raise ConfigError("model", str(path), "an export, checkpoint or run directory",
                          err.reason) from None
    config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    with torch.device("meta"):
        model = StripedLM(to_typed(ModelConfig, config["model"], prefix="model"))
    model.to_empty(device="cpu")
    load_checkpoint(path, DcpStates(model, None))
    return model, config


def _training_tokenizer(config: dict):
    from pathlib import Path

    sources = (config.get("data") or {}).get("sources") or []
    return str(Path(sources[0]["path"]) / "tokenizer.model") if sources else None
