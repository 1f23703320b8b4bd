"""`stripes eval perplexity` and `stripes eval passkey` on a checkpoint, run or export: the
numbers are train/evaluate.py's on the same windows; bad input is one line."""

from __future__ import annotations

import json
import math
from contextlib import nullcontext

import pytest
import torch

from stripes.data.loader import LoaderConfig, SourceWeight, TokenDataset
from stripes.launch.cli import main
from stripes.train.evaluate import build_eval_set, evaluate

from conftest import save_trained_checkpoint

SEQ_LEN = 160  # three position buckets: 0-63, 64-127, 128-159


@pytest.fixture
def run(tmp_path, demo_data, tiny_cfg):
    tiny_cfg.vocab_size = 4096  # the demo tokenizer's
    model, _, _ = save_trained_checkpoint(
        tmp_path / "run", tiny_cfg, demo_data, document_masking=True,
        data={"seq_len": SEQ_LEN, "heldout": 0.05})
    return model.eval(), tmp_path / "run"


def test_perplexity_of_the_runs_held_out_tail(run, demo_data, tmp_path, capsys):
    model, run_dir = run
    out = tmp_path / "ppl.json"
    assert main(["eval", "perplexity", str(run_dir), "--samples", "3", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    sources = [SourceWeight(str(demo_data))]
    data = TokenDataset(LoaderConfig(seq_len=SEQ_LEN, sources=sources, heldout=0.05))
    want = evaluate(model, build_eval_set(data, None, 3), 4, 0, 1, torch.device("cpu"),
                    nullcontext(), True, by_position=True)
    assert result["loss"] == pytest.approx(want["loss"], rel=1e-9)
    assert result["perplexity"] == pytest.approx(math.exp(want["loss"]))
    # positions count within documents (the run masked them), and the demo's are short
    assert result["by_position"] == pytest.approx(want["by_position"], rel=1e-9)
    assert result["document_masking"] is True and result["windows"] == 3
    assert main(["eval", "perplexity", str(run_dir), "--samples", "3", "--out", str(out),
                 "--no-document-masking"]) == 0
    result = json.loads(out.read_text())
    assert list(result["by_position"]) == ["0-63", "64-127", "128-159"]
    printed = capsys.readouterr().out
    assert printed.startswith("stripes eval: loss ") and "positions 128-159" in printed


def test_perplexity_of_an_export_on_named_data(run, demo_data, tmp_path, capsys):
    _, run_dir = run
    assert main(["export", str(run_dir), str(tmp_path / "export")]) == 0
    out = tmp_path / "ppl.json"
    assert main(["eval", "perplexity", str(tmp_path / "export"), "--data",
                 f"{demo_data}:jargon", "--samples", "2", "--seq-len", "64", "--out",
                 str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["windows"] == 2 and result["seq_len"] == 64
    assert list(result["by_position"]) == ["0-63"] and "jargon" in result
    assert result["document_masking"] is False  # an export does not say; the flag would


def test_passkey_reports_every_depth(run, tmp_path, capsys):
    _, run_dir = run
    out = tmp_path / "passkey.json"
    assert main(["eval", "passkey", str(run_dir), "--seq-len", "48", "--samples", "4",
                 "--depths", "0.2", "0.8", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"seq_len", "key_len", "depth 0.2", "depth 0.8"}
    assert all(0 <= result[k] <= 1 for k in ("depth 0.2", "depth 0.8"))


def test_bad_input_is_one_line_and_writes_nothing(run, demo_data, tmp_path, capsys):
    model, run_dir = run
    save_trained_checkpoint(tmp_path / "bare")  # no data, vocab 256
    assert main(["export", str(tmp_path / "bare"), str(tmp_path / "small")]) == 0
    assert main(["export", str(run_dir), str(tmp_path / "other")]) == 0
    (tmp_path / "other" / "tokenizer.model").write_bytes(b"another tokenizer")
    out = tmp_path / "never.json"
    cases = [
        (["perplexity", str(tmp_path / "bare")], "--data=None: the model's run held out"),
        (["perplexity", str(tmp_path / "small"), "--data", str(demo_data)],
         "its tokenizer has 4096 ids"),
        (["perplexity", str(tmp_path / "other"), "--data", str(demo_data)],
         "its tokenizer.model differs"),
        (["perplexity", str(tmp_path / "nope")], "model="),
        (["perplexity", str(run_dir), "--samples", "0"], "--samples=0"),
        (["passkey", str(run_dir), "--samples", "0"], "--samples=0"),
        (["passkey", str(run_dir), "--depths", "0.5", "1.5"], "--depths=[0.5, 1.5]"),
    ]
    capsys.readouterr()
    for args, expected in cases:
        assert main(["eval", *args, "--out", str(out)]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("stripes eval: error: "), err
        assert expected in err, err
    assert not out.exists()
