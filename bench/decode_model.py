"""Decoding throughput of whole models: tokens/s of one `StripedLM.step` for a batch of
sequences at long contexts, and the decoding state's memory, Transformer beside hybrid.

Each architecture (default transformer-1b and hybrid-1b) is built with random bf16 weights,
its decoding state allocated for `batch` sequences as if `ctx` tokens had been read (every
layer's state filled as bench/decode_step.py does: KV caches up to ctx, recurrent states
with random values; the work of a step does not depend on what they hold), and the step
of the whole model (embedding, every layer, head) timed eagerly and, on a GPU, as a CUDA
graph replay the way `generate` decodes there (positions on the device, every replay a new
token: arch/generate.py). tokens/s = batch / the graph's step time where there is one.
The anchor is the first architecture: each row gives its tokens/s and state memory as
ratios to the anchor's at the same batch and context.

    python3 bench/decode_model.py --out DIR [--archs A.yaml,B.yaml] [--batches 1,64]
                                  [--contexts 4096,32768,131072] [--quick]

Writes DIR/decode_model.json and DIR/decode_model.md. --quick: configs/arch/tiny.yaml at
batches 1, 2 and contexts 16, 32 on whatever device is there (CI runs it on CPU).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from decode_step import fill, time_steps
from kernel_timing import capture, write_results

from stripes.arch.config import ArchFile
from stripes.arch.generate import decode_state_bytes
from stripes.arch.model import StripedLM
from stripes.core.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def measure(model: StripedLM, name: str, batch: int, ctx: int, device: torch.device,
            reps: int) -> dict:
    row = {"arch": name, "batch": batch, "ctx": ctx}
    try:
        state = model.allocate_state(batch, ctx + 4 * reps + 8, device, torch.bfloat16)
        generator = torch.Generator(device=device).manual_seed(0)
        for layer in state.layers:
            fill(layer, ctx, generator)
        state.length = ctx
        row["state_gib"] = decode_state_bytes(state) / 2**30
        token = torch.randint(0, model.cfg.vocab_size, (batch, 1), device=device,
                              generator=generator)
        with torch.no_grad():
            for _ in range(2):
                model.step(token, state)
            row["eager_ms"] = time_steps(lambda: model.step(token, state), device, reps)
            if device.type == "cuda":  # as generate runs it: positions on the device
                model.track_position_on_device(state)
                graph = capture(lambda: model.step(token, state))
                row["graph_ms"] = time_steps(graph.replay, device, reps)
        best = row.get("graph_ms", row["eager_ms"])
        row["tokens_per_s"] = batch / best * 1e3
        row["status"] = "ok"
    except Exception as err:  # out of memory at one size keeps the other rows
        row["status"] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
    return row


def table(rows: list[dict]) -> str:
    lines = ["| arch | batch | context | state GiB | eager ms | graph ms | tokens/s | "
             "tokens/s vs anchor | state vs anchor | note |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    anchor_name = rows[0]["arch"] if rows else ""
    for r in rows:
        anchor = next((a for a in rows if a["arch"] == anchor_name and a["batch"] == r["batch"]
                       and a["ctx"] == r["ctx"] and a["status"] == "ok"), None)
        ok = r["status"] == "ok" and anchor is not None
        cells = [r["arch"], str(r["batch"]), str(r["ctx"]),
                 f"{r['state_gib']:.3f}" if "state_gib" in r else "",
                 f"{r['eager_ms']:.3f}" if "eager_ms" in r else "",
                 f"{r['graph_ms']:.3f}" if "graph_ms" in r else "",
                 f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "",
                 f"{r['tokens_per_s'] / anchor['tokens_per_s']:.2f}x" if ok else "",
                 f"{r['state_gib'] / anchor['state_gib']:.3f}x" if ok else "",
                 "" if r["status"] == "ok" else r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--archs", default="configs/arch/transformer-1b.yaml,"
                        "configs/arch/hybrid-1b.yaml", help="the first is the anchor")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--contexts", default="4096,32768,131072")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.archs, args.batches, args.contexts, args.reps = ("configs/arch/tiny.yaml", "1,2",
                                                              "16,32", 3)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for arch in args.archs.split(","):
        cfg = load_config(ArchFile, ROOT / arch).model
        torch.manual_seed(0)
        with torch.device("meta"):
            model = StripedLM(cfg)
        model.to_empty(device=device)
        model.init_weights()
        model = model.to(torch.bfloat16).eval()
        for batch in (int(b) for b in args.batches.split(",")):
            for ctx in (int(c) for c in args.contexts.split(",")):
                rows.append(measure(model, Path(arch).stem, batch, ctx, device, args.reps))
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # the last state is gone with its frame
        del model
    text = write_results(args.out, "decode_model", {"archs": args.archs, "rows": rows},
                         table(rows), note=f"  anchor {Path(args.archs.split(',')[0]).stem}")
    print(text)
    failed = [r for r in rows if r["status"] != "ok"]
    raise SystemExit(1 if failed and args.quick else 0)


if __name__ == "__main__":
    main()
