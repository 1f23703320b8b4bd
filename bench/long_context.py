"""Long context on one GPU (issue 9): the longest sequence each model trains a step at, and
its tokens/s at 8k, 32k, 64k and 128k beside the Transformer's (the issue asks 2x at
32k or more).

Per model (configs/arch/<name>.yaml; hybrid-1b and transformer-1b by default): the
trainer's model code (StripedLM) with block activation checkpointing
(train/recompute.py), float32 weights under bf16 autocast, fused AdamW, micro-batch 1, random
tokens as one document. One step is forward, backward and the optimizer.
- max length: a step at 8k, 16k, ... doubling up to --max-len; the longest that fits in
  memory and its peak (the search stops at the first out-of-memory).
- tokens/s: median step time over --steps steps after --warmup, at each of --lengths; MFU
  from the model's own FLOP count (3x the forward, recomputation not counted) against the
  device's bf16 peak; the ratio to the first model of --models (the anchor), same run.

    python3 bench/long_context.py --out DIR [--models hybrid-1b,transformer-1b]
                                  [--lengths 8192,32768,65536,131072] [--max-len 131072] [--quick]

--quick: configs/arch/tiny.yaml twice (as if two models) on CPU at 64-256 tokens (CI).
Writes DIR/long_context.json and DIR/long_context.md after each model.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from kernel_timing import write_results

from stripes.arch import ArchFile, StripedLM
from stripes.core.config import load_config
from stripes.train.metrics import peak_flops
from stripes.train.recompute import apply_activation_checkpointing

ROOT = Path(__file__).resolve().parents[1]


class Trainer:
    """One model, its optimizer and a step function at any length."""

    def __init__(self, name: str, device: torch.device) -> None:
        cfg = load_config(ArchFile, ROOT / "configs" / "arch" / f"{name}.yaml").model
        torch.manual_seed(0)
        with torch.device("meta"):
            self.model = StripedLM(cfg)
        self.model.to_empty(device=device)
        self.model.init_weights()
        apply_activation_checkpointing(self.model, "block")
        cuda = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5, fused=cuda)
        self.autocast = torch.autocast("cuda", torch.bfloat16) if cuda else nullcontext()
        self.device, self.vocab = device, cfg.vocab_size

    def step(self, length: int) -> None:
        ids = torch.randint(0, self.vocab, (1, length + 1), device=self.device)
        with self.autocast:
            loss = self.model.loss(ids[:, :-1], ids[:, 1:])
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def seconds(self, length: int, steps: int, warmup: int) -> float:
        for _ in range(warmup):
            self.step(length)
        times = []
        for _ in range(steps):
            sync(self.device)
            start = time.perf_counter()
            self.step(length)
            sync(self.device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def measure(name: str, device: torch.device, lengths: list[int], max_len: int, first: int,
            steps: int, warmup: int) -> dict:
    trainer = Trainer(name, device)
    peak = peak_flops(device)
    row = {"model": name, "params": sum(p.numel() for p in trainer.model.parameters()),
           "fits": {}, "speed": {}}
    length = first
    while length <= max_len:  # the longest step that fits, doubling
        free(device)
        try:
            trainer.step(length)
            sync(device)
            row["fits"][length] = (torch.cuda.max_memory_allocated() / 2**30
                                   if device.type == "cuda" else None)
        except Exception as err:
            if not out_of_memory(err):
                raise
            trainer.optimizer.zero_grad(set_to_none=True)
            row["oom_at"] = length
            break
        log(f"{name}: a step at {length} fits")
        length *= 2
    row["max_len"] = max(row["fits"], default=None)
    for length in lengths:
        free(device)
        if length not in row["fits"]:
            row["speed"][length] = {"status": "out of memory" if row.get("oom_at", 1 << 62)
                                    <= length else "not tried"}
            continue
        seconds = trainer.seconds(length, steps, warmup)
        flops = 3 * trainer.model.flops_per_token(length) * length
        row["speed"][length] = {"status": "ok", "step_s": seconds,
                                "tokens_per_s": length / seconds,
                                "mfu": flops / seconds / peak if peak else None}
        log(f"{name}: {length} tokens a step, {length / seconds:,.0f} tokens/s")
    del trainer
    free(device)
    return row


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def table(rows: list[dict], lengths: list[int]) -> str:
    anchor = rows[0]
    lines = ["| model | params | longest step that fits (peak GiB) | "
             + " | ".join(f"tokens/s at {n} (vs {anchor['model']})" for n in lengths) + " |",
             "|---|---:|---|" + "---:|" * len(lengths)]
    for row in rows:
        longest = row["max_len"]
        peak = row["fits"].get(longest) if longest else None
        cells = [f"{longest} ({peak:.1f})" if peak is not None else str(longest)]
        for n in lengths:
            speed, base = row["speed"][n], anchor["speed"][n]
            if speed["status"] != "ok":
                cells.append(speed["status"])
                continue
            ratio = (f" ({speed['tokens_per_s'] / base['tokens_per_s']:.2f}x)"
                     if base["status"] == "ok" else "")
            mfu = f", {100 * speed['mfu']:.0f}% MFU" if speed["mfu"] else ""
            cells.append(f"{speed['tokens_per_s']:,.0f}{mfu}{ratio}")
        lines.append(f"| {row['model']} | {row['params'] / 1e9:.2f}B | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", default="transformer-1b,hybrid-1b",
                        help="configs/arch names; the first is the anchor of the ratios")
    parser.add_argument("--lengths", default="8192,32768,65536,131072")
    parser.add_argument("--max-len", type=int, default=131072)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        models, lengths, max_len, first = ["tiny", "tiny"], [64, 128], 256, 64
    else:
        models = [m for m in args.models.split(",") if m]
        lengths = [int(n) for n in args.lengths.split(",") if n]
        max_len, first = args.max_len, 8192
    missing = [m for m in models if not (ROOT / "configs" / "arch" / f"{m}.yaml").exists()]
    if missing or not models:
        parser.error(f"--models: no configs/arch/{missing[0] if missing else ''}.yaml")
    rows = []
    for name in models:
        rows.append(measure(name, device, lengths, max_len, first, args.steps, args.warmup))
        text = write_results(args.out, "long_context", {"rows": rows}, table(rows, lengths))
    print(text)


if __name__ == "__main__":
    main()
