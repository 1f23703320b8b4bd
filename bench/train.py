"""Training throughput of one config on one device, where its step time goes, and the Hugging
Face Llama of the same shapes beside it in the same process.

    python3 bench/train.py [--config configs/train/bench-1b.yaml] [key=value ...]
        [--steps 20] [--warmup 5] [--hf] [--hf-compile] [--trace DIR] [--json OUT] [--tiny]

The model, engine (parallel.backend, compile, activation checkpointing), optimizer and data
loader are the trainer's own (train/loop.py's pieces) for a world of one. Then:
1. throughput: `--steps` steps after `--warmup`, with no sync but the trainer's one per step
   (it reads a step's loss once the next step is queued, train/outcomes.py): tokens/s, MFU
   (3 x the mixers' forward FLOPs per token against the device's peak, train/metrics.py),
   peak memory;
2. breakdown: `--steps` more steps with a device sync after each phase: data (next batch on
   the device), forward, backward, optimizer (clip and step); milliseconds per step and
   shares. The syncs cost a little, so the synced step is a bit longer than in 1;
3. --hf / --hf-compile: bench/hf_llama_train.py's anchor of the same shapes (the model must
   be a Llama network), and the ratio of stripes' tokens/s to it;
4. --trace DIR: one more step under torch.profiler: DIR/trace.json (chrome://tracing,
   Perfetto), DIR/ops.txt, the 40 (op, input shapes) with the most device (else CPU) time, and
   DIR/kernels.txt, the step's device kernels summed by kind (matmul, attention, optimizer,
   each Triton kernel by name, ...) and the 40 longest.
--tiny: small shapes of the same family that run on a CPU in seconds (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from hf_llama_train import TINY
from hf_llama_train import run as run_hf

from stripes.arch.model import StripedLM
from stripes.data.loader import DataLoader, TokenDataset
from stripes.train.config import TrainConfig, load_train_config
from stripes.train.distributed import init_world
from stripes.train.engine import build_engine
from stripes.train.metrics import mfu, peak_flops
from stripes.train.outcomes import StepOutcomes
from stripes.train.parallel import resolve_backend

PHASES = ("data", "forward", "backward", "optimizer")


class Trainer:
    """The trainer's step for a world of one, split into phases a clock can stop between."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg, self.world = cfg, init_world(cfg.device)
        sequences, self.accum = cfg.batch_plan(1)
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto"
                                           and self.world.device.type == "cuda")
        torch.manual_seed(cfg.seed)
        with torch.device("meta"):
            model = StripedLM(cfg.model)
        model.to_empty(device=self.world.device)
        model.init_weights()
        self.engine = build_engine(model, cfg, resolve_backend(cfg.parallel.backend, self.world),
                                   self.world, self.accum, bf16)
        self.loader = DataLoader(TokenDataset(cfg.data), sequences, 0, 1, self.world.device)
        self.autocast = (torch.autocast(self.world.device.type, dtype=torch.bfloat16) if bf16
                         else nullcontext())
        self.flops = model.flops_per_token(cfg.data.seq_len)
        self.params = model.num_params()

    def step(self, mark=lambda phase: None) -> torch.Tensor:
        """One optimizer step; `mark(phase)` is called when each phase ends. Returns the loss,
        on the device: the trainer reads it a step late (train/outcomes.py)."""
        cfg, total = self.cfg, torch.zeros((), device=self.world.device)
        batch = next(self.loader)
        mark("data")
        for micro in range(self.accum):
            rows = slice(micro * cfg.micro_batch, (micro + 1) * cfg.micro_batch)
            with self.engine.accumulating(last=micro == self.accum - 1):
                with self.autocast:
                    doc_ids = batch["doc_ids"][rows] if cfg.document_masking else None
                    loss = self.engine.module(batch["input_ids"][rows], doc_ids,
                                              batch["targets"][rows]) / self.accum
                mark("forward")
                self.engine.backward(loss)
                mark("backward")
            total += loss.detach()
        self.engine.step(cfg.optim.lr, torch.isfinite(total))
        mark("optimizer")
        return total

    def sync(self) -> None:
        if self.world.device.type == "cuda":
            torch.cuda.synchronize(self.world.device)


def throughput(trainer: Trainer, steps: int, warmup: int) -> dict:
    for _ in range(warmup):
        trainer.step()
    trainer.sync()
    if trainer.world.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trainer.world.device)
    start = time.perf_counter()
    outcomes = StepOutcomes()
    losses = []
    for step in range(steps):  # a step's loss is read once the next is queued, as in the loop
        outcomes.put(step, 0.0, trainer.step().reshape(1))
        losses += [done.values[0] for done in outcomes.take(keep_latest=step + 1 < steps)]
    trainer.sync()
    seconds = time.perf_counter() - start
    cfg = trainer.cfg
    rate = steps * cfg.global_batch_tokens / seconds
    cuda = trainer.world.device.type == "cuda"
    return {"tokens_per_s": rate, "step_ms": 1e3 * seconds / steps,
            "mfu": mfu(rate, trainer.flops, peak_flops(trainer.world.device)),
            "memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "last_loss": losses[-1]}


def breakdown(trainer: Trainer, steps: int) -> dict:
    """Median milliseconds of each phase per step, a device sync at each phase's end."""
    times: dict[str, list[float]] = {phase: [] for phase in PHASES}
    for _ in range(steps):
        trainer.sync()
        spent = dict.fromkeys(PHASES, 0.0)
        last = [time.perf_counter()]

        def mark(phase: str, spent=spent, last=last) -> None:
            trainer.sync()
            now = time.perf_counter()
            spent[phase] += now - last[0]  # micro-batches add up
            last[0] = now

        trainer.step(mark)
        for phase in PHASES:
            times[phase].append(1e3 * spent[phase])
    ms = {phase: statistics.median(values) for phase, values in times.items()}
    total = sum(ms.values())
    return {"ms": ms, "share": {phase: value / total for phase, value in ms.items()},
            "synced_step_ms": total}


def trace(trainer: Trainer, out: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    cuda = trainer.world.device.type == "cuda"
    if cuda:
        activities.append(ProfilerActivity.CUDA)
    out.mkdir(parents=True, exist_ok=True)
    with profile(activities=activities, record_shapes=True) as prof:
        trainer.step()
        trainer.sync()
    prof.export_chrome_trace(str(out / "trace.json"))
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    # By input shape: one aten::copy_ row per tensor copied tells which copy it is.
    (out / "ops.txt").write_text(prof.key_averages(group_by_input_shape=True).table(
        sort_by=key, row_limit=40))
    if cuda:
        kernels = [(e.name, e.device_time_total / 1e3) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation]
        (out / "kernels.txt").write_text(kernel_summary(kernels))


# Kinds of device kernels, first match wins; a kernel matching none is its own kind (our
# Triton kernels keep their function names, e.g. _rms_norm_bwd_kernel).
# Attention comes first: SDPA's memory-efficient and flash kernels carry "cutlass" in names.
KERNEL_KINDS = (("attention", r"sdpa|fmha|flash|cudnn"), ("matmul", r"nvjet|gemm|cutlass|xmma"),
                ("optimizer", r"FusedOptimizerTensorList"), ("grad norm", r"(?i)lpnorm"),
                ("casts and copies", r"copy|Cat"), ("other aten", r"at::native|Memset"))


def kernel_summary(kernels: list[tuple[str, float]]) -> str:
    """Device time of one profiled step by kernel kind, then the 40 longest kernels, from
    (kernel name, ms) per launch. The caller leaves out the ranges that user annotations (e.g.
    Optimizer.step) put on the device timeline: they span kernels already counted."""
    per_kernel: dict[str, list] = {}
    for name, ms in kernels:
        row = per_kernel.setdefault(name, [0.0, 0])
        row[0] += ms
        row[1] += 1
    total = sum(ms for ms, _ in per_kernel.values())
    kinds: dict[str, float] = {}
    for name, (ms, _) in per_kernel.items():
        kind = next((k for k, pattern in KERNEL_KINDS if re.search(pattern, name)), name[:60])
        kinds[kind] = kinds.get(kind, 0.0) + ms
    lines = [f"device time {total:.1f} ms in {sum(n for _, n in per_kernel.values())} kernels"]
    lines += [f"{ms:9.2f} ms {100 * ms / total:5.1f}%  {kind}"
              for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1])]
    lines.append("longest kernels (ms, launches):")
    lines += [f"{ms:9.2f} {n:5d}x  {name[:120]}" for name, (ms, n) in
              sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:40]]
    return "\n".join(lines) + "\n"


def report(result: dict) -> str:
    t, b = result["stripes"], result["breakdown"]
    lines = [f"stripes {result['config']} on {result['device']}: {t['tokens_per_s']:,.0f} "
             f"tokens/s, {t['step_ms']:.1f} ms/step, MFU "
             + (f"{100 * t['mfu']:.1f}%" if t["mfu"] is not None else "-") + ", peak "
             + (f"{t['memory_gib']:.1f} GiB" if t["memory_gib"] is not None else "-"),
             f"  step with a sync per phase: {b['synced_step_ms']:.1f} ms = " + ", ".join(
                 f"{phase} {b['ms'][phase]:.1f} ({100 * b['share'][phase]:.0f}%)"
                 for phase in PHASES)]
    for name in ("hf", "hf_compiled"):
        if name in result:
            hf = result[name]
            lines.append(f"  {name}: {hf['tokens_per_s']:,.0f} tokens/s; stripes / {name} = "
                         f"{t['tokens_per_s'] / hf['tokens_per_s']:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--config", default="configs/train/bench-1b.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--hf", action="store_true", help="the eager HF anchor too")
    parser.add_argument("--hf-compile", action="store_true", help="the compiled HF anchor too")
    parser.add_argument("--trace", type=Path, metavar="DIR", help="profile one step into DIR")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--tiny", action="store_true", help="small shapes (a CPU smoke test)")
    args = parser.parse_intermixed_args()  # key=value overrides may sit among the options
    overrides = [*(TINY if args.tiny else []), "checkpoint.resume=never", *args.overrides]
    cfg = load_train_config(args.config, overrides)
    trainer = Trainer(cfg)
    device = trainer.world.device
    result = {"config": args.config, "overrides": overrides, "params": trainer.params,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "steps": args.steps, "warmup": args.warmup,
              "stripes": throughput(trainer, args.steps, args.warmup),
              "breakdown": breakdown(trainer, args.steps)}
    if args.trace:
        trace(trainer, args.trace)
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for name, wanted, compiled in (("hf", args.hf, False), ("hf_compiled", args.hf_compile,
                                                           True)):
        if wanted:
            result[name] = run_hf(cfg, compiled, args.steps, args.warmup)
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
