"""bench/kernels.py cases for the mixer kernels (issue 8): chunked retention beside fla,
Mamba-2's SSD and its gated output norm beside mamba_ssm.

retention: B*T = 65,536 tokens at T in {2k, 8k, 32k}, H = 16, Dk = Dv = 128, bf16, k scaled
by Dk^-1/2, decays gamma_h = 1 - 2^(-5 - h) (what fla's chunk_retention fixes), no initial
state. Rows: stripes `chunk_retention` (chunk 64, and 128 as an extra row), fla's
`chunk_retention` with scale 1 (the anchor), and the chunkwise reference run eagerly in
float32 (the "torch" anchor).
TFLOP/s count the work the stripes kernels do (every chunk's full C x C tiles, not the causal
half): per token and head, forward 2C(Dk + Dv) + 4 Dk Dv, backward 2C(3 Dk + 2 Dv) +
10 Dk Dv (the state scan is run again, then dh, dq/dk and dv).

ssd: B*L = 65,536 tokens at L in {2k, 8k}, H = 32, P = 64, N = 128, one group, bf16 x, B, C,
float32 dt (after softplus) and A. Rows: stripes `ssd` (chunk 64, and 128 as an extra row;
the scalar-decay kernels with Dk = N, Dv = P), mamba_ssm's `mamba_chunk_scan_combined`
(chunk 256, its own benchmark's setting; the anchor), and the chunked reference run eagerly
in float32.
Gradients of x, dt, A, B and C; FLOPs counted as for retention with Dk = N, Dv = P.

causal_conv: Hyena-SE's gated filter, q * (h * (k v)), B*T = 65,536 tokens, D = 2048
channels, 7 taps (and 128, Hyena-MR's length, beside fft_conv's row at that shape), bf16
activations and a float32 filter. Rows: stripes `causal_conv` (one kernel each way), the
same composition in PyTorch (k * v, conv1d, * q) run eagerly, and torch.compile of it: the
anchor, no library of such kernels being installable here.
GB/s count q, k, v and out once forward, and dout, q, k, v, dq, dk, dv once backward.
A last row is Mamba-2's conv at hybrid-1b's width (4352 channels, 4 taps, bias, SiLU), beside
the same PyTorch ops eagerly and compiled (the anchor); GB/s count x and out forward, and
out, dout, x, dx backward.

gated_norm: Mamba-2's output norm, 32,768 rows of C = 4096 (hybrid-1b's d_inner), one group,
bf16 y, z (and x), float32 weight (and skip). Rows: stripes `gated_norm`, the unfused
ops eagerly and compiled, and mamba_ssm's `rmsnorm_fn(norm_before_gate=False)` (the anchor,
without the skip term, which it adds inside its scan). GB/s count each bf16 activation once
forward (inputs, out) and backward (dout, the inputs again, their gradients).

modal_filter: Hyena-LI's taps h[g, t] = Re(sum_n R p^t) at hybrid-1b's shape, G = 2048
filters of N = 16 modes, T in {8k, 32k} taps, float32 (the parameters' dtype). Rows: stripes
`modal_filter`, the complex reference run eagerly, and the anchor: torch.compile of the same
sum written in real arithmetic (e^(-rt) (R_re cos - R_im sin)), which inductor can fuse into
one pass with no [G, N, T] tensor. GB/s count h written forward and dh read backward: the
floor, since the four [G, N] parameters are nothing beside them.

toeplitz_conv: Hyena-SE/MR's gated filter shared by groups of 16 channels (the narrowest
group the matmuls take), at causal_conv's shape, 7, 128 and 512 taps. Rows: stripes
`toeplitz_gated_conv` (block-Toeplitz matmuls; again with document positions given, each a
whole row, which costs the per-block masks), the composition in PyTorch eagerly (conv1d
at 7 taps, FFT beyond: the faster of the two) and compiled (the anchor), and as extra rows
stripes' per-channel kernels given the filters spread to one a channel (causal_conv;
fft_gated_conv beyond 64 taps). GB/s count as for causal_conv.

modal_conv: Hyena-LI's gated long convolution q * (h * (k v)) with that filter, at the
fft_conv case's shapes (B = 64, C = 768, T in {1k, 4k}) and at hybrid-1b's (one row of 32k,
C = 2048), N = 16 modes, bf16 activations. Rows: stripes `modal_gated_conv` (the recurrence
kernel), the filter built by definition then the FFT composition, eagerly (the torch
anchor: the issue's "plain PyTorch FFT") and compiled (the anchor). GB/s count as for
causal_conv: q, k, v, out forward; dout, q, k, v, dq, dk, dv backward.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import math
import sys
import types
from collections.abc import Iterator

import torch
from kernel_timing import Case, Impl, anchor_op, compiled, float64_reference, fwd_bwd

BF16 = torch.bfloat16
CHUNK = 64


def mamba_chunk_scan(device: torch.device) -> tuple[object | None, str]:
    """mamba_ssm's mamba_chunk_scan_combined, or None and why not."""
    return mamba_ssm_op("ssd_combined", "mamba_chunk_scan_combined", device)


def mamba_ssm_op(module: str, attr: str, device: torch.device) -> tuple[object | None, str]:
    """mamba_ssm.ops.triton.MODULE.ATTR, or None and why not. The pure-Python build's
    package __init__ imports its CUDA selective scan and fails, so the package is entered
    through a stand-in module and only the Triton submodule is imported. The package is
    found on sys.path, not through sys.modules, where an earlier call's stand-in (no
    __spec__) would make importlib.util.find_spec raise."""
    spec = importlib.machinery.PathFinder.find_spec("mamba_ssm")
    if spec is None or spec.submodule_search_locations is None:
        return None, "not installed"
    if device.type != "cuda":
        return None, "skipped: mamba_ssm needs CUDA"
    if "mamba_ssm" not in sys.modules:
        package = types.ModuleType("mamba_ssm")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["mamba_ssm"] = package
    try:
        return getattr(importlib.import_module(f"mamba_ssm.ops.triton.{module}"), attr), ""
    except Exception as err:
        return None, f"import failed: {type(err).__name__}: {err}"


def retention_flops(tokens: int, heads: int, dk: int, dv: int) -> float:
    forward = 2 * CHUNK * (dk + dv) + 4 * dk * dv
    backward = 2 * CHUNK * (3 * dk + 2 * dv) + 10 * dk * dv
    return float(tokens * heads * (forward + backward))


def retention_cases(device: torch.device, quick: bool) -> Iterator[Case]:
    fla_retention, why = anchor_op("fla.ops.retention", "chunk_retention", device)
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
                  lambda: chunk_retention(q, k, v, log_decay, chunk_size=CHUNK)[0]),
             impl("stripes chunk_retention, chunk 128", "extra",
                  lambda: chunk_retention(q, k, v, log_decay, chunk_size=128)[0])]
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


def ssd_cases(device: torch.device, quick: bool) -> Iterator[Case]:
    anchor, why = mamba_chunk_scan(device)
    heads, p, n = (4, 16, 16) if quick else (32, 64, 128)
    for L in (40,) if quick else (2048, 8192):
        yield ssd_case(device, (80 if quick else 65536) // L, L, heads, p, n, anchor, why)


def ssd_case(device: torch.device, batch: int, L: int, H: int, P: int, N: int, anchor,
             why: str) -> Case:
    from stripes.kernels.ssd import reference, ssd

    x = torch.randn(batch, L, H, P, device=device).to(BF16).requires_grad_()
    dt = torch.nn.functional.softplus(torch.randn(batch, L, H, device=device) - 3)
    dt.requires_grad_()
    A = (-torch.empty(H, device=device).uniform_(1, 16)).requires_grad_()
    B, C = (torch.randn(batch, L, 1, N, device=device).to(BF16).requires_grad_()
            for _ in range(2))
    inputs, grads = [x, dt, A, B, C], [torch.randn(batch, L, H, P, device=device, dtype=BF16)]

    def impl(name, role, forward, note=""):
        return Impl(name, role, fwd_bwd(forward, inputs, grads), forward, None, note)

    impls = [impl("reference chunked (eager, float32)", "torch",
                  lambda: reference.ssd(x, dt, A, B, C, CHUNK)[0]),
             impl("stripes ssd", "stripes", lambda: ssd(x, dt, A, B, C, CHUNK)[0]),
             impl("stripes ssd, chunk 128", "extra", lambda: ssd(x, dt, A, B, C, 128)[0])]
    if anchor is not None:
        impls.append(impl("mamba_ssm mamba_chunk_scan_combined", "anchor",
                          lambda: anchor(x, dt, A, B, C, 256)))
    else:
        impls.append(Impl("mamba_ssm mamba_chunk_scan_combined", "anchor", None, note=why))
    expected = float64_reference(
        lambda *args: reference.ssd(*args, CHUNK)[0], inputs, grads)
    return Case("ssd", f"B{batch} L{L} H{H} P{P} N{N} bf16", ["y", "dx", "ddt", "dA", "dB",
                                                               "dC"],
                expected, impls, fb_flops=retention_flops(batch * L, H, N, P))


def causal_conv_cases(device: torch.device, quick: bool) -> Iterator[Case]:
    from stripes.arch.hyena_filters import direct_causal_conv
    from stripes.kernels.causal_conv import causal_conv

    B, T, D = (2, 40, 24) if quick else (16, 4096, 2048)
    for L in (7,) if quick else (7, 128):  # Hyena-SE's filter, and MR's length
        q, k, v = (torch.randn(B, T, D, device=device).to(BF16).requires_grad_()
                   for _ in range(3))
        h = (torch.randn(D, L, device=device) / L ** 0.5).requires_grad_()
        yield gated_conv_case("causal_conv", f"B{B} T{T} D{D} L{L} gated bf16", device,
                              [q, k, v, h],
                              lambda q, k, v, h: q * direct_causal_conv(k * v, h),
                              lambda q, k, v, h: causal_conv(k, h, x2=v, gate=q),
                              "stripes causal_conv", "torch: q * conv1d(k * v)")
    yield mamba_conv_case(device, quick)


def mamba_conv_case(device: torch.device, quick: bool) -> Case:
    """Mamba-2's conv at hybrid-1b's width, silu(conv1d(xBC) + bias): stripes' one pass each
    way beside the PyTorch ops eagerly (the torch anchor) and compiled (the anchor)."""
    from stripes.arch.hyena_filters import direct_causal_conv
    from stripes.kernels.causal_conv import causal_conv

    B, T, C, L = (2, 40, 24, 4) if quick else (16, 4096, 4352, 4)
    x = torch.randn(B, T, C, device=device).to(BF16).requires_grad_()
    h = (torch.randn(C, L, device=device) / L ** 0.5).requires_grad_()
    bias = (0.1 * torch.randn(C, device=device)).requires_grad_()
    inputs, grads = [x, h, bias], [torch.randn(B, T, C, device=device, dtype=BF16)]
    composed = lambda x, h, bias: torch.nn.functional.silu(
        direct_causal_conv(x, h) + bias.to(x.dtype))
    compiled_fn, note = compiled(composed, device)

    def impl(name, role, fn, note=""):
        forward = lambda: fn(*inputs)
        return Impl(name, role, fwd_bwd(forward, inputs, grads), forward, None, note)

    impls = [impl("torch: silu(conv1d(x) + bias)", "torch", composed),
             impl("stripes causal_conv(silu=True)", "stripes",
                  lambda x, h, bias: causal_conv(x, h, bias, silu=True)),
             impl("torch.compile(silu(conv1d(x) + bias))", "anchor", compiled_fn, note)]
    expected = float64_reference(composed, inputs, grads)
    one = x.numel() * 2  # bytes of one bf16 activation
    return Case("causal_conv", f"B{B} T{T} D{C} L{L} mamba silu bf16", ["out", "dx", "dh",
                                                                         "dbias"],
                expected, impls, fwd_bytes=2 * one, fb_bytes=5 * one, graph=True)


def gated_conv_case(kernel: str, label: str, device: torch.device, inputs, composed, fused,
                    fused_name: str, composed_name: str, extras=()) -> Case:
    """q * (h * (k v)) three ways: stripes' `fused`, PyTorch's `composed` eagerly (the torch
    anchor, also the float64 reference) and torch.compile of it (the anchor); `extras`
    (name, fn) pairs run as extra rows."""
    q = inputs[0]
    grads = [torch.randn(q.shape, device=device, dtype=BF16)]
    compiled_fn, note = compiled(composed, device)

    def impl(name, role, fn, note=""):
        forward = lambda: fn(*inputs)
        return Impl(name, role, fwd_bwd(forward, inputs, grads), forward, None, note)

    impls = [impl(composed_name, "torch", composed), impl(fused_name, "stripes", fused),
             impl(f"torch.compile({composed_name.split(': ')[-1]})", "anchor", compiled_fn,
                  note)]
    impls += [impl(name, "extra", fn) for name, fn in extras]
    expected = float64_reference(composed, inputs, grads)
    one = q.numel() * 2  # bytes of one bf16 activation
    return Case(kernel, label, ["out", "dq", "dk", "dv", "dh"], expected, impls,
                fwd_bytes=4 * one, fb_bytes=11 * one, graph=kernel == "causal_conv")


def toeplitz_conv_cases(device: torch.device, quick: bool) -> Iterator[Case]:
    from stripes.arch.hyena_filters import direct_causal_conv, fft_causal_conv
    from stripes.kernels.causal_conv import causal_conv
    from stripes.kernels.fft_conv import fft_gated_conv
    from stripes.kernels.toeplitz_conv import toeplitz_gated_conv

    (B, T, D), group = ((2, 80, 32) if quick else (16, 4096, 2048)), 16
    spread = lambda h: h.repeat_interleave(group, dim=0)  # [C, L]: a filter a channel
    one_doc = torch.arange(T, device=device).expand(B, T)  # positions of whole rows
    for L in (7, 70) if quick else (7, 128, 512):
        q, k, v = (torch.randn(B, T, D, device=device).to(BF16).requires_grad_()
                   for _ in range(3))
        h = (torch.randn(D // group, L, device=device) / L ** 0.5).requires_grad_()
        by_fft = L > 64  # the faster of plain PyTorch's two convs (causal_conv's rows)
        conv = fft_causal_conv if by_fft else direct_causal_conv
        extras = [("stripes toeplitz_gated_conv, positions given (per-block masks)",
                   lambda q, k, v, h: toeplitz_gated_conv(q, k, v, h, one_doc)),
                  ("stripes causal_conv (a filter a channel)",
                   lambda q, k, v, h: causal_conv(k, spread(h), x2=v, gate=q))]
        if by_fft:
            extras.append(("stripes fft_gated_conv",
                           lambda q, k, v, h: fft_gated_conv(q, k, v, spread(h))))
        yield gated_conv_case(
            "toeplitz_conv", f"B{B} T{T} D{D} L{L} groups of {group} bf16", device,
            [q, k, v, h], lambda q, k, v, h, conv=conv: q * conv(k * v, spread(h)),
            toeplitz_gated_conv, "stripes toeplitz_gated_conv",
            f"torch: q * {conv.__name__}(k * v)", extras)


def gated_norm_cases(device: torch.device, quick: bool) -> Iterator[Case]:
    """Mamba-2's output norm at hybrid-1b's width, rmsnorm(y * silu(z)) * w (beside mamba_ssm's
    rmsnorm_fn with norm_before_gate=False, the anchor), then with the D skip fused in; and
    retention's, GroupNorm per head then the swish gate."""
    from stripes.kernels.gated_norm import gated_norm, reference

    rows = 48 if quick else 32768
    anchor, why = mamba_ssm_op("layernorm_gated", "rmsnorm_fn", device)
    # label, C, group, skip, centered, gate_first
    variants = [("mamba", 4096, 4096, False, False, True),
                ("mamba + D skip", 4096, 4096, True, False, True),
                ("retention", 2048, 256, False, True, False)]
    for label, C, group, skip, centered, gate_first in variants:
        C, group = (40, 40 if group == C else 8) if quick else (C, group)
        y, z, x = (torch.randn(rows, C, device=device).to(BF16).requires_grad_()
                   for _ in range(3))
        w = (1 + 0.1 * torch.randn(C, device=device)).requires_grad_()
        d = torch.randn(C, device=device).requires_grad_()
        inputs = [y, z, w, x, d] if skip else [y, z, w]
        grads = [torch.randn(rows, C, device=device, dtype=BF16)]

        def with_args(fn, group=group, centered=centered, gate_first=gate_first):
            return lambda *ts: fn(ts[0], ts[1], ts[2], group, 1e-5, *ts[3:],
                                  centered=centered, gate_first=gate_first)

        composed, fused = with_args(reference.gated_norm), with_args(gated_norm)
        compiled_fn, note = compiled(composed, device)

        def impl(name, role, fn, note="", inputs=inputs, grads=grads):
            forward = lambda: fn(*inputs)
            return Impl(name, role, fwd_bwd(forward, inputs, grads), forward, None, note)

        impls = [impl("torch: the unfused ops", "torch", composed),
                 impl("stripes gated_norm", "stripes", fused),
                 impl("torch.compile(the unfused ops)", "extra", compiled_fn, note)]
        if label != "mamba":
            impls.append(Impl("mamba_ssm rmsnorm_fn", "anchor", None,
                              note="no row: not mamba_ssm's function (its D x is in its scan)"))
        elif anchor is None:
            impls.append(Impl("mamba_ssm rmsnorm_fn", "anchor", None, note=why))
        else:
            impls.append(impl("mamba_ssm rmsnorm_fn", "anchor",
                              lambda y, z, w, C=C: anchor(y, w, None, z=z, eps=1e-5,
                                                          group_size=C,
                                                          norm_before_gate=False)))
        expected = float64_reference(composed, inputs, grads)
        one = rows * C * 2  # bytes of one bf16 activation
        n = 3 if skip else 2  # activations among the inputs: y, z (and x)
        names = ["out", "dy", "dz", "dw", "dx", "dskip"] if skip else ["out", "dy", "dz", "dw"]
        yield Case("gated_norm", f"{label} {rows}x{C}/{group} bf16", names, expected, impls,
                   fwd_bytes=(n + 1) * one, fb_bytes=(3 * n + 2) * one, graph=True)


def modal_filter_cases(device: torch.device, quick: bool) -> Iterator[Case]:
    from stripes.kernels.modal_filter import modal_filter, reference

    for G, N, T in [(6, 4, 40)] if quick else [(2048, 16, 8192), (2048, 16, 32768)]:
        rate = torch.empty(G, N, device=device).uniform_(-9.0, 0.0).exp().requires_grad_()
        theta = torch.empty(G, N, device=device).uniform_(0.0, math.pi).requires_grad_()
        re, im = ((torch.randn(G, N, device=device) / N ** 0.5).requires_grad_()
                  for _ in range(2))
        inputs, grads = [rate, theta, re, im], [torch.randn(G, T, device=device)]
        compiled_fn, note = compiled(real_modal_filter, device)

        def impl(name, role, fn, note="", inputs=inputs, grads=grads, T=T):
            forward = lambda: fn(*inputs, T)
            return Impl(name, role, fwd_bwd(forward, inputs, grads), forward, None, note)

        impls = [impl("torch: complex reference", "torch", reference.modal_filter),
                 impl("stripes modal_filter", "stripes", modal_filter),
                 impl("torch.compile(real form)", "anchor", compiled_fn, note)]
        # By slices of filters: the whole 32k reference would hold [G, N, T] complex128
        # tensors of 17 GB under autograd.
        expected = float64_by_slices(lambda *p, T=T: reference.modal_filter(*p, T), inputs,
                                     grads, [0] * 4, 0, 256)
        yield Case("modal_filter", f"G{G} N{N} T{T} fp32", ["h", "drate", "dtheta", "dre",
                                                            "dim"],
                   expected, impls, fwd_bytes=4 * G * T, fb_bytes=8 * G * T, graph=True)


def modal_conv_cases(device: torch.device, quick: bool) -> Iterator[Case]:
    """Hyena-LI's gated long convolution at the issue's FFT shapes and hybrid-1b's (one
    32k row): stripes' recurrence kernel beside the filter + FFT composition eagerly (the
    torch anchor) and compiled (the anchor)."""
    from stripes.kernels.modal_conv import modal_gated_conv, reference

    shapes = [(2, 24, 16, 4)] if quick else [(64, 1024, 768, 16), (64, 4096, 768, 16),
                                             (1, 32768, 2048, 16)]
    for B, T, C, N in shapes:
        q, k, v = (torch.randn(B, T, C, device=device).to(BF16).requires_grad_()
                   for _ in range(3))
        rate = torch.empty(C, N, device=device).uniform_(-9.0, 0.0).exp().requires_grad_()
        theta = torch.empty(C, N, device=device).uniform_(0.0, math.pi).requires_grad_()
        re, im = ((torch.randn(C, N, device=device) / N ** 0.5).requires_grad_()
                  for _ in range(2))
        inputs = [q, k, v, rate, theta, re, im]
        grads = [torch.randn(B, T, C, device=device, dtype=BF16)]
        compiled_fn, note = compiled(reference.modal_gated_conv, device)

        def impl(name, role, fn, note="", inputs=inputs, grads=grads):
            forward = lambda: fn(*inputs)
            return Impl(name, role, fwd_bwd(forward, inputs, grads), forward, None, note)

        impls = [impl("torch: modal filter, then q * fft_causal_conv(k * v)", "torch",
                      reference.modal_gated_conv),
                 impl("stripes modal_gated_conv", "stripes", modal_gated_conv),
                 impl("torch.compile(the same)", "anchor", compiled_fn, note)]
        # By slices of channels: the whole reference would hold [C, N, T] complex128 powers
        # of 17 GB at 32k.
        expected = float64_by_slices(reference.modal_gated_conv, inputs, grads,
                                     [-1] * 3 + [0] * 4, -1, max(1, C // 8))
        one = q.numel() * 2  # bytes of one bf16 activation
        yield Case("modal_conv", f"B{B} T{T} C{C} N{N} bf16", ["out", "dq", "dk", "dv",
                                                               "drate", "dtheta", "dre",
                                                               "dim"],
                   expected, impls, fwd_bytes=4 * one, fb_bytes=11 * one)


def float64_by_slices(fn, inputs, grads, dims: list[int], out_dim: int, size: int):
    """float64_reference of fn, computed on slices of `size` independent channels or filters
    and joined: dims[j] is the dimension input j is sliced along, out_dim the outputs'."""
    n = inputs[0].shape[dims[0]]
    cut = lambda t, d, i: t.narrow(d, i, min(size, n - i))
    parts = [float64_reference(fn, [cut(t, d, i) for t, d in zip(inputs, dims, strict=True)],
                               [cut(g, out_dim, i) for g in grads])
             for i in range(0, n, size)]
    joined = [out_dim] * len(grads) + dims  # outputs, then each input's gradient
    return [torch.cat(p, dim=d) for p, d in zip(zip(*parts, strict=True), joined, strict=True)]


def real_modal_filter(rate, theta, re, im, length: int) -> torch.Tensor:
    """The modal filter in real arithmetic, [G, length]: what a PyTorch user would write for
    torch.compile to fuse."""
    t = torch.arange(length, device=rate.device, dtype=rate.dtype)
    decay = torch.exp(-rate[..., None] * t)  # [G, N, T]
    angle = theta[..., None] * t
    return (decay * (re[..., None] * torch.cos(angle) - im[..., None] * torch.sin(angle))).sum(1)


def fft_conv_cases(device: torch.device, quick: bool) -> Iterator[Case]:
    from stripes.kernels.fft_conv import fft_gated_conv, reference

    # The shapes (filter as long as the sequence), then Hyena-MR's 128 taps at the
    # causal_conv case's shape: the two rows at L = 128 decide which path MR should take.
    shapes = ([(2, 24, 16, 24)] if quick else
              [(64, 1024, 768, 1024), (64, 4096, 768, 4096), (16, 4096, 2048, 128)])
    for B, T, C, L in shapes:
        q, k, v = (torch.randn(B, T, C, device=device).to(BF16).requires_grad_()
                   for _ in range(3))
        h = (torch.randn(C, L, device=device) / L ** 0.5).requires_grad_()
        yield gated_conv_case("fft_conv", f"B{B} T{T} C{C} L{L} bf16", device,
                              [q, k, v, h], reference.fft_gated_conv, fft_gated_conv,
                              "stripes fft_gated_conv", "torch: q * fft_causal_conv(k * v)")
