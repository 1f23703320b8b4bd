"""bench/train.py --tiny, as CI runs it: the trainer's own step (FSDP2 in a world of one, as
configs/train/bench-1b.yaml asks) timed, split into phases, profiled, beside the HF anchor."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import ROOT


def test_tiny_run_reports_throughput_breakdown_anchor_and_trace(tmp_path, demo_data):
    sources = f"data.sources=[{{path: {demo_data}, source: devil}}, {{path: {demo_data}}}]"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train.py"), "--tiny",
                           "--steps", "3", "--warmup", "1", "--hf", "--trace",
                           str(tmp_path / "trace"), "--json", str(tmp_path / "r.json"),
                           sources, "model.vocab_size=4096"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "r.json").read_text())
    stripes, split = result["stripes"], result["breakdown"]
    assert stripes["tokens_per_s"] == pytest.approx(128 / stripes["step_ms"] * 1e3)
    assert set(split["ms"]) == {"data", "forward", "backward", "optimizer"}
    assert all(ms > 0 for ms in split["ms"].values())
    assert sum(split["share"].values()) == pytest.approx(1.0)
    assert result["hf"]["params"] == result["params"] and result["hf"]["tokens_per_s"] > 0
    assert "stripes / hf = " in proc.stdout
    assert (tmp_path / "trace" / "trace.json").stat().st_size > 0
    assert "aten::" in (tmp_path / "trace" / "ops.txt").read_text()


def test_kernel_summary_sums_kernels_by_kind(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # for its own imports
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "bench" / "train.py")
    bench_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_train)
    kernel_summary = bench_train.kernel_summary
    text = kernel_summary([("nvjet_sm90_tst_256x128", 5.0), ("nvjet_sm90_tst_192", 3.0),
                           ("fmha_cutlassF_bf16_aligned_64x128", 2.0),
                           ("_rms_norm_bwd_kernel", 1.0)])
    lines = text.splitlines()
    assert lines[0] == "device time 11.0 ms in 4 kernels"
    assert lines[1].split() == ["8.00", "ms", "72.7%", "matmul"]
    assert "attention" in lines[2] and "_rms_norm_bwd_kernel" in lines[3]
