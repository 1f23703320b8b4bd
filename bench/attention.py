"""Attention core on a GPU: stripes' SDPA path per backend vs the raw cuDNN anchor.

Times `Attention._sdpa` (the exact call the mixer makes: GQA through `enable_gqa`, layout
transposes included) for each explicit backend and `auto`, and the masked path that packed
documents take (FLOPs counted as for the full causal square), against the anchor: PyTorch SDPA
on the cuDNN backend with K/V already expanded to all heads (MHA-shaped, as measured in
../shared/gpu/README.md). Shapes are the 1B configs': H=16, H_kv=4, Dh=128, B*T = 65,536.

    python bench/attention.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from stripes.arch.attention import Attention, AttnConfig

H, KV, DH, TOKENS = 16, 4, 128, 65536


def causal_flops(B: int, T: int) -> float:
    return 4.0 * B * H * DH * T * T / 2  # QK^T and PV, half the square under the causal mask


def time_ms(fn, backward: bool) -> float:
    if not backward:
        with torch.no_grad():
            return do_bench(fn, warmup=50, rep=300, return_mode="median")

    def fwd_bwd():
        fn().backward(grad)

    grad = fn().detach().normal_()
    return do_bench(fwd_bwd, warmup=50, rep=300, return_mode="median")


def measure(T: int) -> list[dict]:
    B = TOKENS // T
    q = torch.randn(B, T, H, DH, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, T, KV, DH, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, T, KV, DH, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    # Anchor: MHA-shaped inputs, [B, H, T, Dh], on the cuDNN backend.
    qa = q.detach().transpose(1, 2).contiguous().requires_grad_()
    ka = k.detach().repeat_interleave(H // KV, 2).transpose(1, 2).contiguous().requires_grad_()
    va = v.detach().repeat_interleave(H // KV, 2).transpose(1, 2).contiguous().requires_grad_()

    def anchor():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qa, ka, va, is_causal=True)

    variants = {"anchor: cuDNN, K/V expanded": anchor}
    for backend in ("auto", "cudnn", "flash", "efficient"):
        attn = Attention(H * DH, AttnConfig(n_heads=H, n_kv_heads=KV, backend=backend))
        variants[f"stripes attn backend={backend}"] = (
            lambda a=attn: a._sdpa(q, k, v, None, causal=True))
    # Packed rows (two documents each) need an explicit mask: what does that path cost?
    pos = torch.arange(T, device="cuda")
    doc = (pos >= T // 2).long()
    mask = ((pos[:, None] >= pos[None, :]) & (doc[:, None] == doc[None, :]))[None, None]
    auto = Attention(H * DH, AttnConfig(n_heads=H, n_kv_heads=KV))
    variants["stripes attn auto, 2 docs/row mask"] = lambda: auto._sdpa(q, k, v, mask, False)

    rows, flops = [], causal_flops(B, T)
    for name, fn in variants.items():
        row = {"T": T, "B": B, "variant": name}
        try:
            row["fwd_ms"] = time_ms(fn, backward=False)
            row["fwd_bwd_ms"] = time_ms(fn, backward=True)
            row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
            row["fwd_bwd_tflops"] = 3.5 * flops / row["fwd_bwd_ms"] / 1e9
        except RuntimeError as err:  # a backend that cannot run these inputs
            row["error"] = str(err).splitlines()[0][:120]
        rows.append(row)
    base = rows[0]
    for row in rows:
        if "fwd_ms" in row and "fwd_ms" in base:
            row["fwd_bwd_speed_vs_anchor"] = base["fwd_bwd_ms"] / row["fwd_bwd_ms"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--out", help="write all rows as JSON here")
    args = parser.parse_args()
    rows = [row for T in args.seq for row in measure(T)]
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'T':>5}  {'variant':34} {'fwd ms':>7} {'TFLOP/s':>7} {'f+b ms':>7} {'TFLOP/s':>7} "
          f"{'vs anchor':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['T']:>5}  {r['variant']:34} error: {r['error']}")
            continue
        print(f"{r['T']:>5}  {r['variant']:34} {r['fwd_ms']:7.2f} {r['fwd_tflops']:7.0f} "
              f"{r['fwd_bwd_ms']:7.2f} {r['fwd_bwd_tflops']:7.0f} "
              f"{r.get('fwd_bwd_speed_vs_anchor', float('nan')):9.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
