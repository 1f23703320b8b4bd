"""bench/scalar_decay_sweep.py --quick, as CI runs it: on CPU through the Triton interpreter,
every kernel of a training step is launched alone under each setting tried, and the whole
forward+backward runs with the defaults and with the per-kernel winners."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_sweep_times_every_kernel_and_the_tuned_step(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "scalar_decay_sweep.py"),
                           "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "scalar_decay_sweep.json").read_text())
    (result,) = report["results"]
    assert set(result["kernels"]) == {"scan", "output", "reverse scan", "dq_dk", "dv"}
    for kernel, timing in result["kernels"].items():
        times = [row["ms"] for row in timing["all"]]
        # two (warps, stages) settings, times two tile widths (scans) or head splits (dq/dk)
        assert len(times) == (4 if "scan" in kernel or kernel == "dq_dk" else 2), kernel
        assert timing["best_ms"] == min(times) and timing["best_ms"] <= timing["default_ms"]
    assert result["fb_default_ms"] > 0 and result["fb_tuned_ms"] > 0
    assert set(result["tuned"]) == {"scan", "output", "dq_dk", "dv", "scan_block",
                                    "head_split"}
    assert "| dq_dk |" in (tmp_path / "scalar_decay_sweep.md").read_text()


def test_unknown_shape_is_one_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "scalar_decay_sweep.py"),
                           "--shapes", "retention-4k", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--shapes takes names from" in proc.stderr
