"""`stripes inspect CONFIG [key=value ...]`: build the model on meta, print a per-layer table."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stripes.arch.summary import Row


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="per-layer parameters, FLOPs/token and decoding state",
                       description="Build the model on the meta device and print, per layer: "
                       "kind, parameters, forward FLOPs per token at model.max_seq_len, and "
                       "decoding-state bytes (batch 1, bf16), then totals.")
    p.add_argument("config", help="arch YAML, e.g. configs/arch/tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. model.n_layers=4 model.max_seq_len=8192")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch  # imported here so that `stripes --help` starts instantly

    from stripes.arch.config import ArchFile
    from stripes.arch.model import StripedLM
    from stripes.arch.summary import summarize
    from stripes.core.config import load_config

    cfg = load_config(ArchFile, args.config, args.overrides).model
    with torch.device("meta"):
        model = StripedLM(cfg)
    rows = summarize(model, cfg.max_seq_len)
    print(f"{args.config}: d_model={cfg.d_model} n_layers={cfg.n_layers} "
          f"vocab={cfg.vocab_size} seq_len={cfg.max_seq_len}")
    print(format_table(rows))
    return 0


def format_table(rows: list[Row]) -> str:
    header = ("layer", "kind", "params", "FLOPs/token", "state")
    body = [(r.name, r.kind, f"{r.params:,}", _si(r.flops_per_token), _bytes(r.state_bytes))
            for r in rows]
    total = ("total", "", f"{sum(r.params for r in rows):,}",
             _si(sum(r.flops_per_token for r in rows)), _bytes(sum(r.state_bytes for r in rows)))
    widths = [max(len(line[i]) for line in (header, *body, total)) for i in range(len(header))]

    def fmt(line):
        left = [line[0].rjust(widths[0]), line[1].ljust(widths[1])]
        right = [cell.rjust(w) for cell, w in zip(line[2:], widths[2:], strict=True)]
        return "  ".join(left + right)

    rule = "-" * len(fmt(header))
    return "\n".join([fmt(header), rule, *map(fmt, body), rule, fmt(total)])


def _si(value: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def _bytes(value: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value} B"
