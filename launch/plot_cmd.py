"""`stripes plot RUN_DIR [--out PATH]`: loss, learning rate and throughput curves as a PNG.

Reads RUN_DIR/metrics.jsonl, which may still be growing: plotting a live run is safe (a
half-written last line is ignored, the PNG is replaced atomically). Prints the path written
and nothing else, so `xdg-open "$(stripes plot runs/demo)"` works.
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="run directory -> PNG of loss / LR / throughput curves",
                       description="Draw a run's metrics.jsonl (train and eval loss, learning "
                       "rate, tokens/s and MFU, gradient norm) against step into one PNG. "
                       "Needs matplotlib: pip install 'stripes[plot]'.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, e.g. runs/demo")
    p.add_argument("--out", help="PNG to write (default: RUN_DIR/curves.png)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from stripes.core.config import ConfigError
    from stripes.core.log import log
    from stripes.train.plot import draw_curves, read_metrics

    run_dir = Path(args.run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        reason = "no metrics.jsonl in it" if run_dir.is_dir() else "not a directory"
        raise ConfigError("RUN_DIR", str(run_dir), "a run directory with metrics.jsonl", reason)
    out = Path(args.out) if args.out is not None else run_dir / "curves.png"
    if out.suffix.lower() != ".png":
        raise ConfigError("--out", str(out), "a path ending in .png", "the plot is a PNG")
    metrics = read_metrics(metrics_path)
    if not metrics.steps:
        raise ConfigError("RUN_DIR", str(run_dir), "a run directory with metrics.jsonl",
                          "metrics.jsonl has no step records yet")
    last = metrics.steps[-1]
    title = f"{run_dir.resolve().name}: step {last['step']}"
    if "tokens_seen" in last:
        title += f", {last['tokens_seen']:,} tokens"
    try:
        draw_curves(metrics, out, title)
    except OSError as err:
        raise ConfigError("--out", str(out), "a .png path in a directory this process can write",
                          err.strerror or type(err).__name__) from None
    if metrics.torn_tail_bytes:
        log.info(f"{metrics_path}: ignored a torn last line ({metrics.torn_tail_bytes} bytes), "
                 "a record still being written or cut by a crash")
    print(out)
    return 0
