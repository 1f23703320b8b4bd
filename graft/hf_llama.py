"""A Hugging Face Llama-style model directory as a stripes model: config and weights.

    source = HFLlama("path/to/llama")          # config.json + *.safetensors, read directly
    cfg = source.model_config()                # stripes ModelConfig: attn + SwiGLU stripes
    model = source.load()                      # StripedLM with the checkpoint's weights

The architectures agree term by term: pre-norm blocks x + attn(norm(x)), x + mlp(norm(x)),
RMSNorm with the same eps, rotary embedding in the rotate-half layout with the same base and
linear scaling (stripes' own layout, so q and k need no permutation), grouped-query
attention, SwiGLU down(silu(gate x) * up x), a final norm and an untied or tied head;
Mistral's sliding window is attention's `window`. What stripes does not express is refused,
all problems in one line: biases, another activation, RoPE scaling other than none/linear
(transformers' YaRN ramps differently from stripes'), head dims that are not hidden / heads.

Names: model.embed_tokens -> embed, model.layers.i.input_layernorm -> blocks.i.mixer_norm,
self_attn.{q,k,v}_proj -> mixer.{q,k,v}_proj, self_attn.o_proj -> mixer.out_proj,
post_attention_layernorm -> mlp_norm, mlp.{gate,up,down}_proj -> mlp.{gate,up,down}_proj,
model.norm -> norm, lm_head -> lm_head.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from stripes.arch import StripedLM
from stripes.arch.config import ModelConfig
from stripes.core.config import ConfigError, to_typed

MODEL_TYPES = ("llama", "mistral")
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_STRIPES_LAYER = re.compile(r"blocks\.(\d+)\.(.+)")
_IN_LAYER = {"input_layernorm.weight": "mixer_norm.weight",
             "self_attn.q_proj.weight": "mixer.q_proj.weight",
             "self_attn.k_proj.weight": "mixer.k_proj.weight",
             "self_attn.v_proj.weight": "mixer.v_proj.weight",
             "self_attn.o_proj.weight": "mixer.out_proj.weight",
             "post_attention_layernorm.weight": "mlp_norm.weight",
             "mlp.gate_proj.weight": "mlp.gate_proj.weight",
             "mlp.up_proj.weight": "mlp.up_proj.weight",
             "mlp.down_proj.weight": "mlp.down_proj.weight"}
_TOP = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
        "lm_head.weight": "lm_head.weight"}


class HFLlama:
    """One Hugging Face Llama/Mistral-style directory (config.json and model.safetensors, or
    sharded with model.safetensors.index.json)."""

    def __init__(self, directory: str | Path, key: str = "source") -> None:
        self.directory, self.key = Path(directory), key
        config_file = self.directory / "config.json"
        if not config_file.is_file():
            raise ConfigError(key, str(directory), "a Hugging Face model directory with a "
                              "config.json", "no config.json there")
        self.config: dict[str, Any] = json.loads(config_file.read_text())
        self._check()

    def _check(self) -> None:
        c, problems = self.config, []
        if c.get("model_type") not in MODEL_TYPES:
            raise ConfigError(self.key, str(self.directory), "a Llama-style model stripes "
                              "can express", f"model_type {c.get('model_type')!r} (not "
                              f"{'/'.join(MODEL_TYPES)})")
        if c.get("hidden_act", "silu") != "silu":
            problems.append(f"hidden_act {c['hidden_act']!r} (SwiGLU needs silu)")
        for flag in ("attention_bias", "mlp_bias"):
            if c.get(flag):
                problems.append(f"{flag} true (stripes' projections have no bias)")
        heads = c["num_attention_heads"]
        if c.get("head_dim") not in (None, c["hidden_size"] // heads):
            problems.append(f"head_dim {c['head_dim']} != hidden_size / heads")
        scaling = self._rope_scaling()
        # YaRN is left out: transformers ramps over the pair index with rounding and an
        # attention factor, stripes over the turns, so the two would not agree.
        if scaling.get("rope_type", scaling.get("type", "default")) not in ("default",
                                                                             "linear"):
            problems.append(f"rope_scaling {scaling} (a graft takes none or linear)")
        if problems:
            raise ConfigError(self.key, str(self.directory), "a Llama-style model stripes "
                              "can express", "; ".join(problems))

    def _rope_scaling(self) -> dict[str, Any]:
        # transformers v4 writes rope_theta + rope_scaling, v5 rope_parameters.
        params = self.config.get("rope_parameters") or {}
        return dict(self.config.get("rope_scaling") or params)

    def rope(self) -> dict[str, Any]:
        scaling, c = self._rope_scaling(), self.config
        theta = c.get("rope_theta", scaling.get("rope_theta", 10000.0))
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        rope: dict[str, Any] = {"theta": float(theta)}
        if kind == "linear":
            rope.update(scaling="linear", factor=float(scaling["factor"]))
        return rope

    def model_config(self) -> ModelConfig:
        """The stripes config of the same network: every layer attention with SwiGLU."""
        c = self.config
        attn = {"n_heads": c["num_attention_heads"],
                "n_kv_heads": c.get("num_key_value_heads") or c["num_attention_heads"],
                "rope": self.rope()}
        if c.get("model_type") == "mistral" and c.get("sliding_window"):
            attn["window"] = int(c["sliding_window"])  # both count the current token in it
        raw = {"d_model": c["hidden_size"], "n_layers": c["num_hidden_layers"],
               "vocab_size": c["vocab_size"], "stripes": ["attn"], "mixers": {"attn": attn},
               "mlp": {"kind": "swiglu", "hidden": c["intermediate_size"]},
               "norm_eps": float(c.get("rms_norm_eps", 1e-6)),
               "max_seq_len": int(c.get("max_position_embeddings", 2048)),
               "tie_embeddings": bool(c.get("tie_word_embeddings", False))}
        cfg = to_typed(ModelConfig, raw, prefix="model")
        cfg.expand("model")
        return cfg

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the checkpoint under its stripes name (float as stored)."""
        return self._read(lambda f, name: f.get_tensor(name))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape under its stripes name, from the files' headers only."""
        return self._read(lambda f, name: tuple(f.get_slice(name).get_shape()))

    def _read(self, value) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for file in self._files():
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    ours = stripes_name(name, self.key)
                    if ours:
                        out[ours] = value(f, name)
        if self.config.get("tie_word_embeddings"):
            out.pop("lm_head.weight", None)  # saved by some versions beside the tie
        return out

    def _files(self) -> list[Path]:
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [self.directory / shard for shard in shards]
        single = self.directory / "model.safetensors"
        if not single.is_file():
            raise ConfigError(self.key, str(self.directory), "a directory with "
                              "model.safetensors or model.safetensors.index.json",
                              "no safetensors weights there")
        return [single]

    def load(self, dtype: torch.dtype = torch.float32) -> StripedLM:
        """A StripedLM of model_config() holding exactly the checkpoint's weights."""
        model = StripedLM(self.model_config()).to(dtype)
        weights = self.tensors()
        expected = model.state_dict()
        problems = sorted(set(expected) ^ set(weights))
        problems += [f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(expected[k].shape)} "
                     f"in the model" for k, v in weights.items()
                     if k in expected and v.shape != expected[k].shape]
        if problems:
            raise ConfigError(self.key, str(self.directory), "weights matching its "
                              "config.json", "; ".join(problems[:8]))
        model.load_state_dict({k: v.to(dtype) for k, v in weights.items()})
        return model


def llama_name(name: str) -> str:
    """The Hugging Face Llama tensor name of a stripes parameter name (stripes_name's inverse;
    "" for a parameter Llama has no place for)."""
    for theirs, ours in _TOP.items():
        if name == ours:
            return theirs
    match = _STRIPES_LAYER.fullmatch(name)
    for theirs, ours in _IN_LAYER.items():
        if match and match.group(2) == ours:
            return f"model.layers.{match.group(1)}.{theirs}"
    return ""


def stripes_name(hf_name: str, key: str = "source") -> str:
    """The stripes parameter name of a Hugging Face Llama tensor name ("" for the rotary
    frequencies some older conversions saved: stripes computes them)."""
    if hf_name.endswith("rotary_emb.inv_freq"):
        return ""
    if hf_name in _TOP:
        return _TOP[hf_name]
    match = _LAYER.fullmatch(hf_name)
    if match and match.group(2) in _IN_LAYER:
        return f"blocks.{match.group(1)}.{_IN_LAYER[match.group(2)]}"
    raise ConfigError(key, hf_name, "tensors of a Llama-style model",
                      "a tensor stripes has no place for")
