"""`stripes launch {torchrun,slurm} CONFIG ...`: start training CONFIG on one or many nodes.
docs/launching.md shows each case."""

from __future__ import annotations

import argparse

from stripes.launch import slurm_script, torchrun_cmd


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("launch", help="train on one or many nodes with torchrun or Slurm",
                       description="Start `stripes train CONFIG` under torchrun, or as a Slurm "
                       "job that checkpoints and requeues itself.")
    launchers = p.add_subparsers(dest="launcher", metavar="LAUNCHER", required=True)
    torchrun_cmd.add_parser(launchers)
    slurm_script.add_parser(launchers)
