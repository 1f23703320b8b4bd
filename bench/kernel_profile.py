"""Where one bench/kernels.py case spends its GPU time, launch by launch: the torch
profiler's CUDA kernel table of one forward+backward of each implementation (stripes and
its anchor side by side), to see which of a kernel family's launches to work on.

    python3 bench/kernel_profile.py --only ssd [--case 0] [--roles stripes,anchor]
                                    [--steps 5] [--rows 20] [--out DIR]

Prints, per implementation, the kernels by CUDA time per step (averaged over --steps
profiled steps after two warm-up steps) and writes DIR/kernel_profile.md. CUDA only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from kernels import BUILDERS


def kernel_table(step, steps: int, rows: int) -> str:
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events) / steps / 1e3
    lines = [f"total {total:.3f} ms a step", "", "| kernel | ms a step | calls a step | share |",
             "|---|---:|---:|---:|"]
    for e in events[:rows]:
        ms = e.device_time_total / steps / 1e3
        lines.append(f"| `{e.key[:90]}` | {ms:.3f} | {e.count // steps} | "
                     f"{100 * ms / total:.1f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", required=True, help=f"one of {','.join(BUILDERS)}")
    parser.add_argument("--case", type=int, default=0, help="which of the kernel's cases")
    parser.add_argument("--roles", default="stripes,anchor")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.only not in BUILDERS:
        parser.error(f"--only takes one of {','.join(BUILDERS)}, got {args.only!r}")
    if not torch.cuda.is_available():
        sys.exit("kernel_profile.py: needs a CUDA device")
    torch.manual_seed(0)
    cases = list(BUILDERS[args.only](torch.device("cuda"), False))
    if not 0 <= args.case < len(cases):
        parser.error(f"--case: {args.only} has cases 0..{len(cases) - 1}")
    case = cases[args.case]
    roles = args.roles.split(",")
    text = [f"## {case.kernel} {case.case}"]
    for impl in (i for i in case.impls if i.role in roles and i.step is not None):
        text += ["", f"### {impl.name} ({impl.role})", "",
                 kernel_table(impl.step, args.steps, args.rows)]
    report = "\n".join(text) + "\n"
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kernel_profile.md").write_text(report)


if __name__ == "__main__":
    main()
