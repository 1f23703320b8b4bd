"""Launch environments and launch commands, without starting a run: Slurm host lists, the
world each launcher describes, the rendered sbatch script and torchrun line, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stripes.core.config import ConfigError
from stripes.launch.slurm_script import SlurmJob, fill
from stripes.train.launch_env import (
    MULTICAST_OFF,
    LaunchEnv,
    detect_launch_env,
    expand_hostlist,
    multicast_settings,
)

from conftest import ROOT

EXPECTED = Path(__file__).parent / "expected"


def test_hostlist_expansion():
    assert expand_hostlist("localhost") == ["localhost"]
    assert expand_hostlist("gpu[01-03,07],login") == ["gpu01", "gpu02", "gpu03", "gpu07",
                                                      "login"]
    assert expand_hostlist("r[1-2]n[8-10]") == ["r1n8", "r1n9", "r1n10", "r2n8", "r2n9",
                                                "r2n10"]
    assert expand_hostlist("a[9-11]-ib") == ["a9-ib", "a10-ib", "a11-ib"]
    for bad in ("gpu[01-", "gpu[a-b]", "gpu]1["):
        with pytest.raises(ConfigError, match="SLURM_STEP_NODELIST"):
            expand_hostlist(bad)


def test_each_launcher_describes_its_world():
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0",
                "MASTER_PORT": "29500", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0"}
    assert detect_launch_env(torchrun) == LaunchEnv("torchrun", 3, 8, 1, "n0", 29500)
    step = {"SLURM_STEP_NUM_TASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
            "SLURM_STEP_NODELIST": "gpu[07-14]", "SLURM_JOB_ID": "123456"}
    env = detect_launch_env(step)
    assert env == LaunchEnv("slurm", 9, 16, 1, "gpu07", 20000 + 123456 % 20000)
    assert env.torch_variables() == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1",
                                     "MASTER_ADDR": "gpu07", "MASTER_PORT": str(env.master_port)}
    assert detect_launch_env({**step, "MASTER_PORT": "29999"}).master_port == 29999
    # The batch script has SLURM_PROCID and SLURM_NTASKS too, but it is not a step: one process.
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "gpu[1-4]"}
    assert detect_launch_env(batch) == LaunchEnv("single", 0, 1, 0)
    assert detect_launch_env(batch).torch_variables() == {}
    with pytest.raises(ConfigError, match="SLURM_PROCID='x'"):
        detect_launch_env({**step, "SLURM_PROCID": "x"})


def job(nodes: int, **kw) -> SlurmJob:
    return SlurmJob("/jobs/sh2.yaml", ("steps=1000", "optim.lr=3e-4"), "/runs/sh2", "/jobs",
                    nodes, 8, "sh2", python="/venv/bin/python", **kw)


@pytest.mark.parametrize("nodes,extra", [
    (1, {}),
    (4, {"sbatch_options": ("--partition=gpu", "--time=2-00:00:00", "--account=lm"),
         "env": ("NCCL_SOCKET_IFNAME=ib0", "HF_HOME=/scratch/my hf"), "max_restarts": 2}),
])
def test_sbatch_script_is_the_expected_one(nodes, extra, tmp_path):
    script = job(nodes, **extra).render()
    expected = EXPECTED / f"slurm-{nodes}-node.sbatch"
    assert script == expected.read_text(), f"rendered script differs from {expected}"
    (tmp_path / "job.sbatch").write_text(script)
    syntax = subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")], capture_output=True,
                            text=True)
    assert syntax.returncode == 0, syntax.stderr


def test_template_and_values_must_agree():
    assert fill("a {{x}} b {{y}}", {"x": "1", "y": "2"}) == "a 1 b 2"
    with pytest.raises(ValueError, match="placeholders"):
        fill("a {{x}}", {"x": "1", "y": "2"})
    with pytest.raises(ValueError, match="placeholders"):
        fill("a {{x}} {{z}}", {"x": "1"})


def stripes(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
    # PATH holds no sbatch: a machine with Slurm must not get a job from the tests.
    env = {key: value for key, value in os.environ.items() if key not in MULTICAST_OFF}
    env.update(PATH=str(Path(sys.executable).parent), **extra_env)
    return subprocess.run([sys.executable, "-m", "stripes.launch.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=env)


def test_torchrun_lines():
    one = stripes("launch", "torchrun", "configs/train/tiny.yaml", "steps=3",
                  "--nproc-per-node", "2", "--dry-run")
    assert one.returncode == 0, one.stderr
    # NVLink multicast off (train/launch_env.py), then the torchrun line
    assert one.stdout.split()[:3] == ["NCCL_NVLS_ENABLE=0", "TORCH_SYMM_MEM_DISABLE_MULTICAST=1",
                                      "NVSHMEM_DISABLE_NVLS=1"]
    assert one.stdout.split()[4:] == [
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "--max-restarts", "0", "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        "--shutdown-timeout", "100", "-m", "stripes.launch.cli", "train",
        "configs/train/tiny.yaml", "steps=3"]
    two = stripes("launch", "torchrun", "configs/train/tiny.yaml", "--nodes", "2",
                  "--nproc-per-node", "8", "--rdzv-endpoint", "n0:29500", "--rdzv-id", "j1",
                  "--max-restarts", "3", "--dry-run")
    assert two.returncode == 0, two.stderr
    assert ("--nnodes 2 --rdzv-backend c10d --rdzv-endpoint n0:29500 --rdzv-id j1 "
            "--nproc-per-node 8 --max-restarts 3") in two.stdout


@pytest.mark.parametrize("args,message", [
    (["torchrun", "configs/train/tiny.yaml", "--nodes", "2", "--dry-run"], "--rdzv-endpoint"),
    (["torchrun", "configs/train/tiny.yaml", "--nproc-per-node", "0", "--dry-run"],
     "positive integers"),
    (["slurm", "configs/train/tiny.yaml", "--nodes", "1", "--gpus-per-node", "8",
      "--env", "1X=2", "--dry-run"], "--env='1X=2'"),
    (["slurm", "configs/train/tiny.yaml", "--nodes", "1", "--gpus-per-node", "8",
      "--signal-lead", "10", "--dry-run"], "at least 30 seconds"),
    (["slurm", "configs/train/tiny.yaml", "stepz=3", "--nodes", "1", "--gpus-per-node", "8",
      "--dry-run"], "stepz"),
    (["slurm", "configs/train/tiny.yaml", "--nodes", "1", "--gpus-per-node", "8"], "sbatch"),
])
def test_bad_launch_input_is_one_line(args, message):
    done = stripes("launch", *args)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr


def test_nvlink_multicast_is_off_unless_the_environment_says(monkeypatch):
    from stripes.train.distributed import init_world

    for key in MULTICAST_OFF:
        monkeypatch.delenv(key, raising=False)
    assert multicast_settings() == MULTICAST_OFF
    assert multicast_settings({"NCCL_NVLS_ENABLE": "1"})["NCCL_NVLS_ENABLE"] == "1"
    init_world("cpu")  # the trainer sets them before any process group exists
    assert all(os.environ[key] == off for key, off in MULTICAST_OFF.items())
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    init_world("cpu")
    assert os.environ["NCCL_NVLS_ENABLE"] == "1"  # a deliberate choice is kept
    line = stripes("launch", "torchrun", "configs/train/tiny.yaml", "--dry-run",
                   NCCL_NVLS_ENABLE="1").stdout
    assert line.startswith("NCCL_NVLS_ENABLE=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 ")
