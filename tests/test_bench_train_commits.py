"""bench/train_commits.sh: `pack` archives each named commit where the GPU machine's copy of
the tree (which has no .git) can find it; bad usage is one line and a nonzero exit."""

from __future__ import annotations

import subprocess
import tarfile

from conftest import ROOT

SCRIPT = ROOT / "bench" / "train_commits.sh"


def git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def test_pack_archives_each_commit(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git("init", "-q", cwd=repo)
    (repo / "a.txt").write_text("one\n")
    git("add", "a.txt", cwd=repo)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one", cwd=repo)
    first = git("rev-parse", "--short", "HEAD", cwd=repo)
    (repo / "b.txt").write_text("two\n")
    git("add", "b.txt", cwd=repo)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "two", cwd=repo)
    second = git("rev-parse", "--short", "HEAD", cwd=repo)

    proc = subprocess.run(["bash", str(SCRIPT), "pack", first, "HEAD"], cwd=repo,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    with tarfile.open(repo / ".bench-trees" / f"{first}.tar") as tar:
        assert tar.getnames() == ["a.txt"]
    with tarfile.open(repo / ".bench-trees" / f"{second}.tar") as tar:
        assert sorted(tar.getnames()) == ["a.txt", "b.txt"]


def test_unknown_commit_and_bad_usage_fail(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "pack", "no-such-commit"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    proc = subprocess.run(["bash", str(SCRIPT), "frobnicate"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage: bash bench/train_commits.sh" in proc.stderr
    proc = subprocess.run(["bash", str(SCRIPT), "run", str(tmp_path / "out"), "tiny",
                           "abc1234"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "no .bench-trees/abc1234.tar; pack it here and carry .bench-trees" in proc.stderr
    assert not (tmp_path / "out").exists()  # checked before anything is prepared or written
