"""DeepSpeed on a CUDA device. Its engine replaces an outer CUDA autocast with its own
`torch_autocast` (off unless configured), so the loop's bf16 autocast must reach the forward
through the generated config. (On CPU DeepSpeed leaves an outer CPU autocast alone, which is
why this can only be checked here.)"""

from __future__ import annotations

import pytest
import torch

from stripes.arch import StripedLM
from stripes.train.config import load_train_config
from stripes.train.deepspeed_engine import DeepSpeedEngine
from stripes.train.distributed import World, close_world

from conftest import ROOT

pytestmark = pytest.mark.gpu


def test_bf16_autocast_reaches_the_forward_and_parameters_stay_float32():
    cfg = load_train_config(ROOT / "configs/train/tiny.yaml", ["precision=bf16"])
    torch.manual_seed(0)
    with torch.device("meta"):
        model = StripedLM(cfg.model)
    model.to_empty(device="cuda")
    model.init_weights()
    try:
        engine = DeepSpeedEngine(model, cfg, World(0, 1, 0, torch.device("cuda", 0)), accum=2,
                                 bf16=True)
        ids = torch.randint(0, cfg.model.vocab_size, (2, 16), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = engine.module(ids)
        assert logits.dtype == torch.bfloat16
        assert all(p.dtype == torch.float32 for p in engine.module.parameters())
    finally:
        close_world(finished=False)  # one process: nothing to meet
