"""`stripes plot`: reading metrics.jsonl (last record per step, torn tail, non-finite values)
and the PNG it draws, plus its one-line errors. Every metrics file here is written by
MetricsLogger itself, so the reader is tested against the real format, not a copy of it."""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import pytest
from PIL import Image

from stripes.launch.cli import main
from stripes.train.metrics import MetricsLogger
from stripes.train.plot import draw_curves, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TORN = '{"step": 9, "loss": 1.2, "lr": 0.0'  # what a crash mid-write leaves behind


def log_step(logger: MetricsLogger, step: int, loss: float, **changes) -> None:
    fields = dict(loss=loss, lr=1e-3 * min(1.0, step / 3), grad_norm=1.0 / step,
                  tokens_per_s=None if step == 1 else 1000.0 + step, mfu=None,
                  step_time_s=0.5, tokens_seen=256 * step, skipped_steps=0)
    logger.log(step, **{**fields, **changes})


def log_eval(logger: MetricsLogger, step: int, loss: float, jargon: float | None = None) -> None:
    jargon = loss - 0.1 if jargon is None else jargon
    logger.log_eval(step, {"loss": loss, "devil": loss + 0.1, "jargon": jargon})


@pytest.fixture
def resumed_run(tmp_path) -> Path:
    """Steps 1-6 (checkpoint at 4, eval at 6), a crash, then a resume from step 4 that logs
    steps 5-8 again with other values (step 7 non-finite) and is itself cut mid-line."""
    run_dir = tmp_path / "resumed"
    with MetricsLogger(run_dir, 8, rank=0, stream=io.StringIO()) as first:
        for step in range(1, 7):
            log_step(first, step, loss=10.0 - step)
            if step == 4:
                first.log_event("checkpoint", step=4, path=run_dir / "checkpoints/step-4")
        log_eval(first, 6, loss=5.0)
    with MetricsLogger(run_dir, 8, rank=0, stream=io.StringIO()) as second:
        for step in range(5, 9):
            log_step(second, step, loss=math.nan if step == 7 else 20.0 - step,
                     grad_norm=math.inf if step == 7 else 0.5, mfu=0.25)
            if step == 6:
                log_eval(second, 6, loss=4.0)
        second.log_event("bad_step", step=6, loss=math.nan, grad_norm=math.inf)
        log_eval(second, 8, loss=3.0, jargon=math.inf)
    with (run_dir / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write(TORN)
    return run_dir


def plot(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["plot", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def read_png(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.load()  # decodes every pixel: a truncated file fails here
        return image.size


# -- reading -------------------------------------------------------------------------------------
def test_last_record_of_each_step_wins(resumed_run):
    metrics = read_metrics(resumed_run / "metrics.jsonl")
    assert [r["step"] for r in metrics.steps] == list(range(1, 9))
    losses = [r["loss"] for r in metrics.steps]
    assert losses[:4] == [9.0, 8.0, 7.0, 6.0]  # before the checkpoint: the first run's
    assert losses[4:6] == [15.0, 14.0] and losses[7] == 12.0  # logged twice: the resume's
    assert math.isnan(losses[6])
    assert [r["mfu"] for r in metrics.steps[4:]] == [0.25] * 4
    assert [(e["step"], e["loss"]) for e in metrics.evals] == [(6, 4.0), (8, 3.0)]
    assert metrics.evals[0]["per_source"] == pytest.approx({"devil": 4.1, "jargon": 3.9})
    assert metrics.evals[1]["per_source"]["jargon"] == math.inf  # written as "inf"


def test_non_finite_and_null_fields_decode(resumed_run):
    steps = read_metrics(resumed_run / "metrics.jsonl").steps
    assert math.isinf(steps[6]["grad_norm"]) and steps[6]["grad_norm"] > 0
    assert steps[0]["tokens_per_s"] is None and steps[0]["mfu"] is None
    assert isinstance(steps[0]["lr"], float) and steps[0]["tokens_seen"] == 256


def test_torn_tail_is_ignored_and_counted(resumed_run):
    metrics = read_metrics(resumed_run / "metrics.jsonl")
    assert metrics.torn_tail_bytes == len(TORN)
    assert 9 not in [r["step"] for r in metrics.steps]
    # The next logger cuts the torn line off; then the file ends cleanly.
    MetricsLogger(resumed_run, 8, rank=0, stream=io.StringIO()).close()
    assert read_metrics(resumed_run / "metrics.jsonl").torn_tail_bytes == 0


# -- drawing -------------------------------------------------------------------------------------
def test_cli_writes_a_png_and_prints_its_path(capsys, resumed_run):
    code, out, err = plot(capsys, str(resumed_run))
    assert code == 0, err
    png = resumed_run / "curves.png"
    assert out == f"{png}\n"
    width, height = read_png(png)
    assert (width, height) == (1000, 1040)  # 10 x 10.4 inches at 100 dpi: four panels
    # Again, to an explicit --out over an existing file: replaced, no temporary left behind.
    other = resumed_run / "again.png"
    other.write_bytes(b"stale")
    code, out, err = plot(capsys, str(resumed_run), "--out", str(other))
    assert code == 0, err
    assert out == f"{other}\n" and read_png(other) == (width, height)
    assert sorted(p.name for p in resumed_run.iterdir()) == ["again.png", "curves.png",
                                                             "metrics.jsonl"]


def test_first_step_only_draws_three_panels(tmp_path):
    """One step: tokens/s not measured yet, no gradient norm, no evals; still a plot."""
    with MetricsLogger(tmp_path, 10, rank=0, stream=io.StringIO()) as logger:
        log_step(logger, 1, loss=10.0, grad_norm=None)
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    out = draw_curves(metrics, tmp_path / "one.png", "one step")
    assert read_png(out) == (1000, 780)  # 10 x 7.8 inches: no gradient-norm panel


# -- errors --------------------------------------------------------------------------------------
def one_line_error(capsys, *args: str) -> str:
    code, out, err = plot(capsys, *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("stripes plot: error: "), err
    return err


def test_missing_run_dir_or_metrics(capsys, tmp_path):
    err = one_line_error(capsys, str(tmp_path / "nowhere"))
    assert "not a directory" in err and "a run directory with metrics.jsonl" in err
    err = one_line_error(capsys, str(tmp_path))
    assert "no metrics.jsonl in it" in err


def test_no_step_records_yet(capsys, tmp_path):
    with MetricsLogger(tmp_path, 10, rank=0, stream=io.StringIO()) as logger:
        logger.log_event("checkpoint", step=0, path="x")
    with (tmp_path / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write(TORN)
    err = one_line_error(capsys, str(tmp_path))
    assert "no step records yet" in err
    assert not (tmp_path / "curves.png").exists()


def test_malformed_line_names_file_and_line(capsys, resumed_run):
    path = resumed_run / "metrics.jsonl"
    lines = path.read_text().split("\n")
    lines[2] = lines[2][:-1]  # a complete line (it has its newline) that is not JSON
    path.write_text("\n".join(lines))
    err = one_line_error(capsys, str(resumed_run))
    assert f"{path}:3" in err and "not JSON" in err


@pytest.mark.parametrize("out", ["missing-dir/curves.png", "a-directory.png", "curves.pdf"])
def test_unwritable_or_wrong_out(capsys, resumed_run, out):
    (resumed_run / "a-directory.png").mkdir()
    target = resumed_run / out
    err = one_line_error(capsys, str(resumed_run), "--out", str(target))
    assert f"--out='{target}'" in err
    assert ".png" in err
    assert not any(p.name.endswith(".tmp") for p in resumed_run.iterdir())


def test_missing_matplotlib_says_which_extra(capsys, monkeypatch, resumed_run):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import now fails
    err = one_line_error(capsys, str(resumed_run))
    assert "matplotlib" in err and "pip install 'stripes[plot]'" in err
