"""Where the fused linear cross-entropy's time goes, and the settings it was tuned by. CUDA only.

The case is bench/kernels.py's: N = 32,768 tokens, D = 2048, V = 32,000, bf16. Three parts:
- rows kernel: the cross-entropy pass over one chunk of logits (2048 x 32,000, the default
  chunk) for each BLOCK_V x num_warps, each launch captured in a CUDA graph and its replays
  timed; checked against a float32 softmax of the same logits. GB/s counts one read and one
  write of the chunk.
- chunks: the whole loss, forward+backward, at chunk_tokens 1024 ... 8192 beside liger-kernel's
  fused op (dW accumulated in float32, and its default bf16), timed in turns (every
  implementation once per round, L2 flushed before each) so that clock drift under a long
  run hits them alike; median, p10 and p90 ms and peak GiB over the inputs.
- per chunk: each operation of one default chunk alone, graph-timed: the logits matmul, the
  rows kernel, grad_x's matmul, and grad_W's matmul accumulated in float32 (what stripes
  does) and in bf16 (liger's default).

    python3 bench/linear_ce_sweep.py [--rounds 25] [--out DIR]   (DIR/linear_ce_sweep.json)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from kernel_timing import capture

from stripes.kernels.linear_ce import kernel, linear_cross_entropy

N, D, V = 32768, 2048, 32000
CHUNK = 2048
BF16, F32 = torch.bfloat16, torch.float32


def graph_ms(fn: Callable[[], object], reps: int = 30, inner: int = 10) -> float:
    """Median ms of one fn() over CUDA graph replays of `inner` calls each."""
    graph = capture(fn, repeat=inner)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def rows_kernel_sweep(logits: torch.Tensor, targets: torch.Tensor) -> list[dict]:
    z = logits.float()
    lse = torch.logsumexp(z, dim=1)  # [C]
    want_loss = lse - z.gather(1, targets[:, None]).squeeze(1)
    want_grad = torch.softmax(z, dim=1) - F.one_hot(targets, V).float()
    losses = torch.empty(CHUNK, dtype=F32, device=logits.device)
    buf = torch.empty_like(logits)
    rows = []
    for block in (4096, 8192, 16384, 32768):
        for warps in (4, 8, 16, 32):
            def launch(block=block, warps=warps):
                kernel._cross_entropy_rows_kernel[(CHUNK,)](
                    buf, targets, losses, V, V, -100, BLOCK_V=block, ONE_BLOCK=block >= V,
                    WRITE_GRAD=True, num_warps=warps)
            buf.copy_(logits)
            launch()
            grad_err = float((buf.float() - want_grad).norm() / want_grad.norm())
            loss_err = float((losses - want_loss).norm() / want_loss.norm())
            ms = graph_ms(launch)  # rewrites the gradient in place: same work every time
            rows.append({"block_v": block, "num_warps": warps, "one_block": block >= V,
                         "ms": ms, "gbs": 2 * logits.numel() * 2 / ms / 1e6,
                         "grad_rel_err": grad_err, "loss_rel_err": loss_err})
            print(f"rows kernel BLOCK_V {block:5d} warps {warps:2d}: {1e3 * ms:6.1f} us "
                  f"{rows[-1]['gbs']:5.0f} GB/s  err {max(grad_err, loss_err):.1e}", flush=True)
    return rows


def chunk_sweep(x, w, targets, rounds: int) -> dict:
    impls: dict[str, Callable[[], object]] = {
        f"stripes chunk {c}": (lambda c=c: linear_cross_entropy(x, w, targets, chunk_tokens=c))
        for c in (1024, 2048, 4096, 8192)}
    if importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.ops.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyFunction as Liger,
        )
        impls["liger dW fp32"] = lambda: Liger.apply(
            x, w, targets, None, None, -100, 0.0, 0.0, "mean", None, False, F32)[0]
        impls["liger default (dW bf16)"] = lambda: Liger.apply(x, w, targets)[0]
    steps = {name: (lambda f=f: torch.autograd.grad(f(), (x, w))) for name, f in impls.items()}
    flush = torch.empty(256 << 20, dtype=torch.int8, device=x.device)
    out = {name: {"times": []} for name in steps}
    for name, step in steps.items():
        step()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        out[name]["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    for _ in range(rounds):
        for name, step in steps.items():
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            out[name]["times"].append(start.elapsed_time(end))
    for name, row in out.items():
        times = sorted(row.pop("times"))
        row.update(ms=statistics.median(times), p10=times[len(times) // 10],
                   p90=times[(9 * len(times)) // 10])
        print(f"{name:26s} {row['ms']:7.2f} ms (p10 {row['p10']:.2f}, p90 {row['p90']:.2f}) "
              f"peak {row['peak_gib']:.2f} GiB", flush=True)
    return out


def per_chunk_ops(x, w, targets) -> dict:
    x_c, w = x.detach()[:CHUNK], w.detach()
    logits = torch.mm(x_c, w.t())  # [C, V]
    losses = torch.empty(CHUNK, dtype=F32, device=x.device)
    grad_x = torch.empty(CHUNK, D, dtype=BF16, device=x.device)
    grad_w32 = torch.zeros(V, D, dtype=F32, device=x.device)
    grad_w16 = torch.zeros(V, D, dtype=BF16, device=x.device)
    block, warps = kernel._launch_config(V)
    ops = {
        "logits = x_c @ W^T": lambda: torch.mm(x_c, w.t(), out=logits),
        "rows kernel (default launch)": lambda: kernel._cross_entropy_rows_kernel[(CHUNK,)](
            logits, targets[:CHUNK], losses, V, V, -100, BLOCK_V=block, ONE_BLOCK=block >= V,
            WRITE_GRAD=True, num_warps=warps),
        "grad_x_c = dlogits @ W": lambda: torch.mm(logits, w, out=grad_x),
        "grad_W += dlogits^T @ x_c, float32": lambda: kernel._accumulate_f32(
            grad_w32, logits.t(), x_c),
        "grad_W += dlogits^T @ x_c, bf16": lambda: grad_w16.addmm_(logits.t(), x_c),
    }
    out = {name: graph_ms(fn) for name, fn in ops.items()}
    for name, ms in out.items():
        print(f"per chunk: {name:36s} {1e3 * ms:7.1f} us", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/linear_ce_sweep.py: needs a CUDA device")
    torch.manual_seed(0)
    x = torch.randn(N, D, device="cuda", dtype=BF16, requires_grad=True)
    w = (0.02 * torch.randn(V, D, device="cuda")).to(BF16).requires_grad_()  # logits ~ N(0, 1)
    targets = torch.randint(0, V, (N,), device="cuda")
    targets[torch.rand(N, device="cuda") < 0.05] = -100
    with torch.no_grad():
        chunk_logits = torch.mm(x[:CHUNK], w.t())
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "rows_kernel": rows_kernel_sweep(chunk_logits, targets[:CHUNK].clamp(min=0)),
              "chunks": chunk_sweep(x, w, targets, args.rounds),
              "per_chunk_ms": per_chunk_ops(x, w, targets)}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "linear_ce_sweep.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
