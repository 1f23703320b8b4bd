"""`stripes train CONFIG [key=value ...]`: train in this process, or as one rank under torchrun
(RANK / WORLD_SIZE / LOCAL_RANK in the environment). A rerun resumes from `latest`."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (resumes from the latest checkpoint)",
                       description="Train the model of CONFIG on its data. Under torchrun each "
                       "process is one rank. An existing checkpoint in output_dir is resumed "
                       "(checkpoint.resume=never to start over).")
    p.add_argument("config", help="training YAML, e.g. configs/train/demo.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. steps=50 optim.lr=1e-3")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from stripes.train.checkpoint import CheckpointMismatch
    from stripes.train.config import load_train_config
    from stripes.train.loop import TrainingHalted, train

    cfg = load_train_config(args.config, args.overrides)
    try:
        result = train(cfg)
    except TrainingHalted as err:
        print(f"stripes train: halted: {err}")
        return 3
    except CheckpointMismatch as err:
        print(f"stripes train: error: {err}", file=sys.stderr)
        return 2
    last = result.losses.get(cfg.steps - 1)
    print(f"stripes train: {result.steps_done} steps done, final loss "
          f"{last if last is not None else 'n/a'}, checkpoint {result.last_checkpoint}")
    return 0
