"""`stripes export CHECKPOINT OUT [--format stripes|hf]`: one directory other tools read."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="checkpoint -> model.safetensors + config (stripes or "
                       "Hugging Face Llama)",
                       description="Consolidate a training checkpoint (any backend or world "
                       "size) into one directory: OUT/model.safetensors with OUT/model.yaml "
                       "(stripes, any model), or a Hugging Face Llama directory (hf, models "
                       "with attention and SwiGLU in every layer). The training data's "
                       "tokenizer is copied beside them.")
    p.add_argument("checkpoint", help="a checkpoint directory, e.g. runs/demo/checkpoints/"
                   "step-000120, or a run directory (its latest checkpoint)")
    p.add_argument("out", help="output directory")
    p.add_argument("--format", default="stripes", choices=("stripes", "hf"),
                   help="stripes (default) or hf: config.json + Llama tensor names")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from stripes.train.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, args.format)
    names = sorted(path.name for path in out.iterdir() if not path.name.startswith("."))
    print(f"stripes export: wrote {out}: {', '.join(names)}")
    return 0
