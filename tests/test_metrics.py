"""Metrics: JSONL records and events, resume appends, rank 0 only, MFU and peak FLOP/s,
memory, the console line (plain off a terminal), throughput with a fake clock, and wandb
(missing: one clear error; present: a stand-in module, so wandb itself is never imported)."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import time
from types import SimpleNamespace

import pytest

from stripes.core import log as core_log
from stripes.core.config import ConfigError
from stripes.train.metrics import (
    PEAK_BF16_FLOPS,
    MetricsLogger,
    Throughput,
    format_duration,
    format_progress,
    memory_gib,
    mfu,
    peak_flops,
    peak_flops_for_name,
)

FIELDS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time_s", "memory_gib",
          "tokens_seen", "skipped_steps", "time"}


def step_fields(step: int, **changes) -> dict:
    fields = dict(loss=5.0 - 0.1 * step, lr=3e-4, grad_norm=0.5, tokens_per_s=12345.6,
                  mfu=0.412, step_time_s=2.0, tokens_seen=4096 * step, skipped_steps=0)
    return {**fields, **changes}


def read(path) -> list[dict]:
    def refuse(constant):  # strict JSON: no NaN / Infinity literals
        raise ValueError(constant)

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


@pytest.fixture
def fresh_notes(monkeypatch):
    """Forget what note_once already said, so a test can see its message."""
    monkeypatch.setattr(core_log, "_said", set())


# -- JSONL ---------------------------------------------------------------------------------------
def test_records_and_events_are_strict_json_with_every_field(tmp_path):
    before = time.time()
    with MetricsLogger(tmp_path / "run", 100, rank=0, stream=io.StringIO()) as logger:
        for step in (1, 2, 3):
            logger.log(step, **step_fields(step))
        logger.log_event("checkpoint_saved", step=3, path=tmp_path / "ckpt")
    records = read(tmp_path / "run" / "metrics.jsonl")
    assert len(records) == 4
    for step, record in zip((1, 2, 3), records[:3], strict=True):
        assert set(record) == FIELDS
        assert record["step"] == step
        assert record["tokens_seen"] == 4096 * step
        assert record["loss"] == pytest.approx(5.0 - 0.1 * step)
        assert before <= record["time"] <= time.time()
        assert record["memory_gib"] > 0
    assert records[3]["event"] == "checkpoint_saved"
    assert records[3]["path"] == str(tmp_path / "ckpt")
    assert records[3]["step"] == 3


def test_unknown_values_are_null_and_non_finite_ones_strings(tmp_path):
    with MetricsLogger(tmp_path, 10, rank=0, stream=io.StringIO()) as logger:
        logger.log(1, **step_fields(1, loss=float("nan"), grad_norm=float("inf"),
                                    tokens_per_s=None, mfu=None, step_time_s=None))
    (record,) = read(tmp_path / "metrics.jsonl")
    assert record["loss"] == "nan" and record["grad_norm"] == "inf"
    assert record["tokens_per_s"] is None and record["mfu"] is None


def test_a_resumed_run_appends_to_the_same_file(tmp_path):
    with MetricsLogger(tmp_path, 100, rank=0, stream=io.StringIO()) as logger:
        logger.log(1, **step_fields(1))
        logger.log(2, **step_fields(2))
    with MetricsLogger(tmp_path, 100, rank=0, stream=io.StringIO()) as logger:
        logger.log_event("resumed", step=2)
        logger.log(3, **step_fields(3))
    records = read(tmp_path / "metrics.jsonl")
    assert [r.get("step") for r in records] == [1, 2, 2, 3]
    assert records[2]["event"] == "resumed"


def test_a_torn_last_line_is_cut_before_appending(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(tmp_path, 100, rank=0, stream=io.StringIO()) as logger:
        logger.log(1, **step_fields(1))
    with path.open("a") as f:
        f.write('{"step": 2, "lo')  # a crash mid-write
    with caplog.at_level(logging.WARNING, logger="stripes"), \
            MetricsLogger(tmp_path, 100, rank=0, stream=io.StringIO()) as logger:
        logger.log(2, **step_fields(2))
    assert [r["step"] for r in read(path)] == [1, 2]
    assert any("torn last record (15 bytes)" in r.getMessage() for r in caplog.records)


def test_other_ranks_write_and_print_nothing(tmp_path):
    out = io.StringIO()
    with MetricsLogger(tmp_path / "run", 100, rank=1, stream=out) as logger:
        logger.log(1, **step_fields(1))
        logger.log_event("resumed", step=0)
    assert not (tmp_path / "run").exists()
    assert out.getvalue() == ""


# -- console -------------------------------------------------------------------------------------
def test_console_is_plain_text_when_stdout_is_not_a_tty(tmp_path, capsys):
    with MetricsLogger(tmp_path, 100, rank=0) as logger:
        logger.log(10, **step_fields(10))
        logger.log_event("checkpoint_saved", step=10)
    lines = capsys.readouterr().out.splitlines()
    (record, _) = read(tmp_path / "metrics.jsonl")
    assert lines == [format_progress(record, 100), "[checkpoint_saved] step=10"]
    assert "\x1b" not in "".join(lines)


def test_console_is_styled_on_a_terminal(tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for var in ("NO_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    out = Terminal()
    with MetricsLogger(tmp_path, 100, rank=0, stream=out) as logger:
        logger.log(10, **step_fields(10))
    (record,) = read(tmp_path / "metrics.jsonl")
    assert "\x1b[" in out.getvalue()
    assert re.sub(r"\x1b\[[0-9;]*m", "", out.getvalue()) == format_progress(record, 100) + "\n"


def test_progress_line_content():
    record = {"step": 10, **step_fields(10), "memory_gib": 12.34}
    line = format_progress(record, 100)
    assert line.startswith("step 10/100  10% | loss 4.0000 | lr 3.00e-04 | gnorm 0.500")
    assert "12,346 tok/s" in line and "mfu 41.2%" in line and "mem 12.3 GiB" in line
    assert line.endswith("ETA 3m00s")  # 90 steps left at 2 s each
    record.update(tokens_per_s=None, mfu=None, step_time_s=None, skipped_steps=2)
    line = format_progress(record, 100)
    assert "warming up" in line and "mfu" not in line and "skipped 2" in line
    assert line.endswith("ETA ?")


def test_quiet_writes_the_file_but_prints_nothing(tmp_path):
    out = io.StringIO()
    with MetricsLogger(tmp_path, 100, rank=0, quiet=True, stream=out) as logger:
        logger.log(1, **step_fields(1))
    assert out.getvalue() == ""
    assert len(read(tmp_path / "metrics.jsonl")) == 1


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (42.4, "42s"), (185, "3m05s"), (3720, "1h02m"), (2 * 86400 + 3 * 3600, "2d03h"),
])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


# -- MFU, peak FLOP/s, memory --------------------------------------------------------------------
def test_mfu_against_hand_numbers():
    # 1000 tokens/s x 1e9 forward FLOPs x 3 = 3e12 FLOP/s on a 1e13 FLOP/s device: 30 %.
    assert mfu(1000.0, 1e9, 1e13) == pytest.approx(0.3)
    # A 1B-parameter dense model (~2e9 forward FLOPs/token) at 40k tokens/s on an H100 SXM.
    assert mfu(40_000.0, 2e9, 989e12) == pytest.approx(2.4e14 / 989e12)
    assert mfu(None, 1e9, 1e13) is None
    assert mfu(1000.0, 1e9, None) is None


def test_mfu_of_the_tiny_model_uses_its_flops(tiny_cfg):
    from stripes.arch import StripedLM

    fwd = StripedLM(tiny_cfg).flops_per_token(64)
    assert mfu(500.0, fwd, 1e12) == pytest.approx(3 * fwd * 500.0 / 1e12)


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("nvidia a100-pcie-40gb", 312e12),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_lookup_by_device_name(name, peak):
    assert peak_flops_for_name(name) == peak


def test_peak_table_has_the_issue_numbers():
    assert PEAK_BF16_FLOPS["H100"] == 989e12 and PEAK_BF16_FLOPS["H100 PCIe"] == 756e12


def test_cpu_has_no_peak_and_says_so_once(caplog, fresh_notes):
    with caplog.at_level(logging.INFO, logger="stripes"):
        assert peak_flops("cpu") is None
        assert peak_flops("cpu") is None
    said = [r.getMessage() for r in caplog.records if "MFU not reported" in r.getMessage()]
    assert said == ["MFU not reported: no peak FLOP/s for a cpu device"]


def test_cpu_memory_is_peak_rss_and_says_so(caplog, fresh_notes):
    blob = bytearray(64 * 2**20)  # touch 64 MiB so the peak RSS is at least that
    with caplog.at_level(logging.INFO, logger="stripes"):
        assert memory_gib("cpu") >= len(blob) / 2**30
    assert any("peak RSS" in r.getMessage() for r in caplog.records)


# -- throughput ----------------------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_throughput_skips_the_first_step_and_keeps_a_window():
    clock = FakeClock()
    meter = Throughput(window=2, clock=clock)
    clock.now = 30.0  # the first step compiles: 30 s
    meter.update(100)
    assert meter.tokens_per_s() is None and meter.step_time() is None
    clock.now = 31.0
    meter.update(100)
    clock.now = 33.0
    meter.update(100)
    assert meter.step_time() == pytest.approx(1.5)
    assert meter.tokens_per_s() == pytest.approx(200 / 3)
    clock.now = 34.0
    meter.update(400)  # the window of 2 forgets the (1 s, 100 tokens) step
    assert meter.step_time() == pytest.approx(1.5)
    assert meter.tokens_per_s() == pytest.approx(500 / 3)


def test_throughput_mark_excludes_a_pause():
    clock = FakeClock()
    meter = Throughput(window=10, clock=clock)
    for now in (5.0, 6.0):
        clock.now = now
        meter.update(50)
    clock.now = 66.0  # a one-minute checkpoint save
    meter.mark()
    clock.now = 67.0
    meter.update(50)
    assert meter.step_time() == pytest.approx(1.0)
    assert meter.tokens_per_s() == pytest.approx(50.0)


def test_throughput_window_must_be_positive():
    with pytest.raises(ValueError, match="window=0"):
        Throughput(window=0)


# -- wandb ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [0, 1])
def test_missing_wandb_is_one_clear_error_on_every_rank(tmp_path, monkeypatch, rank):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ConfigError) as err:
        MetricsLogger(tmp_path, 100, rank=rank, wandb=True)
    message = str(err.value)
    assert "wandb is not installed" in message and "pip install 'stripes[wandb]'" in message
    assert "\n" not in message
    assert not (tmp_path / "metrics.jsonl").exists()


def test_wandb_is_not_needed_when_not_asked_for(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with MetricsLogger(tmp_path, 100, rank=0, stream=io.StringIO()) as logger:
        logger.log(1, **step_fields(1))
    assert len(read(tmp_path / "metrics.jsonl")) == 1


class FakeWandb:
    """Stands in for the wandb module: records init arguments and logged rows."""

    def __init__(self) -> None:
        self.inits, self.rows, self.finished = [], [], 0
        self.util = SimpleNamespace(generate_id=lambda: f"run{len(self.inits)}")

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return SimpleNamespace(log=lambda row, step: self.rows.append((step, row)),
                               finish=self._finish)

    def _finish(self) -> None:
        self.finished += 1


def test_wandb_gets_the_same_records_and_a_resume_continues_its_run(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with MetricsLogger(tmp_path, 100, rank=0, stream=io.StringIO(), wandb=True,
                       wandb_config={"steps": 100}) as logger:
        logger.log(1, **step_fields(1))
        logger.log_event("checkpoint_saved", step=1)
    with MetricsLogger(tmp_path, 100, rank=0, stream=io.StringIO(), wandb=True) as logger:
        logger.log(2, **step_fields(2))
    assert [i["id"] for i in fake.inits] == ["run0", "run0"]
    assert fake.inits[0]["resume"] == "allow" and fake.inits[0]["config"] == {"steps": 100}
    assert fake.inits[0]["mode"] == "offline"  # conftest sets WANDB_MODE=offline
    assert fake.finished == 2
    records = [r for r in read(tmp_path / "metrics.jsonl") if "event" not in r]
    assert [step for step, _ in fake.rows] == [1, 2]
    for (_, row), record in zip(fake.rows, records, strict=True):
        assert row == {k: v for k, v in record.items() if k != "step" and v is not None}
