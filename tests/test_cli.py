"""The `stripes` command line: inspect tables, and one-line errors without tracebacks."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from stripes.launch.cli import main

from conftest import ROOT, TINY


def stripes(*args: str) -> subprocess.CompletedProcess:
    """Run the real entry point in a fresh interpreter, as a user would."""
    return subprocess.run([sys.executable, "-m", "stripes.launch.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def stripes_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """Same, in this process (no interpreter start-up): for the many cheap cases."""
    code = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def total_params(stdout: str) -> int:
    line = next(ln for ln in stdout.splitlines() if ln.startswith("total"))
    return int(re.search(r"([\d,]{5,})", line).group(1).replace(",", ""))


def test_help_lists_subcommands():
    out = stripes("--help")
    assert out.returncode == 0
    assert "inspect" in out.stdout and "train" in out.stdout


def test_inspect_tiny_prints_every_layer():
    out = stripes("inspect", str(TINY))  # one end-to-end run through the entry point
    assert out.returncode == 0, out.stderr
    kinds = re.findall(r"^\s+\d+\s+(\S+)", out.stdout, re.M)
    assert kinds == ["hyena_se", "mamba", "hyena_mr", "attn", "retention", "hyena_li",
                     "attn_local"]
    assert "attn_local (attn)" in out.stdout and "total" in out.stdout


def test_inspect_transformer_1b_matches_analytic_count(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = stripes_here(capsys, "inspect", "configs/arch/transformer-1b.yaml")
    assert out.returncode == 0, out.stderr
    d, layers, vocab, ffn, kv = 2048, 16, 32000, 5632, 512
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * ffn + 2 * d  # q,o + k,v + SwiGLU + 2 norms
    analytic = layers * per_layer + 2 * vocab * d + d  # + embed, head, final norm
    assert total_params(out.stdout) == analytic  # the issue asks 1%; it is exact


def test_inspect_applies_overrides(capsys):
    out = stripes_here(capsys, "inspect", str(TINY), "model.n_layers=9")
    assert out.returncode == 0, out.stderr
    assert len(re.findall(r"^\s+\d+\s+\S+", out.stdout, re.M)) == 9


@pytest.mark.parametrize(
    "setup, args, expected",
    [
        ("model:\n  d_model: 64\n  stripes: [attn\n", [], "cannot parse"),
        ("model: {d_model: 64, n_layers: 2, vocab_size: 9, stripes: [hyena_xx]}\n", [],
         "model.stripes[0]='hyena_xx': unknown mixer kind"),
        (None, ["model.mixers.attn.n_heads=5"], "model.mixers.attn.n_heads=5"),
        (None, ["model.n_layerz=2"], "model.n_layerz"),
    ],
)
def test_bad_input_is_one_line_without_traceback(capsys, tmp_path, setup, args, expected):
    path = TINY
    if setup is not None:
        path = tmp_path / "bad.yaml"
        path.write_text(setup)
    out = stripes_here(capsys, "inspect", str(path), *args)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], out.stderr


def test_broken_yaml_exits_nonzero_from_the_entry_point(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  d_model: [64\n")
    out = stripes("inspect", str(path))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "broken.yaml:" in out.stderr
