"""Sweep of the SwiGLU kernels' BLOCK and num_warps (kernels/swiglu/kernel.py), CUDA only.

gate, up and the output gradient are 65,536 x 2048 bf16; each setting's forward+backward is
captured in a CUDA graph and its replays timed (triton.testing.do_bench, median ms), twice,
beside liger-kernel's LigerSiLUMulFunction when it is installed. Prints one line per setting,
fastest first.

    python3 bench/swiglu_sweep.py
"""

from __future__ import annotations

import importlib.util

import torch
from kernel_timing import capture
from triton.testing import do_bench

from stripes.kernels.swiglu import kernel, swiglu

N, D = 65536, 2048


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench/swiglu_sweep.py: needs a CUDA device")
    gate, up = (torch.randn(N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                for _ in range(2))
    grad = torch.randn(N, D, device="cuda", dtype=torch.bfloat16)
    steps = {}
    for block in (1024, 2048, 4096, 8192):
        for warps in (4, 8, 16):
            if block >= 4 * 32 * warps:  # at least 4 elements a thread
                steps[f"BLOCK {block}, {warps} warps"] = (block, warps)
    times: dict[str, list[float]] = {}
    for _ in range(2):
        for name, (block, warps) in steps.items():
            kernel.BLOCK, kernel.NUM_WARPS = block, warps
            graph = capture(lambda: torch.autograd.grad(swiglu(gate, up), (gate, up), grad))
            times.setdefault(name, []).append(do_bench(graph.replay, rep=200))
        if importlib.util.find_spec("liger_kernel") is not None:
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction

            g2, u2 = (t.detach().clone().requires_grad_() for t in (gate, up))
            graph = capture(lambda g2=g2, u2=u2: torch.autograd.grad(
                LigerSiLUMulFunction.apply(g2, u2), (g2, u2), grad))
            times.setdefault("liger LigerSiLUMulFunction", []).append(
                do_bench(graph.replay, rep=200))
    for name, ms in sorted(times.items(), key=lambda item: min(item[1])):
        print(f"{name:32s} " + "  ".join(f"{t:.4f}" for t in ms) + " ms")


if __name__ == "__main__":
    main()
