"""`retention`: RetNet multi-scale retention (Sun et al., 2023, arXiv:2307.08621, sec. 2.2).

    q, k = RoPE(x W_Q), RoPE(x W_K) / sqrt(Dk)        [B, T, H, Dk]   (the paper's e^{i n theta})
    v, g = x W_V, x W_G                                [B, T, H, Dv], [B, T, H Dv]
    o    = Retention_gamma_h(q, k, v) per head h       [B, T, H, Dv]   (eq. 5-7)
    y    = (silu(g) * GroupNorm_H(o)) W_O              [B, T, D]       (eq. 8-9)

Multi-scale decays: head h uses gamma_h = 1 - 2^(-e_h). The paper sets e_h = 5 + h; that
stops decaying in float32 for h >= 19 (1 - 2^-24 is the last float32 below 1), and with 32
heads the slowest heads would in effect never forget. So the exponents follow the paper
while 5 + (H - 1) <= `max_decay_exponent` (default 20: every head count the paper trains,
up to 16) and are spread evenly over [5, max_decay_exponent] beyond. The LOG decays are
computed from the config in float64 (log1p(-2^-e)) and kept as Python floats, not as a
tensor: nothing to lose in meta-device construction, nothing for `.to(bf16)` to round.

Training runs the form named by `form`: chunkwise by default, through
stripes.kernels.retention (Triton kernels on CUDA, packed documents as cu_seqlens spans),
or the dense parallel reference. Decoding keeps the state S [B, H, Dk, Dv] in
promote_types(dtype, float32) plus the position for the rotation: `prefill` runs the
chunkwise form from that state, `step` the recurrent form (one fused kernel on CUDA).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from stripes.arch.mixer import Mixer, MixerConfig, linear_flops
from stripes.arch.packing import cu_seqlens, sequence_bounds
from stripes.arch.projection import Linear, project_all
from stripes.arch.registry import register_mixer
from stripes.arch.retention_forms import retention_parallel
from stripes.arch.rope import RopeConfig, check_rotary_heads, rope_angles
from stripes.core.config import ConfigError, require_positive
from stripes.kernels.gated_norm import gated_norm
from stripes.kernels.retention import chunk_retention, retention_step
from stripes.kernels.rotary import apply_rotary_qk

FASTEST_DECAY_EXPONENT = 5.0  # gamma = 1 - 2^-5 for head 0 (paper)
# A one-step decay 1 - 2^-e must stay visible to a float32 state (relative spacing 2^-24 ..
# 2^-23); e <= 20 keeps it at least 8 float32 steps below 1.
SLOWEST_ALLOWED_EXPONENT = 20.0


@dataclass
class RetentionConfig(MixerConfig):
    n_heads: int = 8
    chunk_size: int = 64  # tokens per chunk of the chunkwise form
    value_factor: float = 2.0  # value and gate width = value_factor * d_model (paper: 2)
    form: str = "chunkwise"  # training form: one of TRAINING_FORMS
    max_decay_exponent: float = 20.0  # slowest head decays by 1 - 2^-max at most
    rope: RopeConfig = field(default_factory=RopeConfig)
    norm_eps: float = 1e-5  # of the per-head GroupNorm

    def value_dim(self, d_model: int) -> int:
        return round(self.value_factor * d_model)

    def validate(self, d_model: int, key: str) -> None:
        check_rotary_heads(f"{key}.n_heads", self.n_heads, d_model)
        require_positive(f"{key}.value_factor", self.value_factor)
        width = self.value_factor * d_model
        if self.value_factor <= 0 or width != round(width) or round(width) % self.n_heads:
            raise ConfigError(f"{key}.value_factor", self.value_factor,
                              f"a positive number with value_factor * d_model a multiple of "
                              f"n_heads={self.n_heads}", "values are split evenly into heads")
        if self.chunk_size <= 0:
            raise ConfigError(f"{key}.chunk_size", self.chunk_size, "a positive integer")
        if self.form not in TRAINING_FORMS:
            raise ConfigError(f"{key}.form", self.form, ", ".join(TRAINING_FORMS),
                              "unknown training form")
        if not FASTEST_DECAY_EXPONENT <= self.max_decay_exponent <= SLOWEST_ALLOWED_EXPONENT:
            raise ConfigError(f"{key}.max_decay_exponent", self.max_decay_exponent,
                              f"a number in [{FASTEST_DECAY_EXPONENT:g}, "
                              f"{SLOWEST_ALLOWED_EXPONENT:g}]",
                              "slower decays are lost in a float32 state")
        self.rope.validate(f"{key}.rope")
        require_positive(f"{key}.norm_eps", self.norm_eps)


# -- training forms and their FLOPs (per token, per head; 2 FLOPs per multiply-add) ----------
class TrainingForm(NamedTuple):
    # (q, k, v, log_decay, chunk_size, cu_seqlens or None) -> o [B, T, H, Dv]
    run: Callable[..., torch.Tensor]
    flops: Callable[[int, int, int, int], float]  # (seq_len, chunk_size, Dk, Dv) -> FLOPs


def _run_parallel(q, k, v, log_decay, chunk_size, seqlens):
    """The dense T x T form (chunk_size does not apply), one sequence at a time."""
    if seqlens is None:
        return retention_parallel(q, k, v, log_decay)[0]
    flat = [t.flatten(0, 1) for t in (q, k, v)]  # [B*T, H, D]
    outs = [retention_parallel(*(t[None, a:b] for t in flat), log_decay)[0][0]
            for a, b in sequence_bounds(q, seqlens)]
    return torch.cat(outs).view(*v.shape).to(q.dtype)


def _run_chunkwise(q, k, v, log_decay, chunk_size, seqlens):
    """stripes.kernels.retention: Triton kernels on CUDA, the chunkwise reference elsewhere."""
    return chunk_retention(q, k, v, log_decay, cu_seqlens=seqlens, chunk_size=chunk_size)[0]


def _parallel_flops(seq_len: int, chunk_size: int, dk: int, dv: int) -> float:
    # Dense T x T: Q K^T (Dk per score) and scores @ V (Dv per score), per query token.
    return 2.0 * seq_len * (dk + dv)


def _chunkwise_flops(seq_len: int, chunk_size: int, dk: int, dv: int) -> float:
    c = min(chunk_size, seq_len)
    # Dense C x C inside the chunk as for parallel; then q R (Dk x Dv per token) and the
    # state's K^T V (C Dk Dv per chunk = Dk Dv per token).
    return 2.0 * c * (dk + dv) + 2.0 * dk * dv + 2.0 * dk * dv


TRAINING_FORMS = {
    "parallel": TrainingForm(_run_parallel, _parallel_flops),
    "chunkwise": TrainingForm(_run_chunkwise, _chunkwise_flops),
}


def log_decays(n_heads: int, max_exponent: float) -> tuple[float, ...]:
    """log gamma_h = log(1 - 2^-e_h) in float64 for h in [0, H): e_h = 5 + h (paper), with the
    step shrunk below 1 when that would pass `max_exponent`. Every value is < 0."""
    span = max_exponent - FASTEST_DECAY_EXPONENT
    step = 1.0 if n_heads == 1 else min(1.0, span / (n_heads - 1))
    return tuple(math.log1p(-(2.0 ** -(FASTEST_DECAY_EXPONENT + h * step)))
                 for h in range(n_heads))


@dataclass
class RetentionState:
    memory: torch.Tensor  # [B, H, Dk, Dv] S_t in promote_types(dtype, float32)
    length: int = 0  # tokens seen so far = position of the next token (for the rotation)
    position: torch.Tensor | None = None  # the same on the device, once tracked there


@register_mixer("retention", RetentionConfig)
class Retention(Mixer):
    """Multi-scale retention. x: [B, T, D] -> [B, T, D]; heads [B, T, H, Dk] (q, k) and
    [B, T, H, Dv] (v), Dk = D / H, Dv = value_factor * D / H."""

    fixed_shape_step = True  # arch/mixer.py

    cfg: RetentionConfig
    fp32_params = ("norm_weight",)
    no_decay_params = ("norm_weight",)

    def __init__(self, d_model: int, cfg: RetentionConfig) -> None:
        super().__init__(d_model, cfg)
        self.n_heads = cfg.n_heads
        self.value_dim = cfg.value_dim(d_model)
        self.head_dim, self.head_value_dim = d_model // cfg.n_heads, self.value_dim // cfg.n_heads
        self.q_proj = Linear(d_model, d_model, bias=False)
        self.k_proj = Linear(d_model, d_model, bias=False)
        self.v_proj = Linear(d_model, self.value_dim, bias=False)
        self.g_proj = Linear(d_model, self.value_dim, bias=False)
        self.out_proj = Linear(self.value_dim, d_model, bias=False)
        self.norm_weight = nn.Parameter(torch.empty(self.value_dim))  # GroupNorm, per channel
        self.log_decay = log_decays(cfg.n_heads, cfg.max_decay_exponent)  # H float64 floats
        self._log_decay_tensors: dict[tuple, torch.Tensor] = {}  # (device, dtype) -> [H]

    def init_weights(self, std: float, out_std: float) -> None:
        super().init_weights(std, out_std)
        nn.init.ones_(self.norm_weight)

    # -- training ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, D] -> [B, T, D]. With doc_ids [B, T] each packed document starts from an
        empty state: the forms take the documents as cu_seqlens spans of the flat tokens.
        Rotary positions count along the row, not from each document's start: retention's
        scores see only position differences, which are the same either way."""
        B, T, _ = x.shape
        q, k, v, g = self._project(x, torch.arange(T, device=x.device))
        seqlens = None
        if doc_ids is not None:
            seqlens = cu_seqlens(doc_ids)
            q, k, v = (t.reshape(1, B * T, *t.shape[2:]) for t in (q, k, v))
        o = TRAINING_FORMS[self.cfg.form].run(q, k, v, self._log_decay(q), self.cfg.chunk_size,
                                              seqlens)
        return self._output(o.view(B, T, *o.shape[2:]), g)

    def _project(self, x: torch.Tensor, positions: torch.Tensor):
        """x: [B, T, D] at `positions` [T] -> q, k [B, T, H, Dk], v [B, T, H, Dv], gate g
        [B, T, H*Dv]."""
        B, T, _ = x.shape
        q, k, v, g = project_all(x, self.q_proj, self.k_proj, self.v_proj, self.g_proj)
        if torch.is_grad_enabled():
            # The gate is copied out: the gated norm saves it for backward, and a view would
            # keep all four outputs alive with it (q and k are rotated into new tensors and
            # the kernels copy v).
            g = g.contiguous()
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_heads, self.head_dim)
        v = v.view(B, T, self.n_heads, self.head_value_dim)
        rope_dtype = torch.promote_types(q.dtype, torch.float32)
        cos, sin = rope_angles(positions, self.head_dim, self.cfg.rope, rope_dtype)
        # The paper scales k by Dk^-1/2 (eq. 5); rotation keeps norms, so order is immaterial.
        q, k = apply_rotary_qk(q, k, cos, sin)
        k = k * self.head_dim ** -0.5
        return q, k, v, g

    def _log_decay(self, like: torch.Tensor) -> torch.Tensor:
        """[H] log decays in promote_types(dtype, float32), built from the float64 floats once
        per device and dtype: a tensor made from a list is a blocking copy to the GPU, which
        would stall the host in every forward."""
        dtype = torch.promote_types(like.dtype, torch.float32)
        key = (like.device, dtype)
        if key not in self._log_decay_tensors:
            self._log_decay_tensors[key] = torch.tensor(self.log_decay, dtype=dtype,
                                                        device=like.device)
        return self._log_decay_tensors[key]

    def _output(self, o: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """o: [B, T, H, Dv] retention; g: [B, T, H Dv] gate -> [B, T, D] (eq. 8-9)."""
        B, T, H, Dv = o.shape
        # GroupNorm with one group per head normalises each head's Dv vector, in float32,
        # then the swish gate (eq. 9): one pass (stripes.kernels.gated_norm), in g's dtype.
        gated = gated_norm(o.reshape(B, T, H * Dv), g, self.norm_weight, Dv, self.cfg.norm_eps,
                           centered=True, gate_first=False)
        return self.out_proj(gated)

    # -- decoding ---------------------------------------------------------------------------
    def allocate_state(self, batch_size, max_len, device, dtype) -> RetentionState:
        """The state is [B, H, Dk, Dv] whatever max_len is: retention decodes in O(1) memory."""
        shape = (batch_size, self.n_heads, self.head_dim, self.head_value_dim)
        state_dtype = torch.promote_types(dtype, torch.float32)
        return RetentionState(torch.zeros(shape, device=device, dtype=state_dtype))

    def prefill(self, x: torch.Tensor, state: RetentionState) -> torch.Tensor:
        """x: [B, T, D]: the chunkwise form continuing from `state` (fresh or filled)."""
        return self._decode(x, state, self._prefill_memory)

    def step(self, x: torch.Tensor, state: RetentionState) -> torch.Tensor:
        """x: [B, 1, D]: one recurrent update (eq. 6), a fused kernel on CUDA."""
        if x.shape[1] != 1:
            raise ValueError(f"retention.step takes one token, got x of shape {tuple(x.shape)}")
        return self._decode(x, state, retention_step)

    def _prefill_memory(self, q, k, v, log_decay, memory: torch.Tensor) -> torch.Tensor:
        o, new_memory = chunk_retention(q, k, v, log_decay, initial_state=memory,
                                        return_state=True, chunk_size=self.cfg.chunk_size)
        memory.copy_(new_memory)
        return o

    def _decode(self, x: torch.Tensor, state: RetentionState, advance: Callable) -> torch.Tensor:
        """x: [B, T, D] at the positions after `state.length`; `advance(q, k, v, log_decay,
        memory)` returns the retention output and moves `memory` on in place."""
        T = x.shape[1]
        positions = (state.position.view(1) if state.position is not None else
                     torch.arange(state.length, state.length + T, device=x.device))
        q, k, v, g = self._project(x, positions)
        o = advance(q, k, v, self._log_decay(q), state.memory)
        state.length += T
        return self._output(o, g)

    def track_position(self, state: RetentionState, position: torch.Tensor) -> None:
        state.position = position

    # -- accounting -------------------------------------------------------------------------
    def flops_per_token(self, seq_len: int) -> float:
        """Projections (q, k, v, gate, out) plus the training form's matmuls at `seq_len`:
        chunkwise counts the dense C x C inside-chunk Q K^T and scores @ V, q R and K^T V
        amortised per token; parallel the dense T x T products. Elementwise work (decays,
        GroupNorm, gate) is not counted."""
        proj = linear_flops(self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.out_proj)
        form = TRAINING_FORMS[self.cfg.form]
        per_head = form.flops(seq_len, self.cfg.chunk_size, self.head_dim, self.head_value_dim)
        return proj + self.n_heads * per_head

    def state_bytes(self, batch_size: int, max_len: int, dtype: torch.dtype) -> int:
        elems = batch_size * self.n_heads * self.head_dim * self.head_value_dim
        return elems * torch.promote_types(dtype, torch.float32).itemsize
