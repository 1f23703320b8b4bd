"""bench/projections.py --tiny, as CI runs it: every case and implementation runs on CPU and
agrees with separate Linears."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_tiny_run_writes_every_row(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "projections.py"), "--tiny",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "projections.json").read_text())
    assert [r["impl"] for r in rows] == ["separate", "split", "fused"] * 4
    assert all(r["rel_err"] < 3e-2 and r["ms"] > 0 for r in rows)
    assert "| swiglu gate,up | fused |" in proc.stdout
