"""`stripes export CHECKPOINT OUT`: one consolidated safetensors file plus the model YAML."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="checkpoint -> model.safetensors + model.yaml",
                       description="Consolidate a training checkpoint (any backend or world "
                       "size) into OUT/model.safetensors and OUT/model.yaml.")
    p.add_argument("checkpoint", help="a checkpoint directory, e.g. runs/demo/checkpoints/"
                   "step-000120, or a run directory (its latest checkpoint)")
    p.add_argument("out", help="output directory")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from stripes.core.config import ConfigError
    from stripes.train.checkpoint import find_checkpoint
    from stripes.train.export import export_checkpoint

    path = Path(args.checkpoint)
    try:
        if (path / "checkpoints").is_dir():  # a run directory: take what `latest` names
            path = find_checkpoint(path, "auto") or path
        path = find_checkpoint(path.parent, str(path))  # checks it is complete
    except ConfigError as err:
        raise ConfigError("checkpoint", str(path), "a complete checkpoint directory or a run "
                          "directory with checkpoints/latest", err.reason) from None
    out = export_checkpoint(path, args.out)
    print(f"stripes export: wrote {out}/model.safetensors and {out}/model.yaml")
    return 0
