"""bench/kernels.py --quick, run as CI runs it: every kernel's rows go through the public
functions (on CPU their reference path) and the anchors, and kernels.json carries the run's
metadata and a row per kernel. A kernel package that cannot be imported fails its case, and
the script's exit status, so this test catches it too."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "kernels.py"
KERNELS = ("rmsnorm", "swiglu", "rotary", "linear_ce", "retention", "ssd", "gated_norm",
           "causal_conv", "fft_conv", "toeplitz_conv", "modal_filter", "modal_conv")


def run_bench(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("bench-kernels")
    proc = run_bench(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc, json.loads((out / "kernels.json").read_text())


def test_report_metadata(quick):
    proc, report = quick
    for key in ("device", "torch", "triton", "commit", "date", "copy_gbs", "rows"):
        assert report[key] is not None, key
    assert report["quick"] is True
    assert report["copy_gbs"] > 0
    assert "| kernel | case | impl |" in proc.stdout


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_row_per_kernel(quick, kernel):
    rows = [r for r in quick[1]["rows"] if r["kernel"] == kernel]
    roles = {r["role"]: r for r in rows}
    assert {"stripes", "torch", "anchor"} <= set(roles), [r["impl"] for r in rows]
    for row in rows:
        if row["role"] in ("stripes", "torch"):
            assert row["status"] == "ok", row
            assert math.isfinite(row["fb"]["ms"]) and row["fb"]["ms"] > 0
            assert row["max_rel_err"] < 3e-2, row
        if row["role"] == "anchor":  # runs on CUDA only; on CPU it says why not
            assert row["status"] == "ok" or row["note"], row
    stripes = [r for r in rows if r["role"] == "stripes"]
    assert all(("fb_gbs" in r) != ("fb_tflops" in r) for r in stripes)


def test_only_runs_the_named_kernels(tmp_path):
    proc = run_bench(tmp_path, "--only", "rotary")  # the one without torch.compile: quick
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "kernels.json").read_text())["rows"]
    assert {r["kernel"] for r in rows} == {"copy", "rotary"}


def test_only_rejects_unknown_names(tmp_path):
    proc = run_bench(tmp_path, "--only", "swiglu,layernorm")
    assert proc.returncode == 2
    assert "--only takes names from" in proc.stderr
