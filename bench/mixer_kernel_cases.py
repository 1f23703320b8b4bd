"""bench/kernels.py cases for the mixer kernels (issue 8): chunked retention beside fla.

retention: B*T = 65,536 tokens at T in {2k, 8k, 32k}, H = 16, Dk = Dv = 128, bf16, k scaled
by Dk^-1/2, decays gamma_h = 1 - 2^(-5 - h) (what fla's chunk_retention fixes), no initial
state. Rows: stripes `chunk_retention` (chunk 64), fla's `chunk_retention` with scale 1
(the anchor), and the chunkwise reference run eagerly in float32 (the "torch" anchor).
TFLOP/s count the work the stripes kernels do (every chunk's full C x C tiles, not the causal
half): per token and head, forward 2C(Dk + Dv) + 4 Dk Dv, backward 2C(3 Dk + 2 Dv) +
10 Dk Dv (the state scan is run again, then dh, dq/dk and dv).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Iterator

import torch
from kernel_timing import Case, Impl, float64_reference, fwd_bwd

BF16 = torch.bfloat16
CHUNK = 64


def fla_op(module: str, attr: str, device: torch.device) -> tuple[object | None, str]:
    """fla's `module.attr`, or None and why it cannot run here."""
    if importlib.util.find_spec("fla") is None:
        return None, "not installed"
    if device.type != "cuda":
        return None, "skipped: fla needs CUDA"
    try:
        return getattr(importlib.import_module(module), attr), ""
    except Exception as err:  # a broken install must not end the run
        return None, f"import failed: {type(err).__name__}: {err}"


def retention_flops(tokens: int, heads: int, dk: int, dv: int) -> float:
    forward = 2 * CHUNK * (dk + dv) + 4 * dk * dv
    backward = 2 * CHUNK * (3 * dk + 2 * dv) + 10 * dk * dv
    return float(tokens * heads * (forward + backward))


def retention_cases(device: torch.device, quick: bool) -> Iterator[Case]:
    fla_retention, why = fla_op("fla.ops.retention", "chunk_retention", device)
    heads, dim = (2, 16) if quick else (16, 128)
    for T in (40,) if quick else (2048, 8192, 32768):
        yield retention_case(device, (80 if quick else 65536) // T, T, heads, dim,
                             fla_retention, why)


def retention_case(device: torch.device, B: int, T: int, H: int, D: int, fla_retention,
                   why: str) -> Case:
    from stripes.kernels.retention import chunk_retention, reference

    log_decay = torch.tensor([math.log1p(-(2.0 ** (-5.0 - h))) for h in range(H)],
                             device=device)
    q, k, v = (torch.randn(B, T, H, D, device=device) for _ in range(3))
    q, k, v = (t.to(BF16).requires_grad_() for t in (q, k * D ** -0.5, v))
    inputs, grads = [q, k, v], [torch.randn(B, T, H, D, device=device, dtype=BF16)]

    def impl(name, role, forward, note=""):
        return Impl(name, role, fwd_bwd(forward, inputs, grads), forward, None, note)

    impls = [impl("reference chunkwise (eager, float32)", "torch",
                  lambda: reference.chunk_retention(q, k, v, log_decay, chunk_size=CHUNK)[0]),
             impl("stripes chunk_retention", "stripes",
                  lambda: chunk_retention(q, k, v, log_decay, chunk_size=CHUNK)[0])]
    if fla_retention is not None:
        impls.append(impl("fla chunk_retention", "anchor",
                          lambda: fla_retention(q, k, v, scale=1.0)[0]))
    else:
        impls.append(Impl("fla chunk_retention", "anchor", None, note=why))
    expected = float64_reference(
        lambda q64, k64, v64: reference.chunk_retention(
            q64, k64, v64, log_decay.double(), chunk_size=CHUNK)[0], inputs, grads)
    return Case("retention", f"B{B} T{T} H{H} D{D} bf16", ["o", "dq", "dk", "dv"], expected,
                impls, fb_flops=retention_flops(B * T, H, D, D))
