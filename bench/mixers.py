"""One mixer layer of each kind on a GPU, at the 1B configs' width: forward+backward time.

Anchor: the `attn` mixer (GQA 16/4 heads, cuDNN SDPA) of the same width in the same run.
Each kind runs as the model runs it on a GPU (its Triton kernels where it has them). bf16
autocast, float32 weights, d_model 2048, settings of configs/arch/sh2-1b.yaml and
hybrid-1b.yaml.

    python bench/mixers.py [--seq 2048 8192] [--tokens 16384] [--out results.json]
"""

from __future__ import annotations

import argparse
import json

import torch
from bench_mixers_settings import D, mixers
from triton.testing import do_bench


def measure(name: str, module: torch.nn.Module, T: int, tokens: int) -> dict:
    B = max(1, tokens // T)
    x = torch.randn(B, T, D, device="cuda", requires_grad=True)
    grad = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16)

    def fwd():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return module(x)

    def fwd_bwd():
        fwd().backward(grad)

    row = {"kind": name, "T": T, "B": B}
    try:
        with torch.no_grad():
            row["fwd_ms"] = do_bench(fwd, warmup=25, rep=100, return_mode="median")
        torch.cuda.reset_peak_memory_stats()
        row["fwd_bwd_ms"] = do_bench(fwd_bwd, warmup=25, rep=100, return_mode="median")
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["tokens_per_s"] = B * T / row["fwd_bwd_ms"] * 1e3
        row["model_tflops"] = 3 * module.flops_per_token(T) * B * T / row["fwd_bwd_ms"] / 1e9
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    x.grad = None
    for p in module.parameters():
        p.grad = None
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    for name, module in mixers("cuda").items():
        rows += [measure(name, module, T, args.tokens) for T in args.seq]
    anchor = {r["T"]: r for r in rows if r["kind"] == "attn"}
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'kind':10} {'T':>5} {'fwd ms':>8} {'f+b ms':>8} {'Mtok/s':>7} {'TFLOP/s':>7} "
          f"{'peak GiB':>8} {'attn/this':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['kind']:10} {r['T']:>5} {r['error']}")
            continue
        r["speed_vs_attn"] = anchor[r["T"]]["fwd_bwd_ms"] / r["fwd_bwd_ms"]
        print(f"{r['kind']:10} {r['T']:>5} {r['fwd_ms']:8.2f} {r['fwd_bwd_ms']:8.2f} "
              f"{r['tokens_per_s'] / 1e6:7.2f} {r['model_tflops']:7.0f} {r['peak_gib']:8.2f} "
              f"{r['speed_vs_attn']:9.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
