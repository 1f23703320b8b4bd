"""Mixer settings the benchmarks share: the 1B configs' width and each kind's settings."""

from __future__ import annotations

import torch

from stripes.arch import ModelConfig, get_mixer

D = 2048
SETTINGS = {
    "attn": {"n_heads": 16, "n_kv_heads": 4},
    "hyena_se": {"short_len": 3, "filter_len": 7, "filter_groups": 128},
    "hyena_mr": {"short_len": 3, "filter_len": 128, "filter_groups": 128},
    "hyena_li": {"short_len": 3, "state_size": 16},
    "mamba": {"d_state": 128, "expand": 2, "head_dim": 64, "chunk_size": 64},
    "retention": {"n_heads": 8, "chunk_size": 64, "value_factor": 1},
}


def mixers(device: str) -> dict[str, torch.nn.Module]:
    """One initialised mixer of each kind, float32, on `device`."""
    cfg = ModelConfig(d_model=D, n_layers=len(SETTINGS), vocab_size=32000,
                      stripes=list(SETTINGS), mixers=SETTINGS)
    built = {}
    for spec in cfg.expand():
        module = get_mixer(spec.kind).module(D, spec.mixer).to(device)
        module.init_weights(0.02, 0.02 / 4)
        built[spec.name] = module
    return built
