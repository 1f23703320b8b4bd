"""Timing, checking and reporting for bench/kernels.py: one Impl per implementation of a
Case, measured by a Runner (CUDA events on a GPU, perf_counter on CPU) and checked against the
case's float64 reference.

Kernels of a fraction of a millisecond launched from Python can be bound by the host: the
launches, the autograd engine and the Python around them take longer than the GPU work. A case
marked `graph` is therefore also timed as a CUDA graph replay, which measures the GPU work
alone; that is the "f+b ms" the ratios use, and the eager time sits beside it ("eager ms").
"""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import importlib.util
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

TOL = 3e-2  # bf16 outputs land near 1e-2 at worst; a wrong kernel lands near 1
ROOT = Path(__file__).resolve().parents[1]
Tensors = list[torch.Tensor]
BF16 = torch.bfloat16


@dataclass
class Impl:
    name: str
    role: str  # "stripes", "torch" (plain PyTorch), "anchor" (another library's) or "extra"
    step: Callable[[], Tensors] | None  # forward+backward -> outputs, then input gradients
    fwd: Callable[[], object] | None = None  # forward only, run under no_grad
    setup: Callable[[], None] | None = None  # untimed: restores inputs the impl overwrites
    note: str = ""  # why it did not run (step None), or how it ran


@dataclass
class Case:
    kernel: str
    case: str
    names: list[str]  # what each step() returns, in order
    expected: Tensors  # the float64 reference's values of the same
    impls: list[Impl]
    fwd_bytes: float = 0.0
    fb_bytes: float = 0.0
    fb_flops: float = 0.0
    graph: bool = False  # also time CUDA graph replays (see the module docstring)


class Runner:
    """Times and measures peak memory: CUDA events on a GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device, quick: bool) -> None:
        self.cuda = device.type == "cuda"
        self.warmup, self.budget_ms, self.min_reps, self.max_reps = (
            (2, 20.0, 3, 10) if quick else (3, 1000.0, 5, 100))
        # Zeroing 256 MiB before each repeat evicts the inputs from L2 (50 MiB on an H100).
        self.flush = torch.empty(256 << 20, dtype=torch.int8, device=device) if self.cuda else None

    def time(self, fn: Callable[[], object], setup: Callable[[], None] | None) -> dict:
        setup = setup or (lambda: None)
        for _ in range(self.warmup):
            setup()
            fn()
        estimate = statistics.median(self._times(fn, setup, 3))
        reps = min(self.max_reps, max(self.min_reps, int(self.budget_ms / max(estimate, 1e-3))))
        times = sorted(self._times(fn, setup, reps))
        at = lambda q: times[min(reps - 1, int(q * reps))]
        return {"ms": statistics.median(times), "p10": at(0.1), "p90": at(0.9), "reps": reps}

    def _times(self, fn, setup, n: int) -> list[float]:
        if not self.cuda:
            out = []
            for _ in range(n):
                setup()
                start = time.perf_counter()
                fn()
                out.append(1e3 * (time.perf_counter() - start))
            return out
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(n)]
        for start, end in events:
            setup()
            self.flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]

    def time_graph(self, fn: Callable[[], object], setup: Callable[[], None] | None) -> dict:
        """fn captured once into a CUDA graph, then its replays timed like time(): the GPU work
        without the host's."""
        return self.time(capture(fn, setup=setup).replay, setup)

    def peak_gib(self, fn: Callable[[], object], setup: Callable[[], None] | None) -> float | None:
        if not self.cuda:
            return None
        if setup is not None:
            setup()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**30


def compiled(fn: Callable, device: torch.device) -> tuple[Callable, str]:
    torch.compiler.reset()  # each case compiles afresh: no recompile limit across cases
    if device.type == "cuda":
        return torch.compile(fn, dynamic=False), ""
    # CPU (CI): no C++ build, but dynamo and AOTAutograd trace the same function.
    return torch.compile(fn, backend="aot_eager", dynamic=False), "aot_eager backend (CPU)"


def anchor_op(module: str, attr: str, device: torch.device) -> tuple[object | None, str]:
    """Another library's `module.attr` (liger-kernel, fla), or None and why it cannot run
    here: not installed, no CUDA, or an import that fails (a broken install must not end
    the run)."""
    package = module.split(".")[0]
    if importlib.util.find_spec(package) is None:
        return None, "not installed"
    if device.type != "cuda":
        return None, f"skipped: {package} needs CUDA"
    try:
        return getattr(importlib.import_module(module), attr), ""
    except Exception as err:
        return None, f"import failed: {type(err).__name__}: {err}"


def capture(fn: Callable[[], object], repeat: int = 1,
            setup: Callable[[], None] | None = None) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `repeat` calls of fn, captured after a warm-up on a side stream (as
    capture requires); setup (untimed input restores) runs before each warm-up call and once
    before the capture."""
    setup = setup or (lambda: None)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            setup()
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    setup()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            fn()
    return graph


def fwd_bwd(forward: Callable[[], object], inputs, grad_outputs) -> Callable[[], Tensors]:
    """step(): forward(), then the gradients of its outputs w.r.t. inputs (never accumulated
    into .grad, so no extra add is timed)."""
    def step() -> Tensors:
        out = forward()
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        return outs + list(torch.autograd.grad(outs, inputs, grad_outputs))
    return step


def without_grad(fn: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            fn()
    return run


def float64_reference(fn: Callable[..., object], inputs, grad_outputs) -> Tensors:
    args = [t.detach().double().requires_grad_() for t in inputs]
    step = fwd_bwd(lambda: fn(*args), args, [g.double() for g in grad_outputs])
    return [t.detach() for t in step()]


def restorer(*tensors: torch.Tensor) -> Callable[[], None]:
    """Snapshots tensors now; the returned function copies the snapshots back. liger's ops
    write into some of their inputs (the grad of y, gate and up, q and k and their grads)."""
    saved = [t.detach().clone() for t in tensors]

    def restore() -> None:
        with torch.no_grad():
            for t, s in zip(tensors, saved, strict=True):
                t.copy_(s)
    return restore


def measure(runner: Runner, case: Case) -> list[dict]:
    print(f"[{time.strftime('%H:%M:%S')}] {case.kernel} {case.case}: built, measuring",
          file=sys.stderr, flush=True)
    rows = []
    for impl in case.impls:
        row = {"kernel": case.kernel, "case": case.case, "impl": impl.name, "role": impl.role,
               "note": impl.note, "status": "skipped"}
        rows.append(row)
        if impl.step is None:
            continue
        try:
            if impl.setup is not None:
                impl.setup()
            started = time.perf_counter()
            got = impl.step()  # also the warm-up that compiles (and autotunes)
            row["first_call_s"] = time.perf_counter() - started
            if len(got) != len(case.names):
                raise ValueError(f"step returned {len(got)} tensors, expected {case.names}")
            errs = {}
            for name, g, want in zip(case.names, got, case.expected, strict=True):
                if g.shape != want.shape:
                    raise ValueError(f"{name}: shape {tuple(g.shape)}, reference "
                                     f"{tuple(want.shape)}")
                errs[name] = float((g.detach().double() - want).norm() / want.norm())
            del got
            row["rel_err"] = errs
            row["max_rel_err"] = float(torch.tensor(list(errs.values())).max())  # NaN stays
            row["peak_gib"] = runner.peak_gib(impl.step, impl.setup)
            row["fb"] = row["fb_eager"] = runner.time(impl.step, impl.setup)
            if impl.fwd is not None:
                row["fwd"] = runner.time(without_grad(impl.fwd), impl.setup)
            if case.graph and runner.cuda:
                row["fb"] = runner.time_graph(impl.step, impl.setup)
                if impl.fwd is not None:
                    row["fwd"] = runner.time_graph(without_grad(impl.fwd), impl.setup)
            row["status"] = "ok"
        except Exception as err:  # one broken row must not lose the others' numbers
            traceback.print_exc()
            row["status"] = "error"
            row["note"] = f"error: {first_line(err)}"
        if row["status"] == "ok" and not row["max_rel_err"] < TOL:
            row["note"] = (row["note"] + f"; rel err above {TOL:g}").lstrip("; ")
        progress(row)
    for row in rows:
        if row["status"] != "ok":
            continue
        if "fwd" in row and case.fwd_bytes:
            row["fwd_gbs"] = case.fwd_bytes / row["fwd"]["ms"] / 1e6
        if case.fb_bytes:
            row["fb_gbs"] = case.fb_bytes / row["fb"]["ms"] / 1e6
        if case.fb_flops:
            row["fb_tflops"] = case.fb_flops / row["fb"]["ms"] / 1e9
        for role in ("anchor", "torch"):
            anchor = [r for r in rows if r["role"] == role and r["status"] == "ok"]
            if anchor:
                row[f"vs_{role}"] = anchor[0]["fb"]["ms"] / row["fb"]["ms"]
    return rows


def progress(row: dict) -> None:
    """One line per row on stderr as it finishes, so a run cut short still shows where it got
    and what the first call (compiling, autotuning) cost."""
    timing = f"f+b {row['fb']['ms']:.3f} ms, first call {row['first_call_s']:.1f} s" \
        if row["status"] == "ok" else row["note"]
    print(f"[{time.strftime('%H:%M:%S')}] {row['kernel']} {row['case']} | {row['impl']}: "
          f"{row['status']} {timing}", file=sys.stderr, flush=True)


def ceilings(runner: Runner, device: torch.device, quick: bool, matmul: bool) -> list[dict]:
    """The copy bandwidth (read + write bytes) and, for linear_ce, a bf16 matmul rate."""
    numel = (16 << 20) // 2 if quick else (1 << 30) // 2  # bf16: 16 MiB or 1 GiB
    src = torch.randn(numel, device=device, dtype=BF16)
    dst = torch.empty_like(src)
    t = runner.time(lambda: dst.copy_(src), None)
    rows = [{"kernel": "copy", "case": f"{numel * 2 >> 20} MiB bf16", "impl": "dst.copy_(src)",
             "role": "ceiling", "status": "ok", "fb": t, "fb_gbs": 4 * numel / t["ms"] / 1e6,
             "note": "GB/s counts read + write"}]
    if matmul:
        m = 256 if quick else 8192
        a, b = (torch.randn(m, m, device=device, dtype=BF16) for _ in range(2))
        t = runner.time(lambda: torch.mm(a, b), None)
        rows.append({"kernel": "matmul", "case": f"{m}^3 bf16", "impl": "torch.mm",
                     "role": "ceiling", "status": "ok", "fb": t,
                     "fb_tflops": 2 * m**3 / t["ms"] / 1e9, "note": ""})
    return rows


def write_results(out: Path, stem: str, fields: dict, table_text: str, note: str = "") -> str:
    """OUT/<stem>.json (device, torch, commit, date, command, then `fields`) and OUT/<stem>.md
    (a header line, then `table_text`); returns the markdown. Benchmarks call it after each
    measured part, so a run cut short keeps what it measured."""
    report = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "commit": git_commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), **fields}
    text = (f"{report['device']}  torch {report['torch']}  commit {report['commit']}  "
            f"{report['date']}{note}\n\n{table_text}\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (out / f"{stem}.md").write_text(text)
    return text


def git_commit() -> str:
    """HEAD read from .git without running git; STRIPES_COMMIT overrides it (the GPU machine
    gets the working tree without .git)."""
    if os.environ.get("STRIPES_COMMIT"):
        return os.environ["STRIPES_COMMIT"]
    git = ROOT / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[len("ref: "):]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return "unknown"


def first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:150]}"


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def table(rows: list[dict]) -> str:
    num = lambda v, spec: "" if v is None else format(v, spec)
    lines = ["| kernel | case | impl | fwd ms | fwd GB/s | f+b ms | f+b GB/s | TFLOP/s | "
             "% ceiling | eager ms | peak GiB | vs anchor | vs torch | rel err | note |",
             "|---|---|---|" + "---:|" * 11 + "---|"]
    for r in rows:
        cells = [r["kernel"], r["case"], r["impl"], num(r.get("fwd", {}).get("ms"), ".3f"),
                 num(r.get("fwd_gbs"), ".0f"), num(r.get("fb", {}).get("ms"), ".3f"),
                 num(r.get("fb_gbs"), ".0f"), num(r.get("fb_tflops"), ".0f"),
                 num(r.get("pct_ceiling"), ".0f"), num(r.get("fb_eager", {}).get("ms"), ".3f"),
                 num(r.get("peak_gib"), ".2f"),
                 num(r.get("vs_anchor"), ".2f"), num(r.get("vs_torch"), ".2f"),
                 num(r.get("max_rel_err"), ".1e"), r.get("note", "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


