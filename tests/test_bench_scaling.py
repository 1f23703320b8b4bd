"""bench/scaling.py --quick, as CI runs it: the tiny model on 1 and 2 gloo processes through
`stripes launch torchrun`, with tokens/s per process and the efficiency against one."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.multiprocess
def test_quick_weak_scaling_table(tmp_path, demo_data):
    sources = f"data.sources=[{{path: {demo_data}, source: devil}}, {{path: {demo_data}}}]"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "scaling.py"), "--quick",
                           "--backends", "fsdp", "--out", str(tmp_path), "--set", sources],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "scaling.json").read_text())["rows"]
    assert [(r["backend"], r["gpus"], r["status"]) for r in rows] == [("fsdp", 1, "ok"),
                                                                       ("fsdp", 2, "ok")]
    one, two = rows
    assert one["efficiency"] == 1.0
    assert two["tokens_per_s_per_gpu"] == pytest.approx(two["tokens_per_s"] / 2)
    assert two["efficiency"] == pytest.approx(two["tokens_per_s_per_gpu"]
                                              / one["tokens_per_s_per_gpu"])
    assert "--nproc-per-node 2" in two["command"] and "global_batch_tokens=256" in two["command"]
    for row in rows:  # each run's steps are kept, its checkpoints are not
        assert (tmp_path / f"{row['name']}.metrics.jsonl").is_file()
        assert not (tmp_path / "runs" / row["name"]).exists()
    assert "| tiny | fsdp | 2 |" in (tmp_path / "scaling.md").read_text()
