"""stripes export: a checkpoint becomes one safetensors file + model YAML (+ the tokenizer),
loading exactly."""

from __future__ import annotations

import torch

from stripes.launch.cli import main
from stripes.train.export import load_exported

from conftest import save_trained_checkpoint


def test_export_round_trip_is_exact(tmp_path, capsys):
    model, path, ids = save_trained_checkpoint(tmp_path / "run")
    assert main(["export", str(path), str(tmp_path / "out")]) == 0
    exported = load_exported(tmp_path / "out")
    assert torch.equal(exported(ids), model(ids))
    assert not (tmp_path / "out" / "tokenizer.model").exists()  # the run names no data
    # The exported YAML is a model config `stripes inspect` reads.
    assert main(["inspect", str(tmp_path / "out" / "model.yaml")]) == 0
    assert "total" in capsys.readouterr().out


def test_export_takes_a_run_directory_and_copies_the_tokenizer(tmp_path, demo_data):
    model, _, ids = save_trained_checkpoint(tmp_path / "run", data_dir=demo_data)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    assert torch.equal(load_exported(tmp_path / "out")(ids), model(ids))
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == \
        (demo_data / "tokenizer.model").read_bytes()


def test_export_of_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope" / "step-000001"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("stripes export: error: checkpoint=")
    assert not (tmp_path / "o").exists()
