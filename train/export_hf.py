"""`stripes export --format hf`: a stripes model that is a Llama network, as a Hugging Face
directory `transformers` loads without custom code (AutoModelForCausalLM, LlamaForCausalLM):

    OUT/config.json             LlamaConfig: widths, heads, RMSNorm eps, RoPE base/scaling, tie
    OUT/model.safetensors       the weights under Llama's names (graft/hf_llama.py's map, reversed)
    OUT/tokenizer.model         the training data's sentencepiece model, when it can be found,
    OUT/tokenizer_config.json   loaded by AutoTokenizer through transformers' sentencepiece backend
    OUT/generation_config.json  the tokenizer's bos/eos ids

It is the inverse of grafting from a Llama checkpoint (graft/hf_llama.py), which already
shows the two networks agree term by term. A model is a Llama network when every layer is
`attn` with the same settings, no sliding window and no q/k/v bias, followed by SwiGLU of one
width. RoPE: none and linear map to Llama's; NTK-aware is a fixed change of base, exported as
that base; YaRN is refused (transformers ramps it differently). Anything else is refused in
one line that lists every reason, before a file is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from stripes.arch.attention import AttnConfig
from stripes.arch.config import ModelConfig
from stripes.arch.model import StripedLM
from stripes.core.config import ConfigError
from stripes.data.format import write_atomic
from stripes.graft.hf_llama import llama_name
from stripes.train.export import WEIGHTS, copy_tokenizer, save_safetensors


def llama_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json of the Llama network `cfg` describes, or a ConfigError naming what is not
    (every reason)."""
    specs = cfg.expand()
    problems = [f"layer {s.index} is {s.name}" for s in specs if s.kind != "attn"]
    problems += [f"layer {s.index}'s MLP is {s.mlp.kind}" for s in specs
                 if s.mlp.kind != "swiglu"]
    if problems:
        raise ConfigError("model", "stripes: " + str(cfg.stripes), "attention and SwiGLU in "
                          "every layer for --format hf (export a hybrid in the stripes "
                          "format)", "; ".join(problems[:6]))
    attn: AttnConfig = specs[0].mixer
    if any(s.mixer != attn for s in specs):
        problems.append("the attention layers' settings differ")
    if len({s.mlp.hidden_size(cfg.d_model) for s in specs}) > 1:
        problems.append("the MLP widths differ")
    if attn.window is not None:
        problems.append(f"attention window {attn.window} (Llama attends to everything)")
    if attn.qkv_bias:
        problems.append("qkv_bias (Llama's attention_bias also adds one to o_proj)")
    theta, rope_scaling = _rope(attn, cfg.d_model // attn.n_heads, problems)
    if problems:
        raise ConfigError("model", "stripes: " + str(cfg.stripes), "a Llama network for "
                          "--format hf", "; ".join(problems))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": specs[0].mlp.hidden_size(cfg.d_model),
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": attn.n_heads,
        "num_key_value_heads": attn.kv_heads,
        "head_dim": cfg.d_model // attn.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _rope(attn: AttnConfig, head_dim: int, problems: list[str]
          ) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) of Llama's config for stripes' RoPE settings."""
    rope = attn.rope
    if rope.scaling == "linear":
        return rope.theta, {"rope_type": "linear", "factor": rope.factor}
    if rope.scaling == "ntk":  # arch/rope.py: theta' = theta s^(Dh/(Dh-2)), nothing else
        return rope.theta * rope.factor ** (head_dim / (head_dim - 2)), None
    if rope.scaling != "none":
        problems.append(f"RoPE scaling {rope.scaling} (exported: none, linear, ntk)")
    return rope.theta, None


def write_llama(model: StripedLM, config: dict[str, Any], out_dir: Path,
                tokenizer: Path | None, metadata: dict[str, str]) -> list[Path]:
    """Write the Hugging Face directory; returns the files written."""
    tensors = {}
    for name, tensor in model.state_dict().items():
        theirs = llama_name(name)
        if not theirs:  # llama_config admitted the model, so every tensor has a place
            raise RuntimeError(f"no Llama name for {name}")
        tensors[theirs] = tensor.detach().contiguous()
    written = [save_safetensors(tensors, out_dir / WEIGHTS, {"format": "pt", **metadata})]
    special = _special_tokens(tokenizer)
    ids = {f"{name}_token_id": token_id for name, (_, token_id) in special.items()}
    files = {"config.json": {**config, **ids}, "generation_config.json": ids}
    written += copy_tokenizer(tokenizer, out_dir)
    if tokenizer is not None:
        files["tokenizer_config.json"] = {  # transformers >= 5 reads it with AutoTokenizer
            "tokenizer_class": "SentencePieceBackend", "vocab_file": tokenizer.name,
            "add_bos_token": False, "add_eos_token": False,  # documents end in eos, no bos
            "model_max_length": config["max_position_embeddings"],
            **{f"{name}_token": piece for name, (piece, _) in special.items()}}
    for name, content in files.items():
        write_atomic(out_dir / name, (json.dumps(content, indent=2) + "\n").encode())
        written.append(out_dir / name)
    return written


def _special_tokens(tokenizer: Path | None) -> dict[str, tuple[str, int]]:
    """{"bos"|"eos"|"unk": (piece, id)} of the sentencepiece model; {} without one."""
    if tokenizer is None:
        return {}
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id()}
    return {name: (sp.id_to_piece(i), i) for name, i in ids.items() if i >= 0}
