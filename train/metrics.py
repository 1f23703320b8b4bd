"""Training metrics: throughput, MFU, memory, and where they go (JSONL, console, wandb).

Rank 0 writes one JSON object per line to `run_dir/metrics.jsonl`, opened for appending and
flushed per line, so a resumed run continues the same file and a crash loses at most the line
being written. Steps logged after the last checkpoint and before a crash are logged again
after the resume; a reader keeps the last record of each step (the `resumed` event says where).
The console gets one progress line per record: styled by rich on a terminal, plain text
otherwise (pytest, Slurm logs), so logs never fill with escape codes or rewrapped lines.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import resource
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

import torch
from rich.console import Console
from rich.text import Text

from stripes.core.config import ConfigError
from stripes.core.log import log, note_once

# Dense (no sparsity) bf16 tensor-core peak FLOP/s of one GPU, from NVIDIA's datasheets, by a
# substring of `torch.cuda.get_device_name()`. The longest matching key wins, so "NVIDIA H100
# PCIe" gets the PCIe figure and "NVIDIA H100 80GB HBM3" (SXM) the plain "H100" one.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "H200": 989e12,
    "A100": 312e12,
}


def peak_flops_for_name(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of the GPU called `device_name`, or None if it is not listed."""
    name = device_name.lower()
    matches = [key for key in PEAK_BF16_FLOPS if key.lower() in name]
    return PEAK_BF16_FLOPS[max(matches, key=len)] if matches else None


def peak_flops(device: torch.device | str) -> float | None:
    """Peak bf16 FLOP/s of `device`; None (said once in the log) where MFU cannot be reported."""
    device = torch.device(device)
    if device.type != "cuda":
        note_once(f"MFU not reported: no peak FLOP/s for a {device.type} device")
        return None
    name = torch.cuda.get_device_name(device)
    peak = peak_flops_for_name(name)
    if peak is None:
        note_once(f"MFU not reported: no peak bf16 FLOP/s known for GPU {name!r} "
                  f"(known: {', '.join(PEAK_BF16_FLOPS)}; add it to PEAK_BF16_FLOPS)")
    return peak


def mfu(tokens_per_s: float | None, flops_per_token_fwd: float,
        peak: float | None) -> float | None:
    """Model FLOPs utilisation = 3 x flops_per_token_fwd x tokens_per_s / peak, in [0, 1].

    Training costs about three forwards per token: the forward itself plus a backward that
    computes gradients for both the activations and the weights, each about one forward's
    work (Kaplan et al., 2020). Recomputation under activation checkpointing is deliberately
    not counted: MFU measures useful model work (Chowdhery et al., 2022, PaLM, appendix B).
    `flops_per_token_fwd` is `model.flops_per_token(seq_len)`, each mixer's real cost at that
    length. `tokens_per_s` and `peak` must describe the same hardware: one rank's tokens/s
    against one GPU's peak. None when either is unknown.
    """
    if tokens_per_s is None or peak is None:
        return None
    return 3.0 * flops_per_token_fwd * tokens_per_s / peak


def memory_gib(device: torch.device | str) -> float:
    """Peak memory so far in GiB: CUDA max allocated, else the process's peak RSS."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    note_once("memory_gib reports the process's peak RSS (no CUDA device)")
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak_rss * (1 if sys.platform == "darwin" else 1024) / 2**30  # macOS: bytes; Linux: KiB


class Throughput:
    """Tokens/s and seconds per step over the last `window` steps, update to update.

    Call `update(tokens)` once at the end of every optimizer step (the global batch's tokens
    give the run's tokens/s; divide by the world size for one device's, which MFU needs).
    The first step after construction is dropped: it includes compilation and allocator
    warm-up and would skew a short window.
    After pauses that are not training (a checkpoint save, an eval), call `mark()` so the
    next interval starts then. Measuring update to update, rather than around the step, stays
    correct when CUDA runs asynchronously: whatever a step leaves queued is paid by the next.
    """

    def __init__(self, window: int = 20, clock: Callable[[], float] = time.perf_counter) -> None:
        if window < 1:
            raise ValueError(f"window={window}: must be a positive number of steps")
        self._clock = clock
        self._samples: deque[tuple[float, int]] = deque(maxlen=window)  # (seconds, tokens)
        self._last = clock()
        self._warming_up = True

    def update(self, tokens: int) -> None:
        now = self._clock()
        if not self._warming_up:
            self._samples.append((now - self._last, tokens))
        self._warming_up = False
        self._last = now

    def mark(self) -> None:
        """Start the current interval now: time since the last update is not counted."""
        self._last = self._clock()

    def step_time(self) -> float | None:
        """Mean seconds per step over the window; None until a step past the first."""
        if not self._samples:
            return None
        return sum(s for s, _ in self._samples) / len(self._samples)

    def tokens_per_s(self) -> float | None:
        """Tokens per second over the window; None until a step past the first."""
        seconds = sum(s for s, _ in self._samples)
        return sum(t for _, t in self._samples) / seconds if seconds > 0 else None


def format_duration(seconds: float) -> str:
    """Compact duration for an ETA: 42s, 3m05s, 1h02m, 2d03h."""
    s = int(round(seconds))
    days, hours, minutes = s // 86400, s // 3600 % 24, s // 60 % 60
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{s % 60:02d}s" if minutes else f"{s}s"


def progress_parts(record: dict[str, Any], total_steps: int) -> list[tuple[str, str]]:
    """The console line of a step record as (text, rich style) pieces; joined, it is plain."""
    step, tps, step_time = record["step"], record["tokens_per_s"], record["step_time_s"]
    eta = "?" if step_time is None else format_duration((total_steps - step) * step_time)
    parts = [
        (f"step {step}/{total_steps} {100 * step / total_steps:3.0f}%", "bold"),
        (f" | loss {record['loss']:.4f}", "cyan"),
        (f" | lr {record['lr']:.2e}", ""),
        (" | gnorm -" if record["grad_norm"] is None else f" | gnorm {record['grad_norm']:.3f}",
         ""),
        (" | warming up" if tps is None else f" | {tps:,.0f} tok/s", "green"),
    ]
    if record["mfu"] is not None:
        parts.append((f" | mfu {100 * record['mfu']:.1f}%", "green"))
    parts.append((f" | mem {record['memory_gib']:.1f} GiB", ""))
    if record["skipped_steps"]:
        parts.append((f" | skipped {record['skipped_steps']}", "bold red"))
    parts.append((f" | ETA {eta}", "magenta"))
    return parts


def format_progress(record: dict[str, Any], total_steps: int) -> str:
    return "".join(text for text, _ in progress_parts(record, total_steps))


class MetricsLogger:
    """Step records and events to `run_dir/metrics.jsonl`, the console and optionally wandb.

    Only rank 0 writes or prints; other ranks' calls return at once. `step` is the number of
    optimizer steps completed (1..total_steps), which is what the ETA counts down from.
    `device` picks the memory figure; None means the current CUDA device if there is one.
    With `wandb=True` the same step records go to a wandb run (offline unless WANDB_MODE says
    otherwise) whose id is kept in `run_dir/wandb_id`, so a resumed run continues it; events
    stay in the JSONL and on the console. A missing wandb fails on every rank, not just rank 0,
    so no rank is left waiting in a collective for one that died.
    """

    def __init__(self, run_dir: str | Path, total_steps: int, rank: int, quiet: bool = False,
                 *, device: torch.device | str | None = None, wandb: bool = False,
                 wandb_project: str = "stripes", wandb_config: dict[str, Any] | None = None,
                 stream: TextIO | None = None) -> None:
        self.total_steps, self.rank, self.quiet = total_steps, rank, quiet
        self.device = torch.device(device) if device is not None else _default_device()
        self.path = Path(run_dir) / "metrics.jsonl"
        self._stream = stream  # None: whatever sys.stdout is when printing
        self._consoles: dict[int, Console] = {}
        self._file: TextIO | None = None
        self._wandb_run: Any = None
        wandb_module = _import_wandb() if wandb else None
        if rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(self.path)
        self._file = self.path.open("a", encoding="utf-8")
        if wandb_module is not None:
            self._wandb_run = _start_wandb(wandb_module, self.path.parent, wandb_project,
                                           wandb_config)

    def log(self, step: int, *, loss: float, lr: float, grad_norm: float | None,
            tokens_per_s: float | None, mfu: float | None, step_time_s: float | None,
            tokens_seen: int, skipped_steps: int, **extra: Any) -> None:
        """One step record. Non-finite floats are written as the strings "nan", "inf"."""
        if self._file is None:
            return
        record = {
            "step": int(step), "loss": float(loss), "lr": float(lr),
            "grad_norm": _float_or_none(grad_norm), "tokens_per_s": _float_or_none(tokens_per_s),
            "mfu": _float_or_none(mfu), "step_time_s": _float_or_none(step_time_s),
            "memory_gib": memory_gib(self.device), "tokens_seen": int(tokens_seen),
            "skipped_steps": int(skipped_steps), **extra, "time": time.time(),
        }
        self._write(record)
        if self._wandb_run is not None:
            numbers = {k: v for k, v in record.items()
                       if k != "step" and isinstance(v, (int, float))}
            self._wandb_run.log(numbers, step=record["step"])
        if not self.quiet:
            self._print(progress_parts(record, self.total_steps))

    def log_eval(self, step: int, losses: dict[str, float]) -> None:
        """Held-out losses after `step`: {"loss": mixture mean, <source>: loss, ...}, written as
        {"event": "eval", "step", "loss", "per_source": {...}}; wandb gets eval/<name>."""
        if self._file is None:
            return
        per_source = {k: float(v) for k, v in losses.items() if k != "loss"}
        self._write({"event": "eval", "step": int(step), "loss": float(losses["loss"]),
                     "per_source": per_source, "time": time.time()})
        if self._wandb_run is not None:
            self._wandb_run.log({f"eval/{k}": float(v) for k, v in losses.items()},
                                step=int(step))
        if not self.quiet:
            sources = "".join(f" | {k} {v:.4f}" for k, v in per_source.items())
            self._print([(f"eval {step}/{self.total_steps}", "bold"),
                         (f" | loss {losses['loss']:.4f}", "cyan"), (sources, "")])

    def log_event(self, kind: str, **fields: Any) -> None:
        """A non-step event (checkpoint_saved, resumed, bad_step_skipped) with its fields."""
        if self._file is None:
            return
        self._write({"event": kind, **fields, "time": time.time()})
        if not self.quiet:
            details = " ".join(f"{k}={v}" for k, v in fields.items())
            self._print([(f"[{kind}]", "bold yellow"), (f" {details}" if details else "", "")])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, record: dict[str, Any]) -> None:
        # default=str writes paths and the like; allow_nan=False keeps every line strict JSON.
        line = json.dumps({k: _finite(v) for k, v in record.items()}, default=str,
                          allow_nan=False)
        self._file.write(line + "\n")
        self._file.flush()

    def _print(self, parts: list[tuple[str, str]]) -> None:
        stream = self._stream or sys.stdout
        if stream.isatty():
            console = self._consoles.setdefault(id(stream), Console(file=stream, highlight=False))
            console.print(Text.assemble(*parts), soft_wrap=True)
        else:
            stream.write("".join(text for text, _ in parts) + "\n")
            stream.flush()


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _float_or_none(value: float | None) -> float | None:
    return None if value is None else float(value)


def _finite(value: Any) -> Any:
    """NaN and infinities become "nan", "inf", "-inf": strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line left without its newline by a crash mid-write, said in the log.

    Appending after it would glue the next record onto it and make both unreadable; the torn
    record itself is unreadable already, so nothing readable is lost.
    """
    if not path.exists():
        return
    with path.open("rb+") as f:
        size = f.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            chunk = f.read(end - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        else:
            keep = 0
        if keep == size:
            return
        f.truncate(keep)
    log.warning(f"{path}: dropped a torn last record ({size - keep} bytes) before appending")


def _import_wandb() -> ModuleType:
    try:
        return importlib.import_module("wandb")
    except ImportError:
        raise ConfigError("wandb", True, "false, or install the extra: "
                          "pip install 'stripes[wandb]'", "wandb is not installed") from None


def _start_wandb(wandb: ModuleType, run_dir: Path, project: str,
                 config: dict[str, Any] | None) -> Any:
    id_file = run_dir / "wandb_id"
    if id_file.exists():
        run_id = id_file.read_text(encoding="utf-8").strip()
    else:
        run_id = wandb.util.generate_id()
        tmp = id_file.with_name(id_file.name + ".tmp")
        tmp.write_text(run_id, encoding="utf-8")
        os.replace(tmp, id_file)
    mode = os.environ.get("WANDB_MODE", "offline")  # offline unless told otherwise
    return wandb.init(project=project, dir=str(run_dir), id=run_id, resume="allow",
                      config=config, mode=mode)
