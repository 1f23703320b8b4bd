"""StripedLM: embedding -> blocks from the expanded stripe pattern -> RMSNorm -> LM head.

Inputs are token ids `[B, T]`; activations `[B, T, D]`; logits `[B, T, V]`. Given targets,
the forward returns the loss instead, through a fused linear + cross-entropy that never
holds the [B*T, V] logits (kernels/linear_ce).
The model is written for one device; parallelism is applied from outside by `train/`.
Build it on the meta device and materialise it with `to_empty` + `init_weights()`:

    with torch.device("meta"):
        model = StripedLM(cfg)
    model.to_empty(device="cuda")
    model.init_weights()
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stripes.arch.block import Block
from stripes.arch.config import ModelConfig
from stripes.arch.layers import RMSNorm
from stripes.arch.projection import Linear
from stripes.kernels.linear_ce import linear_cross_entropy


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """logits [B, T, V], targets [B, T] -> mean cross-entropy over non-ignored targets, fp32.

    A free function so that wrapped models (DDP calls only `forward`) share it."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                           ignore_index=ignore_index)


@dataclass
class DecodeState:
    """Per-layer mixer states plus the shared position counter."""

    layers: list[Any]
    max_len: int
    length: int = 0
    position: torch.Tensor | None = None  # `length` on the device, once tracked there


class StripedLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_specs = cfg.expand()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(s, cfg.d_model, cfg.norm_eps) for s in self.layer_specs)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.d_model, cfg.vocab_size,
                                                                 bias=False)

    # -- training ---------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: [B, T]; doc_ids: optional [B, T] document index. Returns logits
        [B, T, V]; or, given targets [B, T], the mean next-token cross-entropy (float32
        scalar, targets equal to -100 skipped) without materialising the logits."""
        x, pending = self.embed(input_ids), None  # [B, T, D]; see Block.forward
        for block in self.blocks:
            x, pending = block(x, doc_ids, pending)
        y, _ = self.norm(pending, residual=x)  # the last block's add, fused into the norm
        if targets is None:
            return F.linear(y, self._head_weight())  # [B, T, V]
        # Unchecked targets: checking reads back to the host, which would wait for the whole
        # queued forward in every micro-batch. The trainer checks its data's vocabulary
        # against the model's at start; an id out of range makes the loss and gradients NaN
        # on CUDA (the step's guard skips it) and still raises on the CPU reference.
        return linear_cross_entropy(y.flatten(0, 1), self._head_weight(), targets.flatten(),
                                    check_targets=False)

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor,
             doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy in float32; targets [B, T], -100 skipped."""
        return self(input_ids, doc_ids, targets)

    def _head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight  # [V, D]

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(x), self._head_weight())  # [B, T, V]

    @torch.no_grad()
    def init_weights(self) -> None:
        """The one place parameters get their initial values (also after `to_empty`).

        Linear and embedding weights ~ N(0, init_std); projections that write into the
        residual stream ~ N(0, init_std / sqrt(2 n_layers)) (GPT-2, Radford et al., 2019),
        so the residual's variance does not grow with depth.
        """
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.embed.weight, std=std)
        for block in self.blocks:
            block.init_weights(std, out_std)
        self.norm.init_weights()
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=std)

    # -- decoding ---------------------------------------------------------------------------
    def allocate_state(self, batch_size: int, max_len: int | None = None,
                       device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None) -> DecodeState:
        max_len = max_len or self.cfg.max_seq_len
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        layers = [b.allocate_state(batch_size, max_len, device, dtype) for b in self.blocks]
        return DecodeState(layers, max_len)

    def prefill(self, input_ids: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """input_ids: [B, T] prompt. Fills `state`; returns logits [B, T, V]."""
        return self._decode(input_ids, state, one_token=False)

    def step(self, input_ids: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """input_ids: [B, 1] one token per sequence. Returns logits [B, 1, V]."""
        if input_ids.shape[1] != 1:
            raise ValueError(f"step takes [B, 1] token ids, got {tuple(input_ids.shape)}")
        return self._decode(input_ids, state, one_token=True)

    def unfixed_step_layers(self) -> list[str]:
        """Layers whose step is not declared graph-safe (Mixer.fixed_shape_step)."""
        return [f"{i}: {type(b.mixer).__name__}" for i, b in enumerate(self.blocks)
                if not type(b.mixer).fixed_shape_step]

    def track_position_on_device(self, state: DecodeState) -> None:
        """Later `step`s read the position from a device tensor and keep every shape fixed:
        one CUDA graph of `step` then serves every token (arch/generate.py). Only `step` may
        follow; `state.length` is the host's count and is not advanced by graph replays."""
        unfixed = self.unfixed_step_layers()
        if unfixed:
            raise ValueError("fixed-shape decoding needs every mixer to declare "
                             f"fixed_shape_step; these do not: {', '.join(unfixed)}")
        state.position = torch.tensor(state.length, device=self.embed.weight.device)
        for block, layer_state in zip(self.blocks, state.layers, strict=True):
            block.track_position(layer_state, state.position)

    def _decode(self, input_ids: torch.Tensor, state: DecodeState, one_token: bool) -> torch.Tensor:
        if state.length + input_ids.shape[1] > state.max_len:
            raise ValueError(f"decoding past max_len={state.max_len} "
                             f"(at {state.length}, adding {input_ids.shape[1]})")
        if state.position is not None and not one_token:
            raise ValueError("prefill after track_position_on_device: only step may follow")
        x = self.embed(input_ids)
        for block, layer_state in zip(self.blocks, state.layers, strict=True):
            x = block.step(x, layer_state) if one_token else block.prefill(x, layer_state)
        state.length += input_ids.shape[1]
        if state.position is not None:
            state.position.add_(1)  # on the device: a captured step advances it on replay
        return self._logits(x)

    # -- accounting -------------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def head_flops_per_token(self) -> float:
        return 2.0 * self.cfg.d_model * self.cfg.vocab_size

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Forward FLOPs per token at `seq_len` (default max_seq_len); training is ~3x."""
        seq_len = seq_len or self.cfg.max_seq_len
        blocks = sum(b.flops_per_token(seq_len) for b in self.blocks)
        return blocks + self.head_flops_per_token()

    def state_bytes(self, batch_size: int = 1, max_len: int | None = None,
                    dtype: torch.dtype = torch.bfloat16) -> int:
        max_len = max_len or self.cfg.max_seq_len
        return sum(b.mixer.state_bytes(batch_size, max_len, dtype) for b in self.blocks)

    def fp32_parameter_names(self) -> list[str]:
        """Full names of parameters their mixers require to stay float32."""
        return self._declared("fp32_params")

    def no_decay_parameter_names(self) -> list[str]:
        """Norm weights, biases, embeddings, and what mixers declare: no weight decay."""
        names = [n for n, p in self.named_parameters() if p.ndim < 2 or n.startswith("embed.")]
        return sorted(set(names) | set(self._declared("no_decay_params")))

    def _declared(self, attr: str) -> list[str]:
        names = []
        for i, block in enumerate(self.blocks):
            for rel in getattr(block.mixer, attr):
                names.append(f"blocks.{i}.mixer.{rel}")
        return names
