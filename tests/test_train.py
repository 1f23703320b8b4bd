"""The trainer end to end on CPU: loss falls, exact resume after SIGKILL, bad input."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stripes.arch import StripedLM
from stripes.core.config import ConfigError
from stripes.train.checkpoint import DcpStates, load_checkpoint
from stripes.train.config import load_train_config
from stripes.train.export import export_checkpoint, load_exported

from conftest import ROOT

TINY = "configs/train/tiny.yaml"


def data_overrides(data: Path) -> list[str]:
    return [f"data.sources=[{{path: {data}, source: devil}}, {{path: {data}, source: jargon}}]"]


def train_cmd(run_dir: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "stripes.launch.cli", "train", TINY,
            f"output_dir={run_dir}", *data_overrides(data), *extra]


def step_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl; a step logged twice (killed, then resumed) keeps the
    later record."""
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "event" not in record:
            losses[record["step"]] = record["loss"]
    return losses


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, **kw)


def test_loss_falls(tmp_path, demo_data):
    done = run(train_cmd(tmp_path / "run", demo_data, "steps=24", "checkpoint.every_steps=24"))
    assert done.returncode == 0, done.stderr
    losses = step_losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, 25))
    # Steps are read a step late (train/outcomes.py); each record still counts its own tokens.
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
               .splitlines() if "event" not in json.loads(line)]
    assert all(r["tokens_seen"] == r["step"] * records[0]["tokens_seen"] for r in records)
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (22, 23, 24)) / 3
    assert last < first - 0.5, (first, last)
    # The trained run decodes a sample through `stripes generate` (tokenizer from its data).
    out = run([sys.executable, "-m", "stripes.launch.cli", "generate", str(tmp_path / "run"),
               "--prompt", "LISP, n.", "--max-new-tokens", "8"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("LISP, n.") and len(out.stdout.strip()) > len("LISP, n.")


def descendants(pid: int) -> list[int]:
    """Every live process below `pid`, from /proc (torchrun starts its workers in sessions of
    their own, so a process-group kill misses them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited while listing
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def kill_after_checkpoint(cmd: list[str], run_dir: Path, checkpoint: str, **kw) -> None:
    """Start a run and SIGKILL it, with every process it started (torchrun's workers), as soon
    as `checkpoint` is the latest: no clean shutdown anywhere."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            **kw)
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not (latest.exists() and latest.read_text().strip() == checkpoint):
        assert proc.poll() is None and time.monotonic() < deadline, f"no {checkpoint}"
        time.sleep(0.05)
    for pid in [*descendants(proc.pid), proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def test_resume_after_sigkill_reproduces_losses_exactly(tmp_path, demo_data):
    straight = tmp_path / "straight"
    assert run(train_cmd(straight, demo_data)).returncode == 0

    killed = tmp_path / "killed"
    kill_after_checkpoint(train_cmd(killed, demo_data), killed, "step-000004")
    resumed = run(train_cmd(killed, demo_data))
    assert resumed.returncode == 0, resumed.stderr

    want, got = step_losses(straight), step_losses(killed)
    assert sorted(got) == list(range(1, 9))
    events = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "resumed"] == [4]
    assert all(got[s] == want[s] for s in range(1, 9)), (got, want)  # bit-exact on CPU
    state = json.loads((killed / "checkpoints" / "step-000008" / "trainer.json").read_text())
    ref = json.loads((straight / "checkpoints" / "step-000008" / "trainer.json").read_text())
    # The same samples, none skipped or repeated: equal loader state (samples consumed).
    assert state["trainer"]["data"] == ref["trainer"]["data"]


# A constant schedule, so that a 4-step run on 2 ranks and its 8-step continuation see the
# learning rates of the 8-step reference; held-out evaluation at steps 4 and 8.
FLAT = ["schedule.kind=constant", "schedule.warmup_steps=0", "data.heldout=0.02",
        "eval.every_steps=4", "eval.samples=5", "eval.micro_batch=2"]


def eval_losses(run_dir: Path) -> dict[int, dict]:
    """step -> the last eval record of that step."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if r.get("event") == "eval"}


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory, demo_data) -> Path:
    run_dir = tmp_path_factory.mktemp("single")
    assert run(train_cmd(run_dir, demo_data, *FLAT)).returncode == 0
    return run_dir


@pytest.mark.multiprocess
# Activation checkpointing rides along: it must not change a single number. FSDP2 runs the
# fused AdamW (found_inf and grad_scale, the clip, beside sharded DTensor parameters) against
# the single process's foreach one.
@pytest.mark.parametrize("backend,recompute,fused", [("ddp", "block", False),
                                                     ("fsdp", "selective", True)])
def test_two_processes_match_one_and_resume_on_one(tmp_path, demo_data, backend, recompute,
                                                   fused, single_process_run):
    flat = FLAT
    two = tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", "-m", "stripes.launch.cli", "train", TINY,
                f"output_dir={two}", *data_overrides(demo_data), f"parallel.backend={backend}",
                f"parallel.activation_checkpointing={recompute}", "steps=4",
                f"optim.fused={str(fused).lower()}", *flat]
    done = run(torchrun, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    # The 2-rank checkpoint exports to one file holding the same weights a 1-process load gets.
    sharded = two / "checkpoints" / "step-000004"
    exported = load_exported(export_checkpoint(sharded, tmp_path / "export"))
    reference = StripedLM(exported.cfg)
    load_checkpoint(sharded, DcpStates(reference, None))
    for (name, a), b in zip(exported.state_dict().items(), reference.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    # The 2-rank checkpoint at step 4 resumes in one process, to step 8.
    resumed = run(train_cmd(two, demo_data, *flat))
    assert resumed.returncode == 0, resumed.stderr
    want, got = step_losses(single_process_run), step_losses(two)
    for step in range(1, 9):
        assert abs(got[step] - want[step]) < 1e-4 * abs(want[step]), (step, got, want)
    # Held-out losses at step 4 from 2 ranks (10 windows, 5 each: micro-batches of 2, 2, 1)
    # and at step 8 from 1 rank equal the single-process run's.
    want, got = eval_losses(single_process_run), eval_losses(two)
    assert sorted(got) == sorted(want) == [4, 8]
    for step in (4, 8):
        for name in ("devil", "jargon"):
            a, b = got[step]["per_source"][name], want[step]["per_source"][name]
            assert abs(a - b) < 1e-4 * b, (step, name, a, b)


def test_bad_configs_are_one_line(tmp_path, demo_data):
    base = [f"output_dir={tmp_path}", *data_overrides(demo_data)]
    cases = [
        (["global_batch_tokens=500"], "global_batch_tokens=500"),
        (["micro_batch=3"], "global_batch_tokens=512"),
        (["stepz=3"], "stepz"),
        (["schedule.kind=linear"], "schedule.kind='linear'"),
        (["optim.lr=-1"], "optim.lr=-1"),
        (["eval.every_steps=2"], "eval.sources=None"),
        (["data.heldout=1.5"], "data.heldout=1.5"),
    ]
    for overrides, expected in cases:
        with pytest.raises(ConfigError, match=expected.replace("[", r"\[")):
            cfg = load_train_config(ROOT / TINY, [*base, *overrides])
            cfg.batch_plan(1)


def test_a_model_vocabulary_smaller_than_the_datas_is_one_line(tmp_path, demo_data):
    out = run(train_cmd(tmp_path / "run", demo_data, "model.vocab_size=100"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("stripes train: error: model.vocab_size=100")
    assert "token ids" in out.stderr


def test_missing_data_is_one_line(tmp_path):
    out = run(train_cmd(tmp_path / "run", tmp_path / "nowhere"))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith("stripes train: error:") and "nowhere" in out.stderr


def test_unwritable_output_dir_is_one_line(tmp_path, demo_data):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = run(train_cmd(blocker / "run", demo_data))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("stripes train: error: output_dir=")
    assert blocker.read_text() == "not a directory"  # nothing lost


def test_non_finite_steps_halt_the_run(tmp_path, demo_data):
    out = run(train_cmd(tmp_path / "run", demo_data, "optim.lr=1e30", "max_bad_steps=2",
                        "schedule.warmup_steps=0", "grad_clip=null"))
    assert out.returncode == 3, out.stderr
    assert "halted" in out.stdout
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
              .splitlines()]
    bad = [e for e in events if e.get("event") == "bad_step"]
    # Read a step late (train/outcomes.py), each still names its own step and batch.
    assert len(bad) == 2 and bad[1]["step"] == bad[0]["step"] + 1
    first, end = bad[0]["samples"]
    assert first == (bad[0]["step"] - 1) * (end - first) and bad[1]["samples"][0] == end


def test_a_checkpoint_counts_the_bad_steps_before_it_and_logs_each_steps_lr(tmp_path, demo_data):
    """Outcomes are read a step late, but a checkpoint's step reads its own first: the saved
    skipped count includes a bad step at the boundary; each record keeps its own step's lr."""
    run_dir = tmp_path / "run"
    out = run(train_cmd(run_dir, demo_data, "optim.lr=1e30", "max_bad_steps=100", "steps=4",
                        "checkpoint.every_steps=2", "schedule.warmup_steps=3",
                        "grad_clip=null", "log_every=1"))
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    bad_steps = [e["step"] for e in lines if e.get("event") == "bad_step"]
    assert 2 in bad_steps  # lr 1e30 ruins the weights after the first update
    for step in (2, 4):
        saved = json.loads((run_dir / "checkpoints" / f"step-{step:06d}" / "trainer.json")
                           .read_text())
        assert saved["trainer"]["skipped_steps"] == sum(s <= step for s in bad_steps)
    lrs = {e["step"]: e["lr"] for e in lines if "event" not in e}
    assert lrs[1] < lrs[2] < lrs[3]  # warm-up: each record has its own step's rate


@pytest.mark.parametrize("backend", ["fsdp", "ddp"])
def test_wrapping_backends_run_without_a_launcher(tmp_path, demo_data, backend):
    """`stripes train` in one process with FSDP2 or DDP joins a group of its own and follows
    the single backend's losses."""
    losses = {}
    for name in ("single", backend):
        done = run(train_cmd(tmp_path / name, demo_data, "steps=2",
                             f"parallel.backend={name}"))
        assert done.returncode == 0, done.stderr[-3000:]
        losses[name] = step_losses(tmp_path / name)
    for step in (1, 2):
        assert losses[backend][step] == pytest.approx(losses["single"][step], rel=1e-5)
