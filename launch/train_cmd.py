"""`stripes train CONFIG [key=value ...]`: train in this process, or as one rank under torchrun
or a Slurm step (train/launch_env.py). A rerun resumes from `latest`.

Exit status: 0 done, 2 bad input, 3 halted on non-finite steps, 75 stopped by SIGUSR1 or
SIGTERM after a checkpoint (requeue and rerun to continue)."""

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
    from stripes.train.preemption import REQUEUE_EXIT

    cfg = load_train_config(args.config, args.overrides)
    try:
        result = train(cfg)
    except TrainingHalted as err:
        print(f"stripes train: halted: {err}")
        return 3
    except CheckpointMismatch as err:
        print(f"stripes train: error: {err}", file=sys.stderr)
        return 2
    if result.stopped_by:
        print(f"stripes train: stopped by {result.stopped_by} after {result.steps_done} steps, "
              f"checkpoint {result.last_checkpoint}; rerun to resume")
        return REQUEUE_EXIT
    last = result.losses.get(cfg.steps - 1)
    print(f"stripes train: {result.steps_done} steps done, final loss "
          f"{last if last is not None else 'n/a'}, checkpoint {result.last_checkpoint}")
    return 0
