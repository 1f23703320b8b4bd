"""Where one mixer layer's forward+backward spends its GPU time: the torch profiler's
kernel table for each kind asked for, at the 1B configs' width (bench_mixers_settings).

    python bench/mixer_profile.py --kinds mamba,hyena_li [--seq 32768] [--rows 15] [--out DIR]

Prints, per kind, the CUDA kernels by total time over --steps profiled steps after warm-up,
and writes DIR/mixer_profile_KIND.txt and a Chrome trace DIR/mixer_profile_KIND.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from bench_mixers_settings import D, mixers
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="mamba,hyena_li")
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    built = mixers("cuda")
    x = torch.randn(1, args.seq, D, device="cuda", requires_grad=True)
    grad = torch.randn(1, args.seq, D, device="cuda", dtype=torch.bfloat16)
    for kind in args.kinds.split(","):
        module = built[kind]

        def step(module=module):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = module(x)
            out.backward(grad)

        for _ in range(2):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows)
        print(f"== {kind}, T = {args.seq}, {args.steps} steps\n{table}")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"mixer_profile_{kind}.txt").write_text(table)
            prof.export_chrome_trace(str(args.out / f"mixer_profile_{kind}.json"))


if __name__ == "__main__":
    main()
