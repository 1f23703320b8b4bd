"""Checkpoints: exact round trip (model, optimizer, RNG, trainer state), keep_last and `latest`,
a save killed at each phase, refusal of another architecture, RNG on another world size, and
(multiprocess) DDP and FSDP2 checkpoints from 2 gloo ranks loaded by one process and back."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from stripes.arch import ArchFile, StripedLM
from stripes.core import log as stripes_log
from stripes.core.config import ConfigError, load_config
from stripes.train import rng
from stripes.train.checkpoint import (
    CheckpointMismatch,
    DcpStates,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from stripes.train.distributed import close_world

from conftest import ROOT, TINY

CONFIG = "seed: 7\nsteps: 10\n"


def tiny_model(*overrides: str, seed: int = 0) -> StripedLM:
    torch.manual_seed(seed)
    model = StripedLM(load_config(ArchFile, TINY, list(overrides)).model)
    model.init_weights()
    return model


def linear(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """One AdamW step on a batch drawn from torch's global RNG (so RNG restore matters).
    `model` may be wrapped (DDP, fully_shard): the forward goes through the wrapper."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if isinstance(inner, StripedLM):
        tokens = torch.randint(0, inner.cfg.vocab_size, (2, 16))
        logits = model(tokens)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten())
    else:
        loss = model(torch.randn(5, 4)).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = [t.detach().clone() for t in model.state_dict().values()]
    for state in optimizer.state_dict()["state"].values():
        tensors += [v.clone() for v in state.values()]
    return tensors


def assert_identical(left: list[torch.Tensor], right: list[torch.Tensor]) -> None:
    assert len(left) == len(right)
    for a, b in zip(left, right, strict=True):
        assert torch.equal(a, b)


def draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_round_trip_is_exact_and_resumes_the_same_trajectory(tmp_path):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        train_step(model, optimizer)
    state = {"tokens_seen": 64, "loader": {"samples_consumed": 4, "seed": 1}, "skipped": 0}
    path = save_checkpoint(tmp_path, 2, DcpStates(model, optimizer), state, CONFIG, keep_last=2)
    saved = snapshot(model, optimizer)
    train_step(model, optimizer)  # the run that never stopped: its next batch, then moves on
    continued, expected_draws = snapshot(model, optimizer), draws()

    resumed = tiny_model(seed=1)  # different weights, a fresh optimizer with no state
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=5.0)
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    returned = load_checkpoint(path, DcpStates(resumed, resumed_opt))

    assert returned == {**state, "step": 2}
    assert_identical(snapshot(resumed, resumed_opt), saved)
    assert resumed_opt.param_groups[0]["lr"] == 1e-2
    train_step(resumed, resumed_opt)  # same batch (RNG restored), same update (Adam state)
    assert_identical(snapshot(resumed, resumed_opt), continued)
    assert draws() == expected_draws  # python, numpy and torch generators all restored
    assert (path / "config.yaml").read_text() == CONFIG
    record = json.loads((path / "trainer.json").read_text())
    assert record["step"] == 2 and record["world_size"] == 1 and record["trainer"] == state


def test_model_only_load_leaves_no_optimizer_needed(tmp_path):
    model = linear(0)
    optimizer = torch.optim.AdamW(model.parameters())
    train_step(model, optimizer)
    path = save_checkpoint(tmp_path, 1, DcpStates(model, optimizer), {}, {"seed": 1}, keep_last=1)
    other = linear(1)
    assert load_checkpoint(path, DcpStates(other, None)) == {"step": 1}
    assert_identical(list(other.state_dict().values()), list(model.state_dict().values()))


def test_keep_last_latest_and_stale_tmp(tmp_path):
    model = linear(0)
    optimizer = torch.optim.AdamW(model.parameters())
    root = tmp_path / "checkpoints"
    for step in (100, 200, 300):
        save_checkpoint(tmp_path, step, DcpStates(model, optimizer), {}, CONFIG, keep_last=2)
    stale = root / "step-000400.tmp"
    (stale / "model").mkdir(parents=True)
    (root / ".latest.tmp-12345").write_text("step-000400\n")
    assert find_checkpoint(tmp_path, "auto") == root / "step-000300"
    with pytest.raises(ConfigError, match="unfinished save"):
        find_checkpoint(tmp_path, str(stale))

    save_checkpoint(tmp_path, 1000000, DcpStates(model, optimizer), {}, CONFIG, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000300", "step-1000000"]
    assert (root / "latest").read_text().strip() == "step-1000000"
    assert find_checkpoint(tmp_path, "auto") == root / "step-1000000"
    assert find_checkpoint(tmp_path, "never") is None
    assert find_checkpoint(tmp_path, str(root / "step-000300")) == root / "step-000300"
    assert find_checkpoint(tmp_path / "elsewhere", "auto") is None
    with pytest.raises(ConfigError) as err:
        find_checkpoint(tmp_path, str(root / "step-000100"))
    assert "\n" not in str(err.value) and "no such directory" in str(err.value)


def test_same_step_saved_again_replaces_it(tmp_path):
    model = linear(0)
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, 5, DcpStates(model, optimizer), {"run": 1}, CONFIG, keep_last=3)
    path = save_checkpoint(tmp_path, 5, DcpStates(model, optimizer),
                           {"run": 2}, CONFIG, keep_last=3)
    assert load_checkpoint(path, DcpStates(linear(1), None))["run"] == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["latest", "step-000005"]


def test_bad_trainer_state_writes_nothing(tmp_path):
    model = linear(0)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        save_checkpoint(tmp_path, 1, DcpStates(model, optimizer),
                        {"t": object()}, CONFIG, keep_last=1)
    with pytest.raises(ValueError, match="step=3 differs"):
        save_checkpoint(tmp_path, 1, DcpStates(model, optimizer), {"step": 3}, CONFIG, keep_last=1)
    assert not (tmp_path / "checkpoints").exists()


def test_other_architecture_is_refused_in_one_line(tmp_path):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    path = save_checkpoint(tmp_path, 1, DcpStates(model, optimizer), {}, CONFIG, keep_last=1)
    other = tiny_model("model.d_model=32", "model.n_layers=5")
    before = [t.clone() for t in other.state_dict().values()]
    with pytest.raises(CheckpointMismatch) as err:
        load_checkpoint(path, DcpStates(other, torch.optim.AdamW(other.parameters())))
    message = str(err.value)
    assert "\n" not in message and "does not fit this model" in message
    assert re.search(r"unexpected \d+ \(blocks\.4\.", message)  # retention there, not attn
    assert re.search(r"shape-mismatched \d+ \(blocks\.0\.", message)
    assert "norm.weight saved [64] vs [32]" in message
    assert message.endswith("more)")  # the list is capped
    assert_identical(list(other.state_dict().values()), before)


def test_other_optimizer_is_refused(tmp_path):
    model = linear(0)
    optimizer = torch.optim.AdamW(model.parameters())
    train_step(model, optimizer)
    path = save_checkpoint(tmp_path, 1, DcpStates(model, optimizer), {}, CONFIG, keep_last=1)
    other = linear(1)
    with pytest.raises(CheckpointMismatch, match="optimizer: missing 4 .*momentum_buffer"):
        sgd = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
        load_checkpoint(path, DcpStates(other, sgd))


# -- a save killed in the middle -----------------------------------------------------------------
CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    from torch import nn
    import stripes.train.checkpoint as ck

    run_dir, phase, marker = sys.argv[1:]
    def stall(*args, **kwargs):
        Path(marker).touch()
        time.sleep(120)
    setattr(ck, phase, stall)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    ck.save_checkpoint(run_dir, 2, ck.DcpStates(model, torch.optim.AdamW(model.parameters())),
                       {"n": 2},
                       "seed: 7\\n", keep_last=1)
""")


@pytest.mark.parametrize("phase, survivor", [
    ("save_rng", 1),       # model/ and optim/ written, rng not: only a .tmp exists
    ("_publish", 1),       # everything written into step-000002.tmp, not yet renamed
    ("_write_latest", 1),  # renamed to step-000002, `latest` not yet rewritten
    ("_prune", 2),         # `latest` rewritten, step-000001 not yet deleted
])
def test_killed_save_leaves_a_loadable_latest(tmp_path, phase, survivor):
    model = linear(1)
    save_checkpoint(tmp_path, 1, DcpStates(model, torch.optim.AdamW(model.parameters())), {"n": 1},
                    CONFIG, keep_last=1)
    marker = tmp_path / "stalled"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), phase, str(marker)],
                             cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert child.poll() is None, child.stderr.read()
        assert time.monotonic() < deadline, "child never reached the phase"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)

    found = find_checkpoint(tmp_path, "auto")
    assert found == tmp_path / "checkpoints" / f"step-{survivor:06d}"
    loaded = linear(3)
    states = DcpStates(loaded, torch.optim.AdamW(loaded.parameters()))
    assert load_checkpoint(found, states)["n"] == survivor
    assert_identical(list(loaded.state_dict().values()),
                     list(linear(survivor).state_dict().values()))
    save_checkpoint(tmp_path, 3, states, {}, CONFIG, keep_last=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest", "step-000003"]


# -- RNG on another world size -------------------------------------------------------------------
def test_rng_of_missing_ranks_is_seeded_from_seed_and_rank(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(stripes_log, "_said", set())
    rng.save_rng(tmp_path, rank=0)
    expected = draws()
    with caplog.at_level(logging.INFO, logger="stripes"):
        rng.load_rng(tmp_path, rank=0, world_size=3, seed=7)
        assert draws() == expected
        rng.load_rng(tmp_path, rank=1, world_size=3, seed=7)
        first = draws()
        rng.load_rng(tmp_path, rank=1, world_size=3, seed=7)
        assert draws() == first
        rng.load_rng(tmp_path, rank=2, world_size=3, seed=7)
        assert draws() != first
    notes = [r.getMessage() for r in caplog.records if "RNG state for 1 rank" in r.getMessage()]
    assert len(notes) == 1 and "ranks 1..2 are seeded" in notes[0]
    with pytest.raises(ValueError, match="no RNG state for rank 1 and no seed"):
        rng.load_rng(tmp_path, rank=1, world_size=2, seed=None)


# -- several processes (gloo) --------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, run_dir: str, wrap: str) -> None:
    """Resume from the 1-process checkpoint at step 1, train, save step 2 from 2 ranks."""
    finished = False
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        model = tiny_model(seed=5)
        if wrap == "ddp":
            model = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            mesh = init_device_mesh("cpu", (world_size,))  # not CUDA, even where there is one
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        state = load_checkpoint(find_checkpoint(run_dir, "auto"), DcpStates(model, optimizer))
        torch.manual_seed(100 + rank)  # each rank its own batch
        train_step(model, optimizer)
        save_checkpoint(run_dir, 2, DcpStates(model, optimizer),
                        {**state, "step": 2}, CONFIG, keep_last=5)
        if wrap == "fsdp":
            from torch.distributed.tensor import DTensor
            full = {k: v.full_tensor() if isinstance(v, DTensor) else v
                    for k, v in model.state_dict().items()}
        else:
            full = model.module.state_dict()
        if rank == 0:
            torch.save(full, os.path.join(run_dir, "expected.pt"))
        finished = True
    finally:
        close_world(finished=finished)


@pytest.mark.multiprocess
@pytest.mark.parametrize("wrap", ["ddp", "fsdp"])
def test_two_rank_checkpoint_loads_in_one_process_and_back(tmp_path, wrap, caplog, monkeypatch):
    monkeypatch.setattr(stripes_log, "_said", set())
    model = tiny_model(seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_step(model, optimizer)
    save_checkpoint(tmp_path, 1, DcpStates(model, optimizer),
                    {"tokens_seen": 32}, CONFIG, keep_last=5)

    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), wrap), nprocs=2, join=True)

    path = find_checkpoint(tmp_path, "auto")
    assert path.name == "step-000002"
    assert sorted(p.name for p in (path / "rng").iterdir()) == ["rank-00000.pt",
                                                                  "rank-00001.pt"]
    single = tiny_model(seed=9)
    single_opt = torch.optim.AdamW(single.parameters())
    with caplog.at_level(logging.INFO, logger="stripes"):
        state = load_checkpoint(path, DcpStates(single, single_opt))
    assert state == {"tokens_seen": 32, "step": 2}
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    assert expected.keys() == single.state_dict().keys()
    assert_identical(list(single.state_dict().values()), list(expected.values()))
    assert not torch.equal(single.embed.weight, model.embed.weight)  # it did train on 2 ranks
    assert all(s["step"].item() == 2 for s in single_opt.state.values())
    assert any("state of ranks 1..1 is not used" in r.getMessage() for r in caplog.records)
