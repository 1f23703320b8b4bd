"""stripes export: a checkpoint becomes one safetensors file + model YAML, loading exactly."""

from __future__ import annotations

import dataclasses

import torch
import yaml

from stripes.arch import ArchFile, StripedLM
from stripes.core.config import load_config
from stripes.launch.cli import main
from stripes.train.checkpoint import DcpStates, save_checkpoint
from stripes.train.export import load_exported

from conftest import TINY


def trained_checkpoint(run_dir):
    cfg = load_config(ArchFile, TINY).model
    torch.manual_seed(0)
    model = StripedLM(cfg)
    model.init_weights()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, cfg.vocab_size, (2, 17))
    model.loss(ids[:, :-1], ids[:, 1:]).backward()
    optimizer.step()
    config = {"model": dataclasses.asdict(cfg), "seed": 0}
    path = save_checkpoint(run_dir, 1, DcpStates(model, optimizer), {"tokens_seen": 32},
                           yaml.safe_dump(config), keep_last=1)
    return model, path, ids


def test_export_round_trip_is_exact(tmp_path, capsys):
    model, path, ids = trained_checkpoint(tmp_path / "run")
    assert main(["export", str(path), str(tmp_path / "out")]) == 0
    exported = load_exported(tmp_path / "out")
    assert torch.equal(exported(ids), model(ids))
    # The exported YAML is a model config `stripes inspect` reads.
    assert main(["inspect", str(tmp_path / "out" / "model.yaml")]) == 0
    assert "total" in capsys.readouterr().out


def test_export_takes_a_run_directory(tmp_path):
    model, _, ids = trained_checkpoint(tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    assert torch.equal(load_exported(tmp_path / "out")(ids), model(ids))


def test_export_of_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope" / "step-000001"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("stripes export: error: checkpoint=")
