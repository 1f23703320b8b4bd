"""Launch settings of the scalar-decay kernels (retention and SSD), kernel by kernel (issue 8).

For each shape (bench/kernels.py's retention at T = 2k and 32k and SSD at L = 2k, and
hybrid-1b's SSD and retention layers) and chunk (64 and 128 unless --chunks says), each of
the five launches of a training step is timed alone as a CUDA graph replay, L2 flushed: the
forward state scan, the output, the reverse (gradient) scan, dq/dk (with the decay's
gradient for SSD, whose dt and A train) and dv. Every (warps, stages) in
the grid is tried, the scans also with 32-wide state tiles, and dq/dk also with a q/k
head's v-heads split among 4 and 8 programs (SSD's one group feeds 32 heads). Then the whole
forward+backward of `chunk_scalar_decay` is timed with each kernel's best setting against
the defaults, so the per-kernel choices are checked together.

    python3 bench/scalar_decay_sweep.py --out DIR [--shapes retention-2k,ssd-2k,...]
                                        [--chunks 64,128] [--quick]

Writes DIR/scalar_decay_sweep.json (every timing) and DIR/scalar_decay_sweep.md after each
shape, so a run cut short keeps what it measured. --quick: one tiny shape, two settings,
on CPU through the Triton interpreter (CI runs the script that way).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
from kernel_timing import Runner, fwd_bwd, write_results

from stripes.kernels.scalar_decay import function
from stripes.kernels.scalar_decay.function import Launch, LaunchConfig, chunk_scalar_decay

# name: (B, T, H, HK, Dk, Dv, the decay trains)
SHAPES = {"retention-2k": (32, 2048, 16, 16, 128, 128, False),
          "retention-32k": (2, 32768, 16, 16, 128, 128, False),
          "ssd-2k": (32, 2048, 32, 1, 128, 64, True),
          # configs/arch/hybrid-1b.yaml's two layers at its 4 x 4096 batch
          "ssd-hybrid-1b": (4, 4096, 64, 1, 128, 64, True),
          "retention-hybrid-1b": (4, 4096, 8, 8, 256, 256, False)}
QUICK_SHAPE = {"tiny": (1, 20, 2, 1, 16, 16, True)}
KERNELS = ("scan", "output", "reverse scan", "dq_dk", "dv")
FIELD = {"scan": "scan", "output": "output", "reverse scan": "scan", "dq_dk": "dq_dk",
         "dv": "dv"}


def inputs(shape, device):
    B, T, H, HK, dk, dv, trains_decay = shape
    n = B * T
    q, k = (torch.randn(n, HK, dk, device=device).to(torch.bfloat16) for _ in range(2))
    k = k * dk ** -0.5
    v, do = (torch.randn(n, H, dv, device=device).to(torch.bfloat16) for _ in range(2))
    g = -torch.rand(n, H, device=device) * 0.1  # log decays in (-0.1, 0]
    return q, k, v, do, g, [(b * T, (b + 1) * T) for b in range(B)], trains_decay


def launches(kernel: str, chunk: int, quick: bool) -> list[LaunchConfig]:
    """The settings tried for one kernel, every other kernel left at its default."""
    base = LaunchConfig.for_chunk(chunk)
    grid = ([getattr(base, FIELD[kernel]), Launch(8, 3)] if quick
            else [Launch(w, s) for w in (4, 8) for s in (2, 3)])
    blocks = ((64, 16) if quick else (64, 32)) if FIELD[kernel] == "scan" else (64,)
    splits = ((1, 2) if quick else (1, 4, 8)) if kernel == "dq_dk" else (1,)
    return [dataclasses.replace(base, scan_block=block, head_split=split,
                                **{FIELD[kernel]: launch})
            for launch in grid for block in blocks for split in splits]


def one_kernel(kernel, p, q, k, v, do, g, trains_decay):
    """A callable launching only `kernel` on the problem p (the states it reads made once)."""
    h, _ = p.scan(k, v, g, None, False, False, k)
    dh, _ = p.scan(q, do, g, None, False, True, k)
    return {"scan": lambda: p.scan(k, v, g, None, False, False, k),
            "output": lambda: p.output_kernel(q, k, v, g, h),
            "reverse scan": lambda: p.scan(q, do, g, None, False, True, k),
            "dq_dk": lambda: p.dq_dk_kernel(q, k, v, g, do, h, dh, trains_decay),
            "dv": lambda: p.dv_kernel(q, k, g, do, dh)}[kernel]


def timed(runner: Runner, fn) -> float:
    return (runner.time_graph(fn, None) if runner.cuda else runner.time(fn, None))["ms"]


def setting(config: LaunchConfig, kernel: str) -> str:
    launch = getattr(config, FIELD[kernel])
    extra = (f", {config.scan_block}-wide tiles" if FIELD[kernel] == "scan" else
             f", v-heads split {config.head_split} ways" if kernel == "dq_dk" else "")
    return f"{launch.warps} warps, {launch.stages} stages{extra}"


def sweep_shape(name, shape, chunk, runner, device, quick) -> dict:
    q, k, v, do, g, bounds, trains_decay = inputs(shape, device)
    seqs, chunks = function.tables(tuple(bounds), chunk, device)
    result = {"shape": name, "dims": shape, "chunk": chunk, "kernels": {}}
    best = {}
    for kernel in KERNELS:
        rows = []
        for config in launches(kernel, chunk, quick):
            p = function._Problem(q, v, seqs, chunks, chunk, config)
            ms = timed(runner, one_kernel(kernel, p, q, k, v, do, g, trains_decay))
            rows.append({"setting": setting(config, kernel), "ms": ms, "config": config})
            print(f"[{time.strftime('%H:%M:%S')}] {name} chunk {chunk} {kernel}: "
                  f"{rows[-1]['setting']}: {ms:.4f} ms", file=sys.stderr, flush=True)
        default = next(r for r in rows if r["config"] == LaunchConfig.for_chunk(chunk))
        winner = min(rows, key=lambda r: r["ms"])
        if kernel != "reverse scan":  # the scans share one setting: the forward scan's
            best[FIELD[kernel]] = getattr(winner["config"], FIELD[kernel])
        if kernel == "scan":
            best["scan_block"] = winner["config"].scan_block
        if kernel == "dq_dk":
            best["head_split"] = winner["config"].head_split
        result["kernels"][kernel] = {
            "default_ms": default["ms"], "best_ms": winner["ms"], "best": winner["setting"],
            "all": [{"setting": r["setting"], "ms": r["ms"]} for r in rows]}
    tuned = LaunchConfig(**best)
    result["tuned"] = dataclasses.asdict(tuned)
    leaves = [t.view(shape[0], shape[1], *t.shape[1:]).requires_grad_() for t in (q, k, v)]
    g4 = g.view(shape[0], shape[1], -1).requires_grad_(trains_decay)
    grads = [do.view(shape[0], shape[1], *do.shape[1:])]
    for label, config in (("default", LaunchConfig.for_chunk(chunk)), ("tuned", tuned)):
        step = fwd_bwd(lambda c=config: chunk_scalar_decay(
            *leaves, g4, bounds, chunk_size=chunk, launch=c)[0],
            leaves + ([g4] if trains_decay else []), grads)
        result[f"fb_{label}_ms"] = timed(runner, step)
    return result


def table(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines += [f"### {r['shape']} {r['dims'][:6]}, chunk {r['chunk']}", "",
                  "| kernel | default ms | best ms | best setting |", "|---|---:|---:|---|"]
        lines += [f"| {k} | {v['default_ms']:.4f} | {v['best_ms']:.4f} | {v['best']} |"
                  for k, v in r["kernels"].items()]
        lines += ["", f"forward+backward: default {r['fb_default_ms']:.4f} ms, tuned "
                  f"{r['fb_tuned_ms']:.4f} ms ({r['fb_default_ms'] / r['fb_tuned_ms']:.2f}x)",
                  ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help=f"comma-separated subset of {','.join(SHAPES)}")
    parser.add_argument("--chunks", default="64,128", help="comma-separated chunk sizes")
    parser.add_argument("--quick", action="store_true", help="one tiny shape (CI)")
    args = parser.parse_args()
    names = [s for s in args.shapes.split(",") if s]
    if set(names) - set(SHAPES):
        parser.error(f"--shapes takes names from {','.join(SHAPES)}, got {args.shapes!r}")
    shapes = QUICK_SHAPE if args.quick else {n: SHAPES[n] for n in names}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runner = Runner(device, args.quick)
    torch.manual_seed(0)
    results = []
    for name, shape in shapes.items():
        for chunk in (16,) if args.quick else [int(c) for c in args.chunks.split(",")]:
            results.append(sweep_shape(name, shape, chunk, runner, device, args.quick))
            text = write_results(args.out, "scalar_decay_sweep", {"results": results},
                                 table(results))
    print(text)


if __name__ == "__main__":
    main()
