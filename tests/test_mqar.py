"""Multi-query associative recall: the generator's properties, a tiny attention model that
learns it on the CPU, and the sweep command's table, plot and skipping of finished runs."""

from __future__ import annotations

import json

import pytest
import torch

from stripes.core.config import ConfigError
from stripes.launch.cli import main
from stripes.train.mqar import FILLER, IGNORE, MqarTask, mqar_batch
from stripes.train.mqar_sweep import MqarTraining, model_config, train_one

from conftest import ROOT


@pytest.mark.parametrize("task", [MqarTask(32, 32, 4), MqarTask(64, 48, 12), MqarTask(8, 12, 3)])
def test_generator_pairs_queries_and_labels(task):
    task.validate("task")
    inputs, targets = mqar_batch(task, 256, torch.Generator().manual_seed(0))
    P, half = task.num_pairs, task.vocab_size // 2
    assert inputs.shape == targets.shape == (256, task.seq_len)
    for x, y in zip(inputs.tolist(), targets.tolist(), strict=True):
        keys, values = x[0:2 * P:2], x[1:2 * P:2]
        assert len(set(keys)) == P and all(1 <= k < half for k in keys)  # keys unique
        assert all(half <= v < task.vocab_size for v in values)
        answers = [t for t, label in enumerate(y) if label != IGNORE]
        assert len(answers) == P and min(answers) >= 2 * P  # labels only at the queries
        pairs = dict(zip(keys, values, strict=True))
        assert sorted(x[t] for t in answers) == sorted(keys)  # every key queried once
        for t in answers:  # each query names an earlier key; its label is that key's value
            assert y[t] == pairs[x[t]] and x[t] in x[:t]
            if t + 1 < task.seq_len:
                assert x[t + 1] == y[t]  # the answer is the next input
        rest = [x[t] for t in range(2 * P, task.seq_len) if t not in answers
                and t - 1 not in answers]
        assert set(rest) <= {FILLER}


def test_generator_is_seeded():
    task = MqarTask()
    draw = lambda seed: mqar_batch(task, 4, torch.Generator().manual_seed(seed))
    assert all(torch.equal(a, b) for a, b in zip(draw(1), draw(1), strict=True))
    assert not torch.equal(draw(1)[0], draw(2)[0])


@pytest.mark.parametrize("fields, key", [((64, 32, 9), "task.num_pairs"),  # no query room
                                         ((16, 64, 8), "task.num_pairs"),  # too few keys
                                         ((0, 32, 2), "task.vocab_size")])
def test_bad_tasks_are_refused(fields, key):
    with pytest.raises(ConfigError, match=rf"^{key}="):
        MqarTask(*fields).validate("task")


def test_a_tiny_attention_model_learns_recall():
    task = MqarTask(vocab_size=32, seq_len=32, num_pairs=4)
    cfg = model_config("attention", {"stripes": ["attn"], "mixers": {"attn": {"n_heads": 1}}},
                       64, task)
    result = train_one(cfg, task, MqarTraining(steps=600, eval_samples=512),
                       torch.device("cpu"))
    assert result["accuracy"] > 0.95, result  # chance is 1/16


def test_sweep_writes_table_and_plot_and_skips_finished_runs(tmp_path, capsys, monkeypatch):
    args = ["eval", "mqar", str(ROOT / "configs/eval/mqar-demo.yaml"), f"output={tmp_path}",
            "mqar.train.steps=3", "mqar.train.eval_samples=8", "mqar.widths=[8,16]"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.count("stripes eval: mqar ") == 4
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [(r["name"], r["width"]) for r in saved["runs"]] == [
        ("attention", 8), ("attention", 16), ("hyena", 8), ("hyena", 16)]
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[0] == "| model | d_model 8 | d_model 16 |" and len(table) == 4
    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    import stripes.train.mqar_sweep as sweep

    trained = sweep.train_one
    monkeypatch.setattr(sweep, "train_one", lambda *a: pytest.fail("retrained a finished run"))
    assert main(args) == 0  # the same settings: every run is read back
    assert capsys.readouterr().out == first
    monkeypatch.setattr(sweep, "train_one", trained)
    assert main(args[:-1] + ["mqar.widths=[8]", "mqar.train.seed=1"]) == 0  # new settings
    assert len(json.loads((tmp_path / "results.json").read_text())["runs"]) == 2


@pytest.mark.parametrize("override, key", [("mqar.widths=[0]", "mqar.widths[0]"),
                                           ("mqar.task.num_pairs=100", "mqar.task.num_pairs"),
                                           ("mqar.models.hyena.stripes=[nope]",
                                            "mqar.models.hyena.stripes[0]")])
def test_sweep_bad_input_is_one_line(tmp_path, capsys, override, key):
    args = ["eval", "mqar", str(ROOT / "configs/eval/mqar-demo.yaml"), f"output={tmp_path}",
            override]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"stripes eval: error: {key}=")
    assert not (tmp_path / "results.json").exists()


def test_a_broken_results_file_is_one_line_and_kept(tmp_path, capsys):
    (tmp_path / "results.json").write_text("{not json")
    args = ["eval", "mqar", str(ROOT / "configs/eval/mqar-demo.yaml"), f"output={tmp_path}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "results.json does not parse" in err
    assert (tmp_path / "results.json").read_text() == "{not json"


def test_a_finished_run_with_layer_overrides_is_read_back(tmp_path, monkeypatch):
    """Saved configs pass through JSON (integer override keys become strings); a run is
    still recognised as done."""
    import stripes.train.mqar_sweep as sweep

    models = {"mixed": {"n_layers": 2, "stripes": ["hyena_li"], "overrides": {1: "attn"},
                        "mixers": {"attn": {"n_heads": 1}}}}
    cfg = sweep.MqarFile(mqar=sweep.MqarSweep(task=MqarTask(16, 16, 2), widths=[16],
                                              train=MqarTraining(steps=2, eval_samples=4),
                                              models=models), output=str(tmp_path))
    first = sweep.run_sweep(cfg, log=lambda line: None)
    monkeypatch.setattr(sweep, "train_one", lambda *a: pytest.fail("retrained a finished run"))
    assert sweep.run_sweep(cfg, log=lambda line: None)[0]["accuracy"] == first[0]["accuracy"]
