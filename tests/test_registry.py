"""Mixer kinds registered from user code work everywhere a built-in kind does."""

from __future__ import annotations

import textwrap

import pytest
import torch

from stripes.arch import ArchFile, StripedLM, get_mixer, known_kinds
from stripes.core.config import ConfigError, load_config

from conftest import TINY
from numerics import rel_error

PLUGIN = '''
from dataclasses import dataclass
import torch
from torch import nn
from stripes.arch import Mixer, MixerConfig, register_mixer
from stripes.core.config import ConfigError


@dataclass
class RunningMeanConfig(MixerConfig):
    scale: float = 1.0

    def validate(self, d_model, key):
        if self.scale <= 0:
            raise ConfigError(f"{key}.scale", self.scale, "a positive number")


@register_mixer("running_mean", RunningMeanConfig)
class RunningMean(Mixer):
    """y[t] = proj(mean(x[0..t])) * scale: causal, with a constant-size state."""

    def __init__(self, d_model, cfg):
        super().__init__(d_model, cfg)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x, doc_ids=None):
        count = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[:, None]
        return self.out_proj(x.cumsum(1) / count) * self.cfg.scale

    def allocate_state(self, batch_size, max_len, device, dtype):
        return {"sum": torch.zeros(batch_size, self.d_model, device=device, dtype=dtype), "n": 0}

    def prefill(self, x, state):
        sums = state["sum"][:, None] + x.cumsum(1)
        count = state["n"] + torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)
        state["sum"], state["n"] = sums[:, -1].clone(), state["n"] + x.shape[1]
        return self.out_proj(sums / count[:, None]) * self.cfg.scale

    def step(self, x, state):
        state["sum"] += x[:, 0]
        state["n"] += 1
        return self.out_proj(state["sum"] / state["n"])[:, None] * self.cfg.scale

    def flops_per_token(self, seq_len):
        return 2.0 * self.d_model ** 2

    def state_bytes(self, batch_size, max_len, dtype):
        return batch_size * self.d_model * dtype.itemsize
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "my_mixers.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_mixers"


def test_plugin_kind_builds_trains_and_decodes(plugin):
    cfg = load_config(ArchFile, TINY, [
        f"model.plugins=[{plugin}]", "model.stripes=[running_mean,attn]", "model.n_layers=4",
        "model.mixers.running_mean={scale: 0.5}",
    ]).model
    model = StripedLM(cfg).double()
    model.init_weights()
    assert "running_mean" in known_kinds()
    assert [b.kind for b in model.blocks] == ["running_mean", "attn", "running_mean", "attn"]
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    state = model.allocate_state(1, 12)
    out = [model.prefill(ids[:, :4], state)] + [model.step(ids[:, t:t + 1], state)
                                               for t in range(4, 12)]
    assert rel_error(torch.cat(out, 1), model(ids)) < 1e-12


def test_plugin_settings_are_typed_and_validated(plugin):
    overrides = [f"model.plugins=[{plugin}]", "model.stripes=[running_mean]"]
    with pytest.raises(ConfigError, match=r"^model\.mixers\.running_mean\.scale=-1\.0"):
        load_config(ArchFile, TINY, [*overrides, "model.mixers.running_mean={scale: -1.0}"]
                    ).model.expand()
    with pytest.raises(ConfigError, match=r"^model\.mixers\.running_mean\.scale"):
        load_config(ArchFile, TINY, [*overrides, "model.mixers.running_mean={scale: big}"]
                    ).model.expand()


def test_unknown_kind_lists_known_ones():
    with pytest.raises(ConfigError, match=r"allowed: .*attn"):
        get_mixer("nope")
