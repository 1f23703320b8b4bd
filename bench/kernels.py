"""stripes' Triton kernels against liger-kernel, fla and plain PyTorch, in one run (issues 7, 8).

Per kernel, bf16, forward and forward+backward (all input gradients):
- rmsnorm   65,536 x 2048: x bf16 with a float32 weight (what stripes trains with) and all
            bf16, each alone and with the fused residual add (float32 / bf16 residual);
- swiglu    gate and up each 65,536 x 2048;
- rotary    q and k, each [4, 4096, 32, 128], rotate-half layout, float32 tables; stripes
            rotates the pair in one launch (apply_rotary_qk, the model's call), and one
            call each as an extra row;
- linear_ce N=32,768, D=2048, V=32,000, forward+backward only (the fused versions do all
            their work in the forward);
- retention B*T = 65,536, T in {2k, 8k, 32k}, H = 16, Dk = Dv = 128, and
- ssd       B*L = 65,536, L in {2k, 8k}, H = 32, P = 64, N = 128, one group, and
- causal_conv  Hyena-SE's gated 7-tap filter over 65,536 x 2048, and
- fft_conv  Hyena's gated FFT long convolution, B = 64, C = 768, T in {1k, 4k}, and
- toeplitz_conv  the gated conv with filters grouped by 16 channels, 7 / 128 / 512 taps, and
- modal_filter  Hyena-LI's taps from its poles, G = 2048, N = 16, T in {8k, 32k}, and
- modal_conv  Hyena-LI's gated long convolution by its recurrence, at fft_conv's shapes and
            one 32k row of 2048 channels
            (bench/mixer_kernel_cases.py says what runs and how FLOPs and bytes are counted).
Rows: `stripes` (the public function: Triton on CUDA), the module's `reference` run eagerly
(the plain-PyTorch anchor, "torch"; for linear_ce that anchor is what the model did before,
bf16 F.linear then F.cross_entropy in float32, and the float32 reference is an extra row),
torch.compile of the reference (rmsnorm, swiglu), and the "anchor": liger-kernel's fused
ops, fla's chunk_retention for retention, mamba_ssm's mamba_chunk_scan_combined for ssd
("not installed" when it is missing, the run goes on).

Columns: median ms of CUDA-event-timed repeats after warm-up, L2 flushed before each repeat
(time.perf_counter on CPU); for rmsnorm, swiglu and rotary "fwd ms" and "f+b ms" time CUDA
graph replays (the GPU work; "eager ms" is the same f+b launched from Python, which on a
fraction of a millisecond is mostly the host: bench/kernel_timing.py says why); GB/s from
the fewest bytes the function must move (inputs read once, outputs written once, backward
re-reading its saved tensors; per-row scalars such as rstd left out); "% ceiling": f+b GB/s
over a device-to-device copy (read + write bytes) timed in the same run, or TFLOP/s over a
bf16 matmul for linear_ce; peak GiB: max_memory_allocated over what the inputs already hold,
one forward+backward; vs anchor / vs torch: that anchor's f+b ms over this row's (above 1:
faster than the anchor); rel err: the largest ||out - ref|| / ||ref|| over outputs and input
gradients, against the reference in float64 on the same inputs. A stripes row above 3e-2, or
a stripes/torch row that fails, makes the exit status 1.

    python3 bench/kernels.py --out DIR [--only rmsnorm,swiglu,rotary,linear_ce,retention,ssd,
                             gated_norm,causal_conv,fft_conv,toeplitz_conv,
                             modal_filter,modal_conv]
                             [--quick]

liger entry points (0.8.5), each called with liger's defaults unless said: rmsnorm
LigerRMSNormFunction.apply(x, w, eps) (llama casting, in_place: dx overwrites dy) and, for
the all-bf16 residual case, LigerFusedAddRMSNormFunction.apply(x, residual, w, eps) -> (y, h)
(it stores h in x's dtype, so the float32-residual case has no liger row); swiglu
LigerSiLUMulFunction.apply(gate, up) (backward overwrites gate and up); rotary
LigerRopeFunction.apply(q, k, cos, sin) with q, k as [B, H, T, Dh] views of [B, T, H, Dh] and
[T, Dh] duplicated tables (rotates q, k in place, and dq, dk in backward); linear_ce
LigerFusedLinearCrossEntropyFunction.apply(x, w, targets, ...) with accum_dtype=float32 (the
anchor: stripes accumulates dW in float32) and with its default (dW in the weight's dtype).
Inputs an impl overwrites are restored before every repeat, outside the timed region.
The commit is read from .git; set STRIPES_COMMIT where the tree has no .git.

--quick: tiny, awkward shapes. On CPU the public functions take their reference path,
torch.compile uses the aot_eager backend and liger rows are skipped, so CI runs every row.
Writes DIR/kernels.json (device, versions, commit, date, every row) and DIR/kernels.md.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from kernel_timing import (
    TOL,
    Case,
    Impl,
    Runner,
    Tensors,
    anchor_op,
    ceilings,
    compiled,
    first_line,
    float64_reference,
    fwd_bwd,
    measure,
    restorer,
    table,
    version,
    write_results,
)
from mixer_kernel_cases import (
    causal_conv_cases,
    fft_conv_cases,
    gated_norm_cases,
    modal_conv_cases,
    modal_filter_cases,
    retention_cases,
    ssd_cases,
    toeplitz_conv_cases,
)

from stripes.arch.rope import RopeConfig, rope_angles

KERNELS = ("rmsnorm", "swiglu", "rotary", "linear_ce", "retention", "ssd", "gated_norm",
           "causal_conv", "fft_conv", "toeplitz_conv", "modal_filter", "modal_conv")
MATMUL_BOUND = {"linear_ce", "retention", "ssd"}  # their "% ceiling" is against a bf16 matmul
EPS = 1e-6
BF16, F32 = torch.bfloat16, torch.float32


def rmsnorm_case(device: torch.device, n: int, d: int, label: str, xt, wt, rt, norm,
                 add_norm, why: str, why_add: str) -> Case:
    from stripes.kernels.rmsnorm import reference, rms_norm

    x = torch.randn(n, d, device=device, dtype=xt, requires_grad=True)
    w = (1 + 0.1 * torch.randn(d, device=device)).to(wt).requires_grad_()
    bx, bw, e = x.element_size(), w.element_size(), n * d
    if rt is None:
        inputs, grads = [x, w], [torch.randn(n, d, device=device, dtype=xt)]
        names = ["y", "dx", "dw"]
        fwd_bytes = 2 * e * bx + bw * d  # read x, w; write y
        bwd_bytes = 3 * e * bx + 2 * bw * d  # read dy, x, w; write dx, dw
    else:
        res = torch.randn(n, d, device=device, dtype=rt, requires_grad=True)
        inputs = [x, w, res]
        grads = [torch.randn(n, d, device=device, dtype=rt) for _ in range(2)]  # dy, dh
        names = ["y", "h", "dx", "dw", "dres"]
        br = res.element_size()  # y and h are in the residual's dtype
        fwd_bytes = e * (bx + br) + bw * d + 2 * e * br  # read x, res, w; write y, h
        # read dy, dh, h; write dx and, when its dtype differs, dres (else dres is dx itself)
        bwd_bytes = 3 * e * br + e * (bx + (br if rt != xt else 0)) + 2 * bw * d
    args = lambda ts: (ts[0], ts[1], EPS, *ts[2:])  # every impl is fn(x, w, eps[, residual])

    def impl(name: str, role: str, fn: Callable, setup=None, note: str = "") -> Impl:
        forward = lambda: fn(*args(inputs))
        return Impl(name, role, fwd_bwd(forward, inputs, grads), forward, setup, note)

    compiled_ref, compile_note = compiled(reference.rms_norm, device)
    impls = [impl("reference (eager)", "torch", reference.rms_norm),
             impl("torch.compile(reference)", "extra", compiled_ref, note=compile_note),
             impl("stripes", "stripes", rms_norm)]
    if rt is None and norm is not None:
        # llama casting, in_place=True (liger's defaults): dx is written into dy.
        impls.append(impl("liger LigerRMSNormFunction", "anchor",
                          lambda x, w, eps: norm.apply(x, w, eps), restorer(*grads)))
    elif rt is None:
        impls.append(Impl("liger LigerRMSNormFunction", "anchor", None, note=why))
    elif add_norm is not None and rt == xt == wt:
        # apply(X, R, W, eps) -> (Y, S = X + R); in_place=False by default.
        impls.append(impl("liger LigerFusedAddRMSNormFunction", "anchor",
                          lambda x, w, eps, r: add_norm.apply(x, r, w, eps)))
    else:
        impls.append(Impl("liger LigerFusedAddRMSNormFunction", "anchor", None,
                          note=why_add or "skipped: liger keeps h in x's dtype (bf16)"))
    expected = float64_reference(lambda *ts: reference.rms_norm(*args(ts)), inputs, grads)
    return Case("rmsnorm", f"{n}x{d} {label}", names, expected, impls, fwd_bytes,
                fwd_bytes + bwd_bytes, graph=True)


def rmsnorm_cases(device: torch.device, quick: bool) -> Iterator[Case]:
    n, d = (300, 200) if quick else (65536, 2048)
    norm, why = anchor_op("liger_kernel.ops.rms_norm", "LigerRMSNormFunction", device)
    add_norm, why_add = anchor_op("liger_kernel.ops.fused_add_rms_norm",
                              "LigerFusedAddRMSNormFunction", device)
    for label, xt, wt, rt in (("x bf16, w fp32", BF16, F32, None), ("all bf16", BF16, BF16, None),
                              ("+res: x bf16, res fp32, w fp32", BF16, F32, F32),
                              ("+res: all bf16", BF16, BF16, BF16)):
        yield rmsnorm_case(device, n, d, label, xt, wt, rt, norm, add_norm, why, why_add)


def swiglu_cases(device: torch.device, quick: bool) -> Iterator[Case]:
    from stripes.kernels.swiglu import reference, swiglu

    n, d = (300, 200) if quick else (65536, 2048)
    silu_mul, why = anchor_op("liger_kernel.ops.swiglu", "LigerSiLUMulFunction", device)
    gate, up = (torch.randn(n, d, device=device, dtype=BF16, requires_grad=True)
                for _ in range(2))
    inputs, grads = [gate, up], [torch.randn(n, d, device=device, dtype=BF16)]
    impl = lambda name, role, fn, setup=None, note="": Impl(
        name, role, fwd_bwd(lambda: fn(gate, up), inputs, grads), lambda: fn(gate, up), setup,
        note)
    compiled_ref, compile_note = compiled(reference.swiglu, device)
    impls = [impl("reference (eager)", "torch", reference.swiglu),
             impl("torch.compile(reference)", "extra", compiled_ref, note=compile_note),
             impl("stripes", "stripes", swiglu)]
    if silu_mul is not None:
        # Its backward writes d_gate and d_up into gate and up themselves.
        impls.append(impl("liger LigerSiLUMulFunction", "anchor",
                          lambda g, u: silu_mul.apply(g, u), restorer(gate, up)))
    else:
        impls.append(Impl("liger LigerSiLUMulFunction", "anchor", None, note=why))
    expected = float64_reference(reference.swiglu, inputs, grads)
    e, b = n * d, 2
    # forward reads gate, up and writes out; backward reads gate, up, grad, writes 2 grads
    yield Case("swiglu", f"{n}x{d} bf16", ["out", "dgate", "dup"], expected, impls,
               3 * e * b, 8 * e * b, graph=True)


def rotary_cases(device: torch.device, quick: bool) -> Iterator[Case]:
    from stripes.kernels.rotary import apply_rotary, apply_rotary_qk, reference

    B, T, H, Dh = (2, 40, 3, 34) if quick else (4, 4096, 32, 128)
    rope, why = anchor_op("liger_kernel.ops.rope", "LigerRopeFunction", device)
    cos, sin = rope_angles(torch.arange(T, device=device), Dh, RopeConfig())  # [T, Dh/2] float32
    q, k = (torch.randn(B, T, H, Dh, device=device, dtype=BF16, requires_grad=True)
            for _ in range(2))
    inputs = [q, k]
    grads = [torch.randn(B, T, H, Dh, device=device, dtype=BF16) for _ in range(2)]

    def both(fn: Callable) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        return lambda: (fn(q, cos, sin), fn(k, cos, sin))

    impl = lambda name, role, forward, setup=None, note="": Impl(
        name, role, fwd_bwd(forward, inputs, grads), forward, setup, note)
    impls = [impl("reference (eager)", "torch", both(reference.apply_rotary)),
             impl("stripes apply_rotary_qk (one launch)", "stripes",
                  lambda: apply_rotary_qk(q, k, cos, sin)),
             impl("stripes apply_rotary, q then k", "extra", both(apply_rotary))]
    if rope is not None:
        # liger takes q, k as [B, H, T, Dh] views of [B, T, H, Dh] memory, rotates them in
        # place (its backward rotates dq, dk in place too) and reads the first Dh/2 columns
        # of [T, Dh] tables (HF's duplicated cos, sin).
        cos2, sin2 = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)

        def liger_rope() -> tuple[torch.Tensor, torch.Tensor]:
            qo, ko = rope.apply(q.transpose(1, 2), k.transpose(1, 2), cos2, sin2)
            return qo.transpose(1, 2), ko.transpose(1, 2)
        impls.append(impl("liger LigerRopeFunction", "anchor", liger_rope,
                          restorer(q, k, *grads)))
    else:
        impls.append(Impl("liger LigerRopeFunction", "anchor", None, note=why))
    expected = float64_reference(
        lambda q64, k64: (reference.apply_rotary(q64, cos.double(), sin.double()),
                          reference.apply_rotary(k64, cos.double(), sin.double())),
        inputs, grads)
    one_pass = 4 * B * T * H * Dh * 2 + 2 * T * (Dh // 2) * 4  # q, k in and out; cos, sin
    yield Case("rotary", f"q,k [{B},{T},{H},{Dh}] bf16", ["q_out", "k_out", "dq", "dk"],
               expected, impls, one_pass, 2 * one_pass, graph=True)


def linear_ce_expected(reference: Callable, x, w, targets, chunk: int) -> Tensors:
    """The float64 reference's loss and gradients, "sum" over row chunks then divided by the
    count: the same numbers as one "mean" call without N x V float64 logits at once."""
    x64, w64 = x.detach().double(), w.detach().double().requires_grad_()
    count = max(int((targets != -100).sum()), 1)
    loss, dx, dw = x64.new_zeros(()), torch.empty_like(x64), torch.zeros_like(w64)
    for lo in range(0, x.shape[0], chunk):
        xc = x64[lo:lo + chunk].requires_grad_()
        part = reference(xc, w64, targets[lo:lo + chunk], reduction="sum")
        gx, gw = torch.autograd.grad(part, (xc, w64))
        loss += part.detach()
        dx[lo:lo + chunk] = gx
        dw += gw
    return [loss / count, dx / count, dw / count]


def linear_ce_cases(device: torch.device, quick: bool) -> Iterator[Case]:
    from stripes.kernels.linear_ce import linear_cross_entropy, reference

    N, D, V = (300, 64, 1000) if quick else (32768, 2048, 32000)
    flce, why = anchor_op("liger_kernel.ops.fused_linear_cross_entropy",
                      "LigerFusedLinearCrossEntropyFunction", device)
    x = torch.randn(N, D, device=device, dtype=BF16, requires_grad=True)
    w = (0.02 * torch.randn(V, D, device=device)).to(BF16).requires_grad_()  # logits ~ N(0, 1)
    targets = torch.randint(0, V, (N,), device=device)
    targets[torch.rand(N, device=device) < 0.05] = -100  # some masked tokens, as in packing
    inputs = [x, w]
    impl = lambda name, role, forward, note="": Impl(
        name, role, fwd_bwd(forward, inputs, None), None, None, note)
    impls = [impl("torch: F.linear bf16 + CE fp32", "torch",
                  lambda: F.cross_entropy(F.linear(x, w).float(), targets)),
             impl("reference (F.linear fp32)", "extra",
                  lambda: reference.linear_cross_entropy(x, w, targets)),
             impl("stripes", "stripes", lambda: linear_cross_entropy(x, w, targets))]
    if flce is not None:
        # apply(_input, weight, target, bias, ce_weight, ignore_index, lse_square_scale,
        #       label_smoothing, reduction, softcap, return_z_loss, accum_dtype) -> (loss, ...)
        impls.append(impl("liger FLCE, dW accum fp32", "anchor", lambda: flce.apply(
            x, w, targets, None, None, -100, 0.0, 0.0, "mean", None, False, F32)[0]))
        impls.append(impl("liger FLCE, default (dW accum bf16)", "extra",
                          lambda: flce.apply(x, w, targets)[0]))
    else:
        impls.append(Impl("liger FLCE, dW accum fp32", "anchor", None, note=why))
    expected = linear_ce_expected(reference.linear_cross_entropy, x, w, targets,
                                  chunk=N if quick else 2048)
    yield Case("linear_ce", f"N{N} D{D} V{V} bf16", ["loss", "dx", "dw"], expected, impls,
               fb_flops=6.0 * N * D * V)  # logits, grad_x, grad_W: 2NDV each


BUILDERS = {"rmsnorm": rmsnorm_cases, "swiglu": swiglu_cases, "rotary": rotary_cases,
            "linear_ce": linear_ce_cases, "retention": retention_cases, "ssd": ssd_cases,
            "gated_norm": gated_norm_cases, "causal_conv": causal_conv_cases,
            "fft_conv": fft_conv_cases, "toeplitz_conv": toeplitz_conv_cases,
            "modal_filter": modal_filter_cases,
            "modal_conv": modal_conv_cases}


def write_report(args: argparse.Namespace, rows: list[dict]) -> str:
    """Writes DIR/kernels.json and DIR/kernels.md for the rows so far; returns the text."""
    copy_gbs = rows[0]["fb_gbs"]
    mm_tflops = next((r["fb_tflops"] for r in rows if r["kernel"] == "matmul"), None)
    for r in rows:
        if r["role"] != "ceiling" and "fb_gbs" in r:
            r["pct_ceiling"] = 100 * r["fb_gbs"] / copy_gbs
        elif r["role"] != "ceiling" and "fb_tflops" in r and mm_tflops:
            r["pct_ceiling"] = 100 * r["fb_tflops"] / mm_tflops
    fields = {"triton": version("triton"), "liger_kernel": version("liger-kernel"),
              "quick": args.quick, "copy_gbs": copy_gbs, "matmul_tflops": mm_tflops,
              "rel_err_tolerance": TOL, "rows": rows}
    note = (f"  triton {fields['triton']}  liger-kernel {fields['liger_kernel']}"
            f"{'  (--quick)' if args.quick else ''}")
    return write_results(args.out, "kernels", fields, table(rows), note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="writes kernels.json here")
    parser.add_argument("--only", default=",".join(KERNELS),
                        help=f"comma-separated subset of {','.join(KERNELS)}")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CI, smoke test)")
    args = parser.parse_args()
    only = [k for k in args.only.split(",") if k]
    if not only or set(only) - set(KERNELS):
        parser.error(f"--only takes names from {','.join(KERNELS)}, got {args.only!r}")
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runner = Runner(device, args.quick)
    rows = ceilings(runner, device, args.quick, matmul=bool(MATMUL_BOUND & set(only)))
    for kernel in (k for k in KERNELS if k in only):
        try:
            for case in BUILDERS[kernel](device, args.quick):
                rows += measure(runner, case)
                del case
                write_report(args, rows)  # what a run cut short has measured
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        except Exception as err:  # a kernel whose inputs cannot even be built
            traceback.print_exc()
            rows.append({"kernel": kernel, "case": "", "impl": "stripes", "role": "stripes",
                         "status": "error", "note": f"error building the case: {first_line(err)}"})
    print(write_report(args, rows))
    failed = [r for r in rows if (r["role"] in ("stripes", "torch") and r["status"] == "error")
              or (r["role"] == "stripes" and r["status"] == "ok" and not r["max_rel_err"] < TOL)]
    for r in failed:
        print(f"FAILED: {r['kernel']} {r['case']} {r['impl']}: {r['note']}", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
