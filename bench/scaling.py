"""Weak scaling on one host: the same per-GPU work on 1, 2, 4, 8 GPUs, FSDP2 and ZeRO-3.

Each run is `stripes launch torchrun CONFIG --nproc-per-node N` (so the environment is the
launcher's, NVLink multicast off) with the per-GPU micro-batch fixed and the global batch
N x micro_batch x seq_len (no accumulation). tokens/s is the trainer's steady state
(bench/run_summary.py: from step --skip to the last step record); per GPU = tokens/s / N;
efficiency = per-GPU tokens/s over the same architecture and backend's on one GPU, the
anchor, in the same call. A run that fails is a row with its error; the others go on.

    python3 bench/scaling.py --out DIR [--gpus 1,2,4,8] [--backends fsdp,zero3]
        [--archs configs/arch/transformer-1b.yaml,configs/arch/hybrid-1b.yaml]
        [--config configs/train/bench-1b.yaml] [--steps 30 --skip 10] [--set key=value ...]
    python3 bench/scaling.py --out DIR --quick --set 'data.sources=[...]'   # CPU, gloo

Writes DIR/scaling.json, DIR/scaling.md, DIR/NAME.metrics.jsonl and DIR/NAME.log; each
run's directory (checkpoints) is deleted after it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from run_summary import steady_state

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = {"fsdp": ["parallel.backend=fsdp"],
            "zero3": ["parallel.backend=deepspeed", "parallel.deepspeed.zero_stage=3"]}


def one_run(out: Path, arch: str, backend: str, gpus: int, args: argparse.Namespace) -> dict:
    name = f"{Path(arch).stem}-{backend}-{gpus}"
    run_dir = out / "runs" / name
    seq_len, micro = args.seq_len, args.micro_batch
    overrides = [f"arch={arch}", *BACKENDS[backend], f"output_dir={run_dir}",
                 f"steps={args.steps}", f"micro_batch={micro}", f"data.seq_len={seq_len}",
                 f"global_batch_tokens={gpus * micro * seq_len}", "log_every=1",
                 f"checkpoint.every_steps={args.steps + 1}", "checkpoint.resume=never",
                 *args.set]
    cmd = [sys.executable, "-m", "stripes.launch.cli", "launch", "torchrun", args.config,
           *overrides, "--nproc-per-node", str(gpus)]
    row = {"name": name, "arch": Path(arch).stem, "backend": backend, "gpus": gpus,
           "command": " ".join(cmd[1:])}
    print(f"[scaling] {name}", file=sys.stderr, flush=True)
    returncode = run_in_group(cmd, out / f"{name}.log", args.timeout)
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        shutil.copy(metrics, out / f"{name}.metrics.jsonl")
    try:
        if returncode != 0:
            lines = (out / f"{name}.log").read_text(errors="replace").strip().splitlines()
            raise RuntimeError(f"exit {returncode}: {lines[-1][:200] if lines else ''}")
        summary = steady_state(metrics, args.skip)
        row.update(summary, tokens_per_s_per_gpu=summary["tokens_per_s"] / gpus, status="ok")
    except (RuntimeError, SystemExit) as err:
        row["status"] = f"error: {err}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a 1b checkpoint is ~10 GB per run
    return row


def run_in_group(cmd: list[str], log_file: Path, timeout: float) -> int:
    """Run `cmd` in a process group of its own, output to `log_file`; past `timeout`, the
    whole group (torchrun and its trainers) gets SIGTERM, then SIGKILL: a hung run must not
    hold the GPUs for the next one. Returns the exit status (124 on timeout)."""
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=grace)
                    break
            log.write(f"\n[scaling] timed out after {timeout} s\n")
            return 124


def add_efficiency(rows: list[dict]) -> None:
    for row in rows:
        one = next((r for r in rows if r["arch"] == row["arch"] and r["backend"] ==
                    row["backend"] and r["gpus"] == 1 and r["status"] == "ok"), None)
        if row["status"] == "ok" and one is not None:
            row["efficiency"] = row["tokens_per_s_per_gpu"] / one["tokens_per_s_per_gpu"]


def table(rows: list[dict]) -> str:
    lines = ["| arch | backend | GPUs | tokens/s | per GPU | efficiency vs 1 GPU | peak GiB "
             "| note |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ok = r["status"] == "ok"
        lines.append("| " + " | ".join([
            r["arch"], r["backend"], str(r["gpus"]),
            f"{r['tokens_per_s']:,.0f}" if ok else "",
            f"{r['tokens_per_s_per_gpu']:,.0f}" if ok else "",
            f"{r['efficiency']:.1%}" if "efficiency" in r else "",
            f"{r['peak_gib']:.1f}" if ok else "", "" if ok else r["status"]]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", default="configs/train/bench-1b.yaml")
    parser.add_argument("--archs", default="configs/arch/transformer-1b.yaml,"
                        "configs/arch/hybrid-1b.yaml")
    parser.add_argument("--backends", default="fsdp,zero3")
    parser.add_argument("--gpus", default="1,2,4,8")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=4, help="per GPU")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=10, help="steps before the measured span")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per run")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every run (repeatable)")
    parser.add_argument("--quick", action="store_true",
                        help="configs/train/tiny.yaml on 1 and 2 CPU processes, 4 steps")
    args = parser.parse_args()
    if args.quick:
        args.config, args.archs, args.gpus = ("configs/train/tiny.yaml",
                                              "configs/arch/tiny.yaml", "1,2")
        args.seq_len, args.micro_batch, args.steps, args.skip = 64, 2, 4, 2
        args.set = ["precision=fp32", *args.set]
    unknown = set(args.backends.split(",")) - set(BACKENDS)
    if unknown:
        parser.error(f"--backends: {sorted(unknown)} unknown (allowed: {', '.join(BACKENDS)})")
    args.out = args.out.resolve()  # the runs start in the repository root
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [one_run(args.out, arch, backend, int(gpus), args)
            for arch in args.archs.split(",") for backend in args.backends.split(",")
            for gpus in args.gpus.split(",")]
    add_efficiency(rows)
    (args.out / "scaling.json").write_text(json.dumps({"rows": rows}, indent=1))
    text = table(rows)
    (args.out / "scaling.md").write_text(text)
    print(text)
    raise SystemExit(1 if args.quick and any(r["status"] != "ok" for r in rows) else 0)


if __name__ == "__main__":
    main()
