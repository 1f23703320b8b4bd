"""A Hugging Face Llama directory read by stripes (graft/hf_llama.py): a small Llama with
random weights, built and saved locally by `transformers`, becomes a StripedLM whose logits
equal the Hugging Face model's; GQA, tied embeddings, sharded checkpoints and RoPE bases
included. What stripes cannot express is refused in one line before any tensor is read."""

from __future__ import annotations

import json

import pytest
import torch

from stripes.core.config import ConfigError
from stripes.graft.hf_llama import HFLlama, stripes_name

from numerics import rel_error

transformers = pytest.importorskip("transformers")


def save_llama(path, shard_size: str | None = None, **overrides):
    settings = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    rms_norm_eps=1e-5, rope_theta=500.0, tie_word_embeddings=False)
    config = transformers.LlamaConfig(**{**settings, **overrides})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms at 1 would hide a norm mix-up
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return model


@pytest.mark.parametrize("overrides, shard_size", [
    ({}, None),
    ({"tie_word_embeddings": True, "num_key_value_heads": 4}, None),
    ({}, "40KB"),  # several safetensors files and an index
])
def test_logits_equal_the_hugging_face_model(tmp_path, overrides, shard_size):
    hf = save_llama(tmp_path, shard_size, **overrides)
    if shard_size:
        assert (tmp_path / "model.safetensors.index.json").exists()
    source = HFLlama(tmp_path)
    cfg = source.model_config()
    assert (cfg.d_model, cfg.n_layers, cfg.vocab_size) == (64, 3, 97)
    assert cfg.mixers["attn"]["rope"]["theta"] == 500.0
    model = source.load().eval()
    ids = torch.randint(0, 97, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
        got = model(ids)
    assert rel_error(got, want) < 1e-5


def test_names_map_and_unknown_tensors_are_refused():
    assert stripes_name("model.layers.11.self_attn.o_proj.weight") == \
        "blocks.11.mixer.out_proj.weight"
    assert stripes_name("model.embed_tokens.weight") == "embed.weight"
    assert stripes_name("model.layers.0.self_attn.rotary_emb.inv_freq") == ""  # computed
    with pytest.raises(ConfigError, match="q_norm"):
        stripes_name("model.layers.0.self_attn.q_norm.weight")


def test_what_stripes_cannot_express_is_one_line(tmp_path):
    save_llama(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(hidden_act="gelu", attention_bias=True,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0})
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as err:
        HFLlama(tmp_path)
    message = str(err.value)
    assert "\n" not in message and "hidden_act 'gelu'" in message
    assert "attention_bias" in message and "rope_scaling" in message
    with pytest.raises(ConfigError, match="no config.json"):
        HFLlama(tmp_path / "missing")


def test_mistral_sliding_window_is_attention_window(tmp_path):
    config = transformers.MistralConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        sliding_window=8, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(config).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    source = HFLlama(tmp_path)
    assert source.model_config().mixers["attn"]["window"] == 8
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = hf(ids).logits, source.load().eval()(ids)
    assert rel_error(got, want) < 1e-5
