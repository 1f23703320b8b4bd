"""One decoding step of one layer of each mixer, for a batch of sequences at long contexts.

Every mixer of an architecture file (default configs/arch/hybrid-1b.yaml: Mamba-2, Hyena-LI,
retention, GQA attention at d_model 2048) is built alone, its decoding state allocated for
`--batch` sequences as if `ctx` tokens had been read (the KV cache filled with random keys
and values up to ctx, a recurrent state with random values: the step's work does not depend
on what the state holds), and `step` timed on one new token per sequence, bf16 weights and
activations. The step is timed twice: launched eagerly (what generation pays today) and as
a CUDA graph replay (the GPU work alone; a replay repeats the captured position, which
leaves the work per step unchanged). Ratio: attention's step time over each mixer's at the
same context.

    python3 bench/decode_step.py --out DIR [--arch FILE] [--batch 64]
                                 [--contexts 4096,32768,131072] [--quick]

Writes DIR/decode_step.json and DIR/decode_step.md. --quick: configs/arch/tiny.yaml at
batch 2 and contexts 16, 32 on whatever device is there (CI runs it on CPU, eager only).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch
from kernel_timing import capture, write_results

from stripes.arch.config import ArchFile
from stripes.arch.registry import get_mixer
from stripes.core.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def one_of_each_kind(arch: Path) -> dict[str, object]:
    """{layer name: its mixer config}, the first layer of every distinct name."""
    model = load_config(ArchFile, arch).model
    kinds: dict[str, object] = {}
    for spec in model.expand():
        kinds.setdefault(spec.name, (spec.kind, spec.mixer, model.d_model))
    return kinds


def fill(state, ctx: int, generator: torch.Generator) -> None:
    """Random values in every tensor of the state, the position set to ctx where kept."""
    for field in dataclasses.fields(state):
        value = getattr(state, field.name)
        if isinstance(value, torch.Tensor):
            noise = torch.randn(value.shape, generator=generator, dtype=torch.float32,
                                device=value.device)
            value.copy_((0.1 * noise).to(value.dtype) if not value.is_complex()
                        else torch.complex(0.1 * noise, 0.1 * noise).to(value.dtype))
        elif field.name == "length":
            setattr(state, field.name, ctx)


def time_steps(step, device: torch.device, reps: int) -> float:
    """Median ms of one call of step()."""
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            step()
            times.append(1e3 * (time.perf_counter() - start))
        return statistics.median(times)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(name, kind, cfg, d_model, batch, ctx, device, reps) -> dict:
    row = {"mixer": name, "kind": kind, "ctx": ctx, "batch": batch}
    mixer = get_mixer(kind).module(d_model, cfg).to(device=device, dtype=torch.bfloat16)
    mixer.init_weights(0.02, 0.02)
    mixer.eval()
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 1, d_model, device=device, generator=generator,
                    dtype=torch.float32).to(torch.bfloat16)
    row["state_gib"] = mixer.state_bytes(batch, ctx + reps + 8, torch.bfloat16) / 2**30
    try:
        state = mixer.allocate_state(batch, ctx + 4 * reps + 8, device, torch.bfloat16)
        fill(state, ctx, generator)
        with torch.no_grad():
            for _ in range(2):
                mixer.step(x, state)
            row["eager_ms"] = time_steps(lambda: mixer.step(x, state), device, reps)
            if device.type == "cuda":
                graph = capture(lambda: mixer.step(x, state))
                row["graph_ms"] = time_steps(graph.replay, device, reps)
        row["status"] = "ok"
    except Exception as err:  # one mixer's failure (memory, capture) keeps the others
        row["status"] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
    return row


def table(rows: list[dict]) -> str:
    lines = ["| mixer | context | state GiB | eager ms | graph ms | attention / this (graph) |"
             " note |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        attn = next((a for a in rows if a["kind"] == "attn" and a["ctx"] == r["ctx"]
                     and "graph_ms" in a), None)
        ratio = (f"{attn['graph_ms'] / r['graph_ms']:.2f}" if attn and "graph_ms" in r
                 else "")
        cells = [r["mixer"], str(r["ctx"]), f"{r['state_gib']:.3f}",
                 f"{r['eager_ms']:.3f}" if "eager_ms" in r else "",
                 f"{r['graph_ms']:.3f}" if "graph_ms" in r else "", ratio,
                 "" if r["status"] == "ok" else r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--arch", type=Path, default=ROOT / "configs/arch/hybrid-1b.yaml")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--contexts", default="4096,32768,131072")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.arch, args.batch, args.contexts, args.reps = (ROOT / "configs/arch/tiny.yaml", 2,
                                                           "16,32", 3)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    contexts = [int(c) for c in args.contexts.split(",")]
    rows = []
    for ctx in contexts:
        for name, (kind, cfg, d_model) in one_of_each_kind(args.arch).items():
            rows.append(measure(name, kind, cfg, d_model, args.batch, ctx, device, args.reps))
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the last mixer's cache is gone with its frame
    text = write_results(args.out, "decode_step",
                         {"arch": str(args.arch), "batch": args.batch, "rows": rows},
                         table(rows), note=f"  batch {args.batch}  {args.arch.name}")
    print(text)
    failed = [r for r in rows if r["status"] != "ok"]
    raise SystemExit(1 if failed and args.quick else 0)


if __name__ == "__main__":
    main()
