"""Launchers end to end on CPU: a Slurm step environment, a signal before the time limit
(directly and through the rendered sbatch script with stand-ins for srun and scontrol), and
torchrun restarting the group after one rank dies. Each run's losses are compared with an
uninterrupted run of the same world size."""

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

from stripes.launch.slurm_script import SlurmJob
from stripes.train.preemption import REQUEUE_EXIT

from conftest import ROOT
from test_train import TINY, data_overrides, descendants, run, step_losses, train_cmd

STEPS = ["steps=12", "checkpoint.every_steps=2", "checkpoint.keep_last=10"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(run_dir: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2", "-m", "stripes.launch.cli", "train", TINY, f"output_dir={run_dir}",
            *data_overrides(data), *STEPS, *extra]


@pytest.fixture(scope="module")
def two_rank_losses(tmp_path_factory, demo_data) -> dict[int, float]:
    run_dir = tmp_path_factory.mktemp("two-ranks")
    done = run(torchrun(run_dir, demo_data), env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return step_losses(run_dir)


def wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, name: str) -> None:
    latest, deadline = run_dir / "checkpoints" / "latest", time.monotonic() + 300
    while not (latest.exists() and latest.read_text().strip() == name):
        assert proc.poll() is None and time.monotonic() < deadline, f"no {name}"
        time.sleep(0.02)


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # exited since it was listed
        return b""


def events(run_dir: Path, kind: str) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("event") == kind]


def test_sigusr1_checkpoints_exits_for_requeue_and_the_rerun_resumes(tmp_path, demo_data):
    straight = tmp_path / "straight"
    assert run(train_cmd(straight, demo_data, *STEPS)).returncode == 0

    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(train_cmd(stopped, demo_data, *STEPS), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_checkpoint(proc, stopped, "step-000002")
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == REQUEUE_EXIT, err[-3000:]
    [event] = events(stopped, "stopped")
    assert event["signal"] == "SIGUSR1" and 2 < event["step"] < 12
    latest = (stopped / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step-{event['step']:06d}"  # the step it stopped after was saved
    assert f"stopped by SIGUSR1 after {event['step']} steps" in out

    resumed = run(train_cmd(stopped, demo_data, *STEPS))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [e["step"] for e in events(stopped, "resumed")] == [event["step"]]
    assert step_losses(stopped) == step_losses(straight)  # bit-exact on CPU


@pytest.mark.multiprocess
def test_a_slurm_step_environment_starts_two_ranks(tmp_path, demo_data, two_rank_losses):
    """Two tasks as srun starts them (no torchrun): SLURM_* only, rank 0 on the first node."""
    run_dir = tmp_path / "slurm-step"
    procs = []
    for rank in range(2):
        env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                           "MASTER_PORT", "LOCAL_RANK")}
        env.update(SLURM_STEP_NUM_TASKS="2", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                   SLURM_STEP_NODELIST="localhost", SLURM_JOB_ID=str(os.getpid()),
                   SLURM_NTASKS="2")
        procs.append(subprocess.Popen(train_cmd(run_dir, demo_data, *STEPS), cwd=ROOT,
                                      env=env, text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE))
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    assert "rank 1 of 2 (slurm)" in outputs[1][1]
    rng_files = sorted(p.name for p in (run_dir / "checkpoints" / "step-000012" / "rng").iterdir())
    assert rng_files == ["rank-00000.pt", "rank-00001.pt"]
    assert step_losses(run_dir) == two_rank_losses


FAKE_SRUN = """#!/bin/bash
# srun on one node: drop srun's options and become the command (signals then reach it).
while [[ $1 == --* ]]; do shift; done
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
case $1 in
  show) echo localhost ;;
  requeue) echo "requeue $2" >> "$FAKE_SLURM_LOG" ;;
esac
"""


@pytest.mark.multiprocess
def test_the_sbatch_script_requeues_before_the_time_limit(tmp_path, demo_data,
                                                          two_rank_losses):
    """The rendered script under stand-ins for srun and scontrol: SIGUSR1 to the batch shell
    reaches both trainers through torchrun, they checkpoint, the job asks for a requeue, and
    the requeued job finishes with the uninterrupted run's losses."""
    bin_dir, run_dir = tmp_path / "bin", tmp_path / "run"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    overrides = (f"output_dir={run_dir}", *data_overrides(demo_data), *STEPS)
    script = tmp_path / "job.sbatch"
    script.write_text(SlurmJob(str(ROOT / TINY), overrides, str(run_dir), str(ROOT), 1, 2,
                               "tiny", cpus_per_gpu=1, signal_lead_s=60).render())
    env = {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "localhost", "FAKE_SLURM_LOG": str(tmp_path / "slurm.log")}
    job = subprocess.Popen(["bash", str(script)], env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_checkpoint(job, run_dir, "step-000002")
        job.send_signal(signal.SIGUSR1)
        out, _ = job.communicate(timeout=300)
    finally:
        for pid in [*descendants(job.pid), job.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert job.returncode != 0, out[-3000:]
    assert (tmp_path / "slurm.log").read_text() == "requeue 4242\n", out[-3000:]
    [stopped] = events(run_dir, "stopped")
    assert stopped["signal"] == "SIGUSR1" and stopped["step"] < 12
    assert out.count(f"stopped by SIGUSR1 after {stopped['step']} steps") == 2  # both ranks

    again = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert (tmp_path / "slurm.log").read_text() == "requeue 4242\n"  # no second requeue
    assert [e["step"] for e in events(run_dir, "resumed")] == [stopped["step"]]
    assert step_losses(run_dir) == two_rank_losses


@pytest.mark.multiprocess
def test_torchrun_restarts_the_group_after_a_rank_dies(tmp_path, demo_data, two_rank_losses):
    """`stripes launch torchrun --max-restarts 1`: SIGKILL one trainer mid-run; torchrun
    stops the other, starts both again, and they resume from the latest checkpoint."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "stripes.launch.cli", "launch", "torchrun", TINY,
           f"output_dir={run_dir}", *data_overrides(demo_data), *STEPS,
           "--nproc-per-node", "2", "--max-restarts", "1"]
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
    wait_for_checkpoint(launcher, run_dir, "step-000004")
    trainers = [pid for pid in descendants(launcher.pid)
                if b"stripes.launch.cli\0train" in cmdline(pid)]
    assert len(trainers) == 2
    os.kill(trainers[1], signal.SIGKILL)
    out, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, out[-3000:]
    resumed = [e["step"] for e in events(run_dir, "resumed")]
    assert len(resumed) == 1 and resumed[0] >= 4
    assert step_losses(run_dir) == two_rank_losses


@pytest.mark.multiprocess
def test_a_dead_rank_brings_the_group_down(tmp_path, demo_data):
    """No restarts: when one trainer dies the launcher ends the other and fails, naming the
    dead rank as the root cause, instead of hanging."""
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(torchrun(run_dir, demo_data), cwd=ROOT, env=ENV, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for_checkpoint(launcher, run_dir, "step-000002")
    trainers = [pid for pid in descendants(launcher.pid)
                if b"stripes.launch.cli\0train" in cmdline(pid)]
    os.kill(trainers[1], signal.SIGKILL)
    out, _ = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    assert "Root Cause" in out and "Signal 9 (SIGKILL)" in out, out[-3000:]
    assert not [pid for pid in trainers if cmdline(pid)], "a trainer outlived the launcher"
