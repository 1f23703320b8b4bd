"""Fused projections (arch/projection.py) against separate Linears and one Linear split by
autograd, forward+backward, at hybrid-1b's projection shapes.

Each case is x [N, D] bf16 (what the norm before a mixer writes under autocast) times float32
weights under bf16 autocast, as in training; the step's loss weights every output piece by a
fixed random tensor, so each piece gets its own gradient, as the ops after it would give it:
- `separate`: one nn.Linear per piece (x's gradient is the sum of their gradients);
- `split`: one F.linear over the concatenated weights, split by autograd (what attention did
  before arch/projection.py; its backward copies the pieces' gradients into one tensor);
- `fused`: arch/projection.fused_linear.
Columns: median ms (triton.testing.do_bench on CUDA, L2 flushed; perf_counter on CPU), peak
memory over the inputs, and the largest relative difference of outputs and gradients against
`separate`. Ratios are separate's ms over each row's.

    python3 bench/projections.py [--tokens 16384] [--out DIR] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from stripes.arch.projection import fused_linear

# name -> (D, piece widths): hybrid-1b (d_model 2048) and transformer-1b's attention
CASES = {
    "attention q,k,v (16 heads, 4 kv)": (2048, (2048, 512, 512)),
    "retention q,k,v,gate": (2048, (2048, 2048, 2048, 2048)),
    "mamba in_proj z,xBC,dt": (2048, (4096, 4352, 64)),
    "swiglu gate,up": (2048, (5632, 5632)),
}
TINY = {name: (16, tuple(max(1, n // 256) for n in sizes)) for name, (_, sizes) in CASES.items()}


def separate(x, weights):
    return [F.linear(x, w) for w in weights]


def split(x, weights):
    return list(F.linear(x, torch.cat(weights)).split([w.shape[0] for w in weights], dim=-1))


def fused(x, weights):
    return list(fused_linear(x, weights, None, [w.shape[0] for w in weights]))


def step(impl, x, weights, probes):
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        outs = impl(x, weights)
    loss = sum((o.float() * p).sum() for o, p in zip(outs, probes, strict=True))
    return [*outs, *torch.autograd.grad(loss, [x, *weights])]


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=100)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def run_case(name: str, d: int, sizes: tuple[int, ...], tokens: int, device) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(tokens, d, device=device).bfloat16().requires_grad_()
    weights = [(torch.randn(n, d, device=device) / d ** 0.5).requires_grad_() for n in sizes]
    probes = [torch.randn(tokens, n, device=device) for n in sizes]
    reference = [t.float() for t in step(separate, x, weights, probes)]
    rows = []
    for impl in (separate, split, fused):
        got = step(impl, x, weights, probes)
        err = max(((a.float() - b).norm() / b.norm()).item()
                  for a, b in zip(got, reference, strict=True))
        del got
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(impl, x, weights, probes)
            peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
        else:
            peak = None
        ms = timed(lambda impl=impl: step(impl, x, weights, probes), device)
        rows.append({"case": name, "impl": impl.__name__, "ms": ms, "peak_gib": peak,
                     "rel_err": err})
    for row in rows:
        row["vs_separate"] = rows[0]["ms"] / row["ms"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384, help="B * T (hybrid-1b: 4 x 4096)")
    parser.add_argument("--out", type=Path, help="write DIR/projections.json")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU smoke test)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases, tokens = (TINY, 64) if args.tiny else (CASES, args.tokens)
    rows = [row for name, (d, sizes) in cases.items()
            for row in run_case(name, d, sizes, tokens, device)]
    print(f"{tokens} tokens on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    print("| case | impl | f+b ms | vs separate | peak GiB | rel. diff |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        print(f"| {r['case']} | {r['impl']} | {r['ms']:.3f} | {r['vs_separate']:.2f} | {peak} "
              f"| {r['rel_err']:.1e} |")
    worst = max(r["rel_err"] for r in rows)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "projections.json").write_text(json.dumps(rows, indent=1))
    if worst > 3e-2:
        raise SystemExit(f"bench/projections.py: a result differs from separate Linears by "
                         f"{worst:.1e} (allowed: 3e-2)")


if __name__ == "__main__":
    main()
