"""`stripes graft SPEC OUT`: splice pretrained components into a new architecture
(stripes.graft; docs/grafting.md)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("graft", help="pretrained components -> a new stripes model",
                       description="Check a graft spec against both architectures, copy the "
                       "components, prove each by parity, and write OUT/checkpoints/"
                       "step-000000 and OUT/graft_report.json.")
    p.add_argument("spec", help="a graft YAML, e.g. configs/graft/transformer-1b-into-sh2-1b.yaml")
    p.add_argument("out", help="output directory (must not hold a checkpoint yet)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from stripes.graft.apply import run_graft
    from stripes.graft.spec import load_graft_spec

    report = run_graft(load_graft_spec(args.spec), args.out)
    grafted, fresh = report["totals"]["grafted"], report["totals"]["fresh"]
    worst = max((p["max_rel_err"] for p in report["parity"]), default=0.0)
    print(f"stripes graft: {grafted['params']:,} parameters grafted ({grafted['tensors']} "
          f"tensors), {fresh['params']:,} fresh; largest parity error {worst:.2e}; wrote "
          f"{args.out}/checkpoints/step-000000 and {args.out}/graft_report.json")
    return 0
