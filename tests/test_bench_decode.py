"""bench/decode_step.py --quick, as CI runs it: one step of each mixer of the tiny
architecture from a filled state, timed, with the state's size, in a report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
