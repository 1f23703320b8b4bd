"""The config mechanism and the stripe grammar: expansion, overrides, and one-line errors."""

from __future__ import annotations

import textwrap

import pytest

from stripes.arch import ArchFile, StripedLM
from stripes.core.config import ConfigError, load_config

from conftest import TINY


def load(*overrides: str, path=TINY):
    return load_config(ArchFile, path, overrides).model


def test_tiny_expands_with_cycle_override_and_variant():
    specs = load().expand()
    assert [s.name for s in specs] == ["hyena_se", "mamba", "hyena_mr", "attn", "retention",
                                       "hyena_li", "attn_local"]
    assert specs[-1].kind == "attn" and specs[3].kind == "attn"
    local = specs[-1]
    assert local.mixer.window == 8 and local.mixer.n_kv_heads == 1
    assert local.mlp.kind == "none"  # per-kind `mlp: none` shorthand
    assert specs[0].mlp.kind == "swiglu" and specs[0].mlp.hidden_size(64) == 128


def test_stripes_cycle_and_negative_override():
    specs = load("model.n_layers=5", "model.stripes=[attn_local,attn]",
                 "model.overrides={-1: attn_local}").expand()
    assert [s.name for s in specs] == ["attn_local", "attn", "attn_local", "attn", "attn_local"]


def test_command_line_override_and_interpolation(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(textwrap.dedent("""
        model:
          d_model: 32
          n_layers: 2
          vocab_size: 100
          stripes: [attn]
          mixers: {attn: {n_heads: 2}}
          mlp: {hidden: "${model.d_model}"}
    """))
    cfg = load("model.d_model=48", path=path)
    assert cfg.d_model == 48 and cfg.mlp.hidden == 48  # interpolation sees the override
    assert StripedLM(cfg).blocks[0].mlp.up_proj.out_features == 48


@pytest.mark.parametrize(
    "overrides, key, hint",
    [
        (["model.stripes=[attn,mamba9]"], "model.stripes[1]", "attn"),
        (["model.n_layer=3"], "model.n_layer", "did you mean 'n_layers'"),
        (["model.d_model=wide"], "model.d_model", "int"),
        (["model.mixers.attn.n_head=4"], "model.mixers.attn.n_head", "n_heads"),
        (["model.mixers.attn.n_heads=many"], "model.mixers.attn.n_heads", "int"),
        (["model.mixers.attn.n_heads=3"], "model.mixers.attn.n_heads", "divisor of d_model=64"),
        (["model.mixers.attn.n_kv_heads=3"], "model.mixers.attn.n_kv_heads", "divisor of n_heads"),
        (["model.overrides={9: attn}"], "model.overrides.9", "-7..6"),
        (["model.overrides={1: conv}"], "model.overrides.1", "unknown mixer kind"),
        (["model.stripes=[]"], "model.stripes", "non-empty"),
        (["model.mixers.bogus={n_heads: 2}"], "model.mixers.bogus", "attn"),
        (["model.mixers.attn_local.kind=bogus"], "model.mixers.attn_local.kind", "attn"),
        (["model.mlp.kind=relu"], "model.mlp.kind", "swiglu"),
        (["model.mixers.attn.mlp=relu"], "model.mixers.attn.mlp.kind", "swiglu"),
        (["model.mixers.attn.backend=fast"], "model.mixers.attn.backend", "cudnn"),
        (["model.mixers.attn.window=0"], "model.mixers.attn.window", "positive"),
        (["model.d_model=-8"], "model.d_model", "positive"),
        (["model.vocab_size=${model.nothing}"], "model.vocab_size", "interpolation"),
        (["model.plugins=[no_such_module_xyz]"], "model.plugins[0]", "importable"),
        (["model.n_layers"], "command line", "key=value"),
        (["model.stripes.0=attn"], "config", "whole list"),
        (["model.overrides={-1: attn, 6: mamba}"], "model.overrides.6", "also overridden"),
        (["model.norm_eps=nan"], "model.norm_eps", "finite"),
        (["model.init_std=inf"], "model.init_std", "finite"),
        (["model.mlp.hidden_mult=1e308"], "model.mlp.hidden_mult", "at most"),
        (["model.mixers.mamba.mlp=5"], "model.mixers.mamba.mlp", "mapping"),
        (["model.mixers.mamba.dt_min=nan"], "model.mixers.mamba.dt_min", "finite"),
        (["model.mixers.retention.value_factor=nan"], "model.mixers.retention.value_factor",
         "finite"),
        (["model.mixers.attn.rope.theta=inf"], "model.mixers.attn.rope.theta", "finite"),
        (["model.plugins=['']"], "model.plugins[0]", "importable"),
        # settings of a name no layer uses are still checked
        (["model.stripes=[attn]", "model.overrides={}", "model.mixers.retention.n_heads=5"],
         "model.mixers.retention.n_heads", "divisor"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(overrides, key, hint):
    with pytest.raises(ConfigError) as info:
        load(*overrides).expand()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(key), message
    assert hint in message, message


def test_dotted_override_of_an_integer_keyed_map():
    specs = load("model.overrides.2=retention").expand()
    assert specs[2].name == "retention" and specs[-1].name == "attn_local"


def test_missing_required_key(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("model: {n_layers: 2, vocab_size: 10, stripes: [attn]}\n")
    with pytest.raises(ConfigError, match=r"^model\.d_model: is required"):
        load(path=path)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  d_model: 64\n  stripes: [attn\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml:\d+: cannot parse"):
        load(path=path)


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load(path="configs/arch/nope.yaml")
