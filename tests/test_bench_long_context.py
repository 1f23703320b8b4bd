"""bench/long_context.py --quick, as CI runs it: the tiny model on CPU, the longest step
found by doubling, tokens/s at each length with its ratio to the anchor model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_reports_the_longest_step_and_speeds(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "long_context.py"), "--quick",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "long_context.json").read_text())
    assert [row["model"] for row in report["rows"]] == ["tiny", "tiny"]
    for row in report["rows"]:
        assert row["max_len"] == 256
        assert list(row["fits"]) == ["64", "128", "256"]
        for length in ("64", "128"):
            speed = row["speed"][length]
            assert speed["status"] == "ok" and speed["tokens_per_s"] > 0
    assert "| tiny |" in (tmp_path / "long_context.md").read_text()


def test_unknown_model_is_one_clear_error(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "long_context.py"),
                           "--models", "gpt-9", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no configs/arch/gpt-9.yaml" in done.stderr
