"""Steady-state numbers of finished training runs, from their metrics.jsonl files.

    python3 bench/run_summary.py --skip 50 A.metrics.jsonl B.metrics.jsonl ...

tokens/s is measured over whole steps from the first step record at or past --skip to the
last one: (tokens_seen difference) / (wall-clock difference), so start-up, compilation and
warm-up are left out and the final checkpoint save (after the last record) never counts. MFU
is scaled from the last record's (MFU is proportional to tokens/s). Peak memory is the largest
record; the loss is the mean of the last five step records (one step's loss is noisy). The
first file named is the anchor of the ratio column.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def steady_state(path: Path, skip: int) -> dict:
    steps = [r for r in map(json.loads, path.read_text().splitlines()) if "event" not in r]
    if not steps:
        raise SystemExit(f"{path}: no step records")
    start = next((r for r in steps if r["step"] >= skip), None)
    last = steps[-1]
    if start is None or start is last:
        raise SystemExit(f"{path}: fewer than two step records at or past step {skip} "
                         f"(last step {last['step']})")
    tps = (last["tokens_seen"] - start["tokens_seen"]) / (last["time"] - start["time"])
    mfu = last["mfu"] * tps / last["tokens_per_s"] if last.get("mfu") else None
    tail = [r["loss"] for r in steps[-5:]]
    return {"steps": last["step"], "from_step": start["step"], "tokens_per_s": tps, "mfu": mfu,
            "peak_gib": max(r["memory_gib"] for r in steps), "loss": sum(tail) / len(tail)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", nargs="+", type=Path)
    parser.add_argument("--skip", type=int, default=50, help="first step of the measured span")
    args = parser.parse_args()
    rows = [(p.name.removesuffix(".metrics.jsonl"), steady_state(p, args.skip))
            for p in args.metrics]
    anchor = rows[0][1]["tokens_per_s"]
    print("| run | steps | measured | tokens/s | MFU | peak mem GiB | loss (last 5) | ratio |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name, r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"| {name} | {r['steps']} | {r['from_step']}-{r['steps']} | "
              f"{r['tokens_per_s']:,.0f} | {mfu} | {r['peak_gib']:.1f} | {r['loss']:.2f} | "
              f"{r['tokens_per_s'] / anchor:.2f} |")


if __name__ == "__main__":
    main()
