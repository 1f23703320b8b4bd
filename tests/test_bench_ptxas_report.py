"""bench/ptxas_report.py: launches recorded under the interpreter are compiled for sm_90
without a GPU; a kernel the interpreter runs but the compiler rejects is an error row and a
nonzero exit, and a stripes kernel reports its registers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "ptxas_report.py"

KERNELS = textwrap.dedent("""
    import torch
    import triton
    import triton.language as tl


    @triton.jit
    def doubled(x_ptr, n, B: tl.constexpr):
        i = tl.arange(0, B)
        tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) * 2, mask=i < n)


    @triton.jit
    def tiny_dot(a_ptr, c_ptr):  # fine in the interpreter; sm_90 needs K >= 16
        i = tl.arange(0, 4)
        a = tl.load(a_ptr + i[:, None] * 4 + i[None, :])
        tl.store(c_ptr + i[:, None] * 4 + i[None, :], tl.dot(a, a))


    def test_launches():
        x = torch.ones(8)
        doubled[(1,)](x, 8, B=8)
        tiny_dot[(1,)](torch.ones(16), torch.empty(16))
        assert x.sum() == 16
""")


def report(tmp_path: Path, *pytest_args: str) -> tuple[int, dict]:
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--",
                           *pytest_args, "-p", "no:cacheprovider"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.exists(), done.stdout + done.stderr
    return done.returncode, {r["kernel"].rsplit(".", 1)[-1]: r
                             for r in json.loads(out.read_text())}


def test_compile_errors_are_rows_and_fail_the_run(tmp_path):
    tests = tmp_path / "test_kernels_here.py"
    tests.write_text(KERNELS)
    code, rows = report(tmp_path, str(tests))
    assert code == 1
    assert rows["doubled"]["status"] == "ok" and rows["doubled"]["registers"] > 0
    assert rows["doubled"]["constexprs"] == {"B": 8}
    assert rows["tiny_dot"]["status"] == "error" and "K >= 16" in rows["tiny_dot"]["error"]
    assert rows["doubled"]["divisible"] == ["x_ptr"]  # aligned; n = 8 is not a multiple of 16


def test_no_launch_is_an_error(tmp_path):
    tests = tmp_path / "test_nothing.py"
    tests.write_text("def test_nothing():\n    pass\n")
    done = subprocess.run([sys.executable, str(SCRIPT), "--", str(tests)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "launched no Triton kernel" in done.stderr


def test_a_stripes_kernel(tmp_path):
    code, rows = report(tmp_path, "tests/test_kernel_causal_conv.py", "-k",
                        "reads_chunked_views")
    assert code == 0
    row = rows["_conv_fwd_kernel"]
    assert row["registers"] > 0 and row["spill_bytes"] == 0 and row["barriers"] is not None
