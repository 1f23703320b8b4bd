"""A distillation stage: new mixers learn to do what the components they replace did.

    stages:
      - name: distill
        kind: distill
        seq_len: 2048
        steps: 500
        init_from: runs/sh2-1b-grafted       # configs/graft/transformer-1b-into-sh2-1b.yaml
        distill: {source: runs/transformer-1b, source_layers: "0..2,4..6,8..10,12..14",
                  target_layers: "0..2,4..6,8..10,12..14"}   # sh2-1b's Hyena layers
      - {name: train, seq_len: 2048, steps: 10000}

For each pair (source layer j, target layer i), on real batches: the source model's hidden
state entering its layer j, h_j, is fed to the target's layer-i mixer (with its pre-norm),
and its output is regressed onto the source's attention output at layer j:

    loss = mean over pairs of  ||mixer_i(norm_i(h_j)) - attn_j(norm_j(h_j))||^2 / ||attn_j(...)||^2

The source runs without gradients, so only the paired target mixers and their pre-norms
receive gradients and move: everything else (grafted attention, MLPs, embeddings) stays as
it is without a freeze rule. Each pair trains on the source's own hidden states, so a new
mixer learns its job before the layers around it change. The source is a stripes
checkpoint or run directory, or a Hugging Face Llama/Mistral directory (graft/), with the
target's width and vocabulary; source layers must be attention, target layers must not
(an attention layer there is grafted, or would learn what it already is).

One process only, for now: the paired mixers are called on their own, outside the wrapped
model's forward, which DDP's gradient reduction, FSDP2's per-block gathering and DeepSpeed's
engine all hook into.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stripes.arch.config import ModelConfig
from stripes.core.config import ConfigError


@dataclass
class DistillConfig:
    source: str | None = None  # a Hugging Face Llama/Mistral directory
    source_layers: Any = None  # whose attention is imitated: "a..b", "a..b:step", "a,b"
    target_layers: Any = None  # whose mixers imitate them, paired in order


def check_distill(cfg: DistillConfig, target: ModelConfig, backend: str, key: str
                  ) -> list[tuple[int, int]]:
    """The (source layer, target layer) pairs, after every check that needs no tensor: the
    source exists and has the target's width and vocabulary, source layers are attention
    and target layers are not, the backend is one process. One line each."""
    from stripes.graft.apply import open_source_path
    from stripes.graft.spec import layer_list

    if backend not in ("auto", "single"):
        raise ConfigError("parallel.backend", backend, f"single or auto (one process) for "
                          f"{key}", "the paired mixers run outside the wrapped model")
    if not cfg.source:
        raise ConfigError(f"{key}.source", cfg.source, "a stripes checkpoint or run "
                          "directory, or a Hugging Face Llama/Mistral directory")
    source = open_source_path(cfg.source, f"{key}.source").model_config()
    for name in ("d_model", "vocab_size"):
        if getattr(source, name) != getattr(target, name):
            raise ConfigError(f"{key}.source", cfg.source, f"a model with the target's "
                              f"{name} {getattr(target, name)}",
                              f"its {name} is {getattr(source, name)}")
    sources = layer_list(cfg.source_layers, source.n_layers, f"{key}.source_layers")
    targets = layer_list(cfg.target_layers, target.n_layers, f"{key}.target_layers")
    if len(sources) != len(targets):
        raise ConfigError(f"{key}.target_layers", cfg.target_layers, f"{len(sources)} "
                          "layers, as many as source_layers names", f"it names {len(targets)}")
    source_kinds = [layer.kind for layer in source.expand(f"{key}.source")]
    target_kinds = [layer.kind for layer in target.expand("model")]
    for j, i in zip(sources, targets, strict=True):
        if source_kinds[j] != "attn":
            raise ConfigError(f"{key}.source_layers", cfg.source_layers, "attention layers "
                              "of the source", f"layer {j} is {source_kinds[j]}")
        if target_kinds[i] == "attn":
            raise ConfigError(f"{key}.target_layers", cfg.target_layers, "layers whose mixer "
                              "is new (not attention)", f"layer {i} is attention")
    return list(zip(sources, targets, strict=True))


class Distiller(nn.Module):
    """The distillation objective: called like the model, (ids, doc_ids, targets) -> loss."""

    def __init__(self, target: nn.Module, cfg: DistillConfig, device: torch.device,
                 key: str) -> None:
        from stripes.graft.apply import open_source_path

        super().__init__()
        self.pairs = check_distill(cfg, target.cfg, "single", key)
        source = open_source_path(cfg.source, f"{key}.source")
        self.source = source.load().to(device).eval().requires_grad_(False)
        self.target = target
        self.by_source: dict[int, list[int]] = {}
        for j, i in self.pairs:
            self.by_source.setdefault(j, []).append(i)

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():  # the source's hidden states and attention outputs
            taught = {}
            x = self.source.embed(input_ids)
            for j, block in enumerate(self.source.blocks):
                if j in self.by_source:
                    taught[j] = (x, block.mixer(block.mixer_norm(x), doc_ids))
                if j >= max(self.by_source):
                    break
                x, out = block(x, doc_ids)
                x = x + out  # the stream after the block
        losses = []
        for j, i in self.pairs:
            h, want = taught[j]
            block = self.target.blocks[i]
            got = block.mixer(block.mixer_norm(h), doc_ids)
            want = want.float()
            losses.append((got.float() - want).pow(2).mean() / want.pow(2).mean())
        return torch.stack(losses).mean()
