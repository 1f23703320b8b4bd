"""A distillation stage: new mixers learn to do what the components they replace did.

    stages:
      - name: distill
        kind: distill
        seq_len: 2048
        steps: 500
        distill: {source: runs/llama-1b-hf, source_layers: "0..15", target_layers: "0..15"}
      - {name: train, seq_len: 2048, steps: 10000}

For each pair (source layer j, target layer i), on real batches: the source model's hidden
state entering its layer j, h_j, is fed to the target's layer-i mixer (with its pre-norm),
and its output is regressed onto the source's attention output at layer j:

    loss = mean over pairs of  ||mixer_i(norm_i(h_j)) - attn_j(norm_j(h_j))||^2 / ||attn_j(...)||^2

The source runs without gradients, so only the paired target mixers and their pre-norms
receive gradients and move: everything else (grafted attention, MLPs, embeddings) stays as
it is without a freeze rule. Each pair trains on the source's own hidden states, so a new
mixer learns its job before the layers around it change. The source is a Hugging Face
Llama/Mistral directory (graft/hf_llama.py) with the target's width.

One process only, for now: the paired mixers are called on their own, outside the wrapped
model's forward, which DDP's gradient reduction, FSDP2's per-block gathering and DeepSpeed's
engine all hook into.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stripes.core.config import ConfigError


@dataclass
class DistillConfig:
    source: str | None = None  # a Hugging Face Llama/Mistral directory
    source_layers: Any = None  # whose attention is imitated: "a..b", "a..b:step", "a,b"
    target_layers: Any = None  # whose mixers imitate them, paired in order


def distill_pairs(cfg: DistillConfig, source_layers: int, target_layers: int, key: str
                  ) -> list[tuple[int, int]]:
    from stripes.graft.spec import layer_list

    sources = layer_list(cfg.source_layers, source_layers, f"{key}.source_layers")
    targets = layer_list(cfg.target_layers, target_layers, f"{key}.target_layers")
    if len(sources) != len(targets):
        raise ConfigError(f"{key}.target_layers", cfg.target_layers, f"{len(sources)} "
                          "layers, as many as source_layers names", f"it names {len(targets)}")
    return list(zip(sources, targets, strict=True))


class Distiller(nn.Module):
    """The distillation objective: called like the model, (ids, doc_ids, targets) -> loss."""

    def __init__(self, target: nn.Module, cfg: DistillConfig, device: torch.device,
                 key: str) -> None:
        from stripes.graft.hf_llama import HFLlama

        super().__init__()
        source = HFLlama(cfg.source, key=f"{key}.source")
        self.source = source.load().to(device).eval().requires_grad_(False)
        self.target = target
        d_source, d_target = self.source.cfg.d_model, target.cfg.d_model
        if d_source != d_target:
            raise ConfigError(f"{key}.source", cfg.source, f"a model of the target's width "
                              f"{d_target}", f"its hidden size is {d_source}")
        self.pairs = distill_pairs(cfg, self.source.cfg.n_layers, target.cfg.n_layers, key)
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
                x = block(x, doc_ids)
        losses = []
        for j, i in self.pairs:
            h, want = taught[j]
            block = self.target.blocks[i]
            got = block.mixer(block.mixer_norm(h), doc_ids)
            want = want.float()
            losses.append((got.float() - want).pow(2).mean() / want.pow(2).mean())
        return torch.stack(losses).mean()
