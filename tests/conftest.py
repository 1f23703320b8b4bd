"""Shared fixtures. Nothing here may reach for a network: hub and wandb are forced offline."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

_TMP = tempfile.mkdtemp(prefix="stripes-tests-")
for var, value in {
    "HF_HOME": f"{_TMP}/hf",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_DIR": f"{_TMP}/wandb",
    "WANDB_CACHE_DIR": f"{_TMP}/wandb-cache",
    "WANDB_CONFIG_DIR": f"{_TMP}/wandb-config",
}.items():
    os.environ[var] = value

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. The flag is read
# when a kernel module is imported, so it is set before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "arch" / "tiny.yaml"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_cfg():
    from stripes.arch import ArchFile
    from stripes.core.config import load_config

    return load_config(ArchFile, TINY).model


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The bundled corpus, prepared once per test session (`stripes prepare`)."""
    out = tmp_path_factory.mktemp("data") / "demo"
    done = subprocess.run([sys.executable, "-m", "stripes.launch.cli", "prepare",
                           "configs/data/demo.yaml", f"data.output={out}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return out
