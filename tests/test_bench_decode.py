"""bench/decode_step.py and bench/decode_model.py --quick, as CI runs them: one step of
each mixer (and of the whole tiny model) from a filled state, timed, with the state's size,
in a report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_reports_every_mixer_at_every_context(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "decode_step.py"), "--quick",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "decode_step.json").read_text())
    rows = report["rows"]
    names = {"hyena_se", "mamba", "hyena_mr", "attn", "retention", "hyena_li", "attn_local"}
    assert {(r["mixer"], r["ctx"]) for r in rows} == {(n, c) for n in names for c in (16, 32)}
    for row in rows:
        assert row["status"] == "ok", row
        assert row["eager_ms"] > 0 and row["state_gib"] > 0
    attn = {r["ctx"]: r["state_gib"] for r in rows if r["mixer"] == "attn"}
    assert attn[32] > attn[16]  # the KV cache grows with the context; the others do not
    mamba = {r["ctx"]: r["state_gib"] for r in rows if r["mixer"] == "mamba"}
    assert mamba[32] == mamba[16]
    assert "| mixer | context |" in (tmp_path / "decode_step.md").read_text()


def test_quick_model_run_reports_tokens_per_second_and_state(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "decode_model.py"), "--quick",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "decode_model.json").read_text())["rows"]
    assert {(r["batch"], r["ctx"]) for r in rows} == {(b, c) for b in (1, 2) for c in (16, 32)}
    for row in rows:
        assert row["status"] == "ok", row
        assert row["tokens_per_s"] == pytest.approx(row["batch"] / row["eager_ms"] * 1e3)
    state = {(r["batch"], r["ctx"]): r["state_gib"] for r in rows}
    assert state[2, 16] == 2 * state[1, 16] and state[1, 32] > state[1, 16]  # KV caches grow
    assert "| tiny | 2 | 32 |" in (tmp_path / "decode_model.md").read_text()
