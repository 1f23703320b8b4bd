"""Sweep of the modal_conv kernels' tiles (kernels/modal_conv), CUDA only: channels a program
(BC, one warp: 32 is one lane a channel, 16 two lanes), tokens a load (TB) and programs per
SM (how finely segments cut the time axis), at bench/kernels.py's modal_conv shapes.

Each setting's forward+backward of modal_gated_conv (bf16 q, k, v; float32 filter
parameters) is timed with triton.testing.do_bench (median ms, L2 flushed by do_bench), its
output and gradients checked against the default setting's (the same function: only the
order of float32 sums may change; the largest relative difference is printed). Prints one
table per shape, fastest first.

    python3 bench/modal_conv_sweep.py [--shapes b64-1k,b64-4k,b1-32k]
"""

from __future__ import annotations

import argparse
import math

import torch
from triton.testing import do_bench

from stripes.kernels.modal_conv import function

SHAPES = {"b64-1k": (64, 1024, 768, 16), "b64-4k": (64, 4096, 768, 16),
          "b1-32k": (1, 32768, 2048, 16)}
# (BC, TB, programs per SM); the first is the default of kernel.py / function.py
SETTINGS = [(32, 4, 16), (32, 2, 16), (32, 8, 16), (16, 4, 16), (16, 8, 16), (16, 16, 16),
            (32, 4, 8), (32, 4, 32)]


def inputs(B: int, T: int, C: int, N: int) -> list[torch.Tensor]:
    """As bench/mixer_kernel_cases.py's modal_conv case: poles remembering 1 to 8,000 steps."""
    q, k, v = (torch.randn(B, T, C, device="cuda").to(torch.bfloat16).requires_grad_()
               for _ in range(3))
    rate = torch.empty(C, N, device="cuda").uniform_(-9.0, 0.0).exp().requires_grad_()
    theta = torch.empty(C, N, device="cuda").uniform_(0.0, math.pi).requires_grad_()
    re, im = ((torch.randn(C, N, device="cuda") / N ** 0.5).requires_grad_() for _ in "ri")
    return [q, k, v, rate, theta, re, im]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/modal_conv_sweep.py: needs a CUDA device")
    names = [s for s in args.shapes.split(",") if s]
    if unknown := [s for s in names if s not in SHAPES]:
        parser.error(f"--shapes: unknown {unknown[0]!r}; known: {', '.join(SHAPES)}")
    default = (function.BC, function.TB, function.PROGRAMS_PER_SM)
    torch.manual_seed(0)
    for name in names:
        tensors = inputs(*SHAPES[name])
        grad = torch.randn_like(tensors[0])
        step = lambda tensors=tensors, grad=grad: torch.autograd.grad(
            function.modal_gated_conv_triton(*tensors), tensors, grad)
        rows, reference = [], None
        for setting in SETTINGS:
            function.BC, function.TB, function.PROGRAMS_PER_SM = setting
            out = function.modal_gated_conv_triton(*tensors)
            results = [t.float() for t in (out, *torch.autograd.grad(out, tensors, grad))]
            reference = results if reference is None else reference
            err = max(((a - b).norm() / b.norm()).item()
                      for a, b in zip(results, reference, strict=True))
            rows.append((do_bench(step, rep=200), setting, err))
        function.BC, function.TB, function.PROGRAMS_PER_SM = default
        print(f"\n{name} {SHAPES[name]} (B, T, C, N), forward+backward")
        print("| BC | TB | programs/SM | ms | vs default | rel. diff, out and grads |")
        print("|---:|---:|---:|---:|---:|---:|")
        base = rows[0][0]
        for ms, (bc, tb, pps), err in sorted(rows):
            print(f"| {bc} | {tb} | {pps} | {ms:.3f} | {base / ms:.2f} | {err:.1e} |")


if __name__ == "__main__":
    main()
