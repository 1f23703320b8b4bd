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


def save_trained_checkpoint(run_dir: Path, cfg=None, data_dir: Path | None = None,
                            **settings):
    """A checkpoint of `cfg` (default tiny.yaml, norm weights random) after one AdamW step,
    with a config.yaml whose data source is `data_dir` (a prepared directory: its tokenizer)
    when given, and further training `settings` (e.g. document_masking=True).
    Returns (model, checkpoint path, a batch of ids)."""
    import dataclasses

    import yaml

    from stripes.arch import ArchFile, StripedLM
    from stripes.core.config import load_config
    from stripes.train.checkpoint import DcpStates, save_checkpoint

    cfg = cfg or load_config(ArchFile, TINY).model
    torch.manual_seed(0)
    model = StripedLM(cfg)
    model.init_weights()
    with torch.no_grad():  # norms left at 1 would hide a mix-up of norm weights
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, cfg.vocab_size, (2, 17))
    model.loss(ids[:, :-1], ids[:, 1:]).backward()
    optimizer.step()
    config = {"model": dataclasses.asdict(cfg), "seed": 0, **settings}
    if data_dir is not None:
        config["data"] = {"sources": [{"path": str(data_dir)}], **config.get("data", {})}
    path = save_checkpoint(run_dir, 1, DcpStates(model, optimizer), {"tokens_seen": 32},
                           yaml.safe_dump(config), keep_last=1)
    return model, path, ids
