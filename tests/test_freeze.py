"""Freezing parameters for part of a run (train/freeze.py): frozen ones stay exactly as they
started until `until_step`, then train; the others train throughout; a graft's report names
what it grafted; bad rules are one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from stripes.arch import StripedLM
from stripes.core.config import ConfigError
from stripes.train.config import load_train_config
from stripes.train.dcp_states import read_dcp_weights
from stripes.train.freeze import FreezeConfig, Freezer
from stripes.train.loop import train

from conftest import ROOT

TINY = ROOT / "configs" / "train" / "tiny.yaml"


def initial_weights(cfg) -> dict[str, torch.Tensor]:
    """The weights the trainer starts from (same seed, same construction)."""
    torch.manual_seed(cfg.seed)
    with torch.device("meta"):
        model = StripedLM(cfg.model)
    model.to_empty(device="cpu")
    model.init_weights()
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_frozen_parameters_wait_until_their_step(tmp_path, demo_data):
    cfg = load_train_config(TINY, [
        f"output_dir={tmp_path}", "steps=4", "checkpoint.every_steps=2",
        "checkpoint.keep_last=2",
        f"data.sources=[{{path: {demo_data}, source: devil}}]",
        "freeze=[{params: ['blocks.0.*', embed.weight], until_step: 2}, "
        "{params: ['blocks.6.mixer.*']}]"])
    start = initial_weights(cfg)
    train(cfg)
    at = {step: read_dcp_weights(tmp_path / "checkpoints" / f"step-{step:06d}")
          for step in (2, 4)}
    for name, before in start.items():
        frozen_early = name.startswith("blocks.0.") or name == "embed.weight"
        frozen_always = name.startswith("blocks.6.mixer.")
        assert torch.equal(at[2][name], before) == (frozen_early or frozen_always), name
        assert torch.equal(at[4][name], before) == frozen_always, name
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    frozen = [(e["step"], e["params"]) for e in events if e.get("event") == "frozen"]
    assert [step for step, _ in frozen] == [0, 2] and frozen[0][1] > frozen[1][1] > 0


def test_a_run_resumed_inside_a_freeze_reproduces_the_run(tmp_path, demo_data):
    """The checkpoint inside the freeze holds a (zero) optimizer state for the parameters
    that never stepped, so it loads into a fresh optimizer, and the resumed run is the
    uninterrupted one, unfreezing included."""
    def run(out):
        return train(load_train_config(TINY, [
            f"output_dir={out}", "steps=6", "checkpoint.every_steps=2",
            "checkpoint.keep_last=3", f"data.sources=[{{path: {demo_data}, source: devil}}]",
            "freeze=[{params: ['blocks.1.*'], until_step: 4}]"]))

    whole = run(tmp_path / "whole")
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    for later in ("step-000004", "step-000006"):
        shutil.rmtree(tmp_path / "resumed" / "checkpoints" / later)
    (tmp_path / "resumed" / "checkpoints" / "latest").write_text("step-000002")
    again = run(tmp_path / "resumed")
    assert sorted(again.losses) == [2, 3, 4, 5]
    assert [again.losses[s] for s in range(2, 6)] == [whole.losses[s] for s in range(2, 6)]


def test_a_graft_report_names_the_grafted_parameters(tmp_path, tiny_cfg):
    (tmp_path / "graft_report.json").write_text(json.dumps({"params": {
        "blocks.3.mixer.q_proj.weight": {"from": "llama:blocks.1.mixer.q_proj.weight"},
        "blocks.0.mixer.filter_taps": {"from": "fresh"}}}))
    model = StripedLM(tiny_cfg)
    freezer = Freezer(model, [FreezeConfig(grafted=str(tmp_path), until_step=5)])
    assert freezer.frozen(4) == [model.blocks[3].mixer.q_proj.weight]
    assert freezer.frozen(5) == []


@pytest.mark.parametrize("freeze, key", [
    ("[{until_step: 3}]", "freeze[0]"),
    ("[{params: ['x.*'], until_step: -1}]", "freeze[0].until_step"),
    ("[{grafted: /no/such/graft}]", "freeze[0].grafted"),
])
def test_bad_rules_are_one_line(freeze, key):
    with pytest.raises(ConfigError) as err:
        load_train_config(TINY, [f"freeze={freeze}"])
    assert str(err.value).startswith(key)


def test_a_pattern_matching_nothing_is_refused(tiny_cfg):
    with pytest.raises(ConfigError, match="freeze\\[0\\].params='blocks.99.\\*'"):
        Freezer(StripedLM(tiny_cfg), [FreezeConfig(params=["blocks.99.*"])])


def test_deepspeed_is_refused():
    with pytest.raises(ConfigError, match="^freeze=.*DeepSpeed"):
        load_train_config(TINY, ["parallel.backend=deepspeed", "freeze=[{params: ['x']}]"])
