"""`attn`: causal multi-head / grouped-query attention with RoPE and optional sliding window.

Training runs PyTorch SDPA with an explicitly chosen backend (cuDNN first under `auto` on
CUDA: on an H100 it measured 525-587 TFLOP/s forward against 300-344 for the flash backend),
or the flash-attn package when it is installed and `backend: flash_attn` is chosen.

Decoding keeps a KV cache `[B, S, H_kv, Dh]`. With a sliding window of W tokens the cache is
a ring of S = W slots (slot = position mod W), so decoding memory stays constant; keys are
cached after RoPE, so their order in the ring does not matter to attention.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from stripes.arch.mixer import Mixer, MixerConfig, linear_flops
from stripes.arch.packing import document_starts
from stripes.arch.projection import Linear, project_all
from stripes.arch.registry import register_mixer
from stripes.arch.rope import RopeConfig, check_rotary_heads, rope_angles
from stripes.core.config import ConfigError
from stripes.core.log import note_once
from stripes.kernels.rotary import apply_rotary_qk

# Backends tried in order under `auto` on CUDA; on CPU PyTorch picks its own kernel.
_AUTO_CUDA = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
              SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Decoding leaves cuDNN out: every step has a new key length, and cuDNN builds an execution
# plan per shape (an eager attention step took 56 ms at any context on an H200, 2026-12-02,
# bench/decode_step.py; the CUDA graph of the same step, one shape, 0.18 ms at 4k).
_DECODE_CUDA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
BACKENDS = ("auto", *_SDPA_BACKENDS, "flash_attn")
# Backends that run every call. The others (cuDNN and flash SDPA take no explicit mask, and
# cuDNN rejects one-query GQA decoding; flash-attn is wired for training) serve unmasked
# training calls, and their masked or decoding calls go to `auto`, said once in the log.
_RUN_EVERYTHING = ("auto", "efficient", "math")


@dataclass
class AttnConfig(MixerConfig):
    n_heads: int = 8
    n_kv_heads: int | None = None  # None: as many as n_heads (MHA); fewer: GQA
    window: int | None = None  # sliding window in tokens, the current one included
    backend: str = "auto"  # auto | cudnn | flash | efficient | math | flash_attn
    qkv_bias: bool = False
    rope: RopeConfig = field(default_factory=RopeConfig)

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    def validate(self, d_model: int, key: str) -> None:
        check_rotary_heads(f"{key}.n_heads", self.n_heads, d_model)
        if self.kv_heads <= 0 or self.n_heads % self.kv_heads:
            raise ConfigError(f"{key}.n_kv_heads", self.n_kv_heads,
                              f"a divisor of n_heads={self.n_heads}",
                              "n_kv_heads must divide n_heads")
        if self.window is not None and self.window <= 0:
            raise ConfigError(f"{key}.window", self.window, "a positive number of tokens or null")
        if self.backend not in BACKENDS:
            raise ConfigError(f"{key}.backend", self.backend, ", ".join(BACKENDS))
        if self.backend == "flash_attn":
            _require_flash_attn(f"{key}.backend")
        self.rope.validate(f"{key}.rope")


@dataclass
class KVCache:
    k: torch.Tensor  # [B, S, H_kv, Dh], keys after RoPE; slot of position p is p % S
    v: torch.Tensor  # [B, S, H_kv, Dh]
    length: int = 0  # tokens seen so far = position of the next token
    position: torch.Tensor | None = None  # the same on the device, once tracked there


@register_mixer("attn", AttnConfig)
class Attention(Mixer):
    """Causal attention. x: [B, T, D] -> [B, T, D]; heads [B, T, H, Dh]."""

    fixed_shape_step = True  # arch/mixer.py

    cfg: AttnConfig

    def __init__(self, d_model: int, cfg: AttnConfig) -> None:
        super().__init__(d_model, cfg)
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.kv_heads
        self.head_dim = d_model // cfg.n_heads
        kv_dim = self.n_kv_heads * self.head_dim
        self.q_proj = Linear(d_model, d_model, bias=cfg.qkv_bias)
        self.k_proj = Linear(d_model, kv_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(d_model, kv_dim, bias=cfg.qkv_bias)
        self.out_proj = Linear(d_model, d_model, bias=False)

    # -- training ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        positions = torch.arange(T, device=x.device)
        q, k, v = self._qkv(x, positions)  # [B, T, H, Dh], [B, T, H_kv, Dh] x2
        if self.cfg.backend == "flash_attn":
            y = _flash_attn(q, k, v, self.cfg.window, doc_ids)
        else:
            mask = None
            if doc_ids is not None or self.cfg.window is not None:
                mask = _causal_mask(positions, positions, self.cfg.window)  # [T, T]
                if doc_ids is not None:  # no attention across packed documents
                    doc = document_starts(doc_ids).cumsum(1)  # [B, T]: a change starts a doc
                    same_doc = doc[:, :, None] == doc[:, None, :]  # [B, T, T]
                    mask = (mask & same_doc)[:, None]  # [B, 1, T, T]
            y = self._sdpa(q, k, v, mask, causal=mask is None)
        return self.out_proj(y.reshape(B, T, self.d_model))

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor):
        B, T, _ = x.shape
        q, k, v = project_all(x, self.q_proj, self.k_proj, self.v_proj)
        if torch.is_grad_enabled():
            # v is copied out (n_kv_heads wide): attention saves v for its backward, and a
            # view would keep the whole fused output alive with it (q and k are rotated into
            # new tensors).
            v = v.contiguous()
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        rope_dtype = torch.promote_types(q.dtype, torch.float32)
        cos, sin = rope_angles(positions, self.head_dim, self.cfg.rope, rope_dtype)
        q, k = apply_rotary_qk(q, k, cos, sin)
        return q, k, v

    def _sdpa(self, q, k, v, mask: torch.Tensor | None, causal: bool,
              decoding: bool = False) -> torch.Tensor:
        """q: [B, Tq, H, Dh], k/v: [B, Tk, H_kv, Dh], mask: bool, True = may attend."""
        backend = self._backend(masked_or_decoding=mask is not None or decoding)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, Dh]
        gqa = self.n_kv_heads != self.n_heads
        if gqa and (mask is not None or backend == "efficient"):
            # The memory-efficient kernel, the fused one that takes masks, rejects
            # `enable_gqa` (PyTorch 2.11, H100): give it K/V at the full head count.
            k, v = (t.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1) for t in (k, v))
            gqa = False
        with _backend_context(backend, q.device, decoding):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               enable_gqa=gqa)
        return y.transpose(1, 2)  # [B, Tq, H, Dh]

    # -- decoding ---------------------------------------------------------------------------
    def allocate_state(self, batch_size, max_len, device, dtype) -> KVCache:
        shape = (batch_size, self._cache_slots(max_len), self.n_kv_heads, self.head_dim)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype),
                       torch.zeros(shape, device=device, dtype=dtype))

    def prefill(self, x: torch.Tensor, state: KVCache) -> torch.Tensor:
        """Extend the cache by T tokens (a prompt, or a further chunk of one)."""
        B, T, _ = x.shape
        slots, start = state.k.shape[1], state.length
        if self._ring_too_small(slots) and start + T > slots:
            raise ValueError(f"attn: decoding past the cache of {slots} tokens (max_len)")
        q_pos = torch.arange(start, start + T, device=x.device)
        q, k, v = self._qkv(x, q_pos)
        cached_pos = torch.arange(max(0, start - slots), start, device=x.device)
        k_all = torch.cat((state.k[:, cached_pos % slots], k), dim=1)  # [B, Tk, H_kv, Dh]
        v_all = torch.cat((state.v[:, cached_pos % slots], v), dim=1)
        if start == 0 and (self.cfg.window is None or self.cfg.window >= T):
            y = self._sdpa(q, k, v, None, causal=True, decoding=True)  # a fresh prompt
        else:
            mask = _causal_mask(q_pos, torch.cat((cached_pos, q_pos)), self.cfg.window)
            y = self._sdpa(q, k_all, v_all, mask, causal=False, decoding=True)
        keep = q_pos[-slots:]  # only the newest `slots` positions survive in the ring
        state.k[:, keep % slots] = k[:, -slots:].to(state.k.dtype)
        state.v[:, keep % slots] = v[:, -slots:].to(state.v.dtype)
        state.length = start + T
        return self.out_proj(y.reshape(B, T, self.d_model))

    def step(self, x: torch.Tensor, state: KVCache) -> torch.Tensor:
        B, T, _ = x.shape
        if T != 1:
            raise ValueError(f"attn.step takes one token, got x of shape {tuple(x.shape)}")
        if state.position is not None:
            return self._step_fixed_shapes(x, state)
        slots, pos = state.k.shape[1], state.length
        if self._ring_too_small(slots) and pos >= slots:
            raise ValueError(f"attn: decoding past the cache of {slots} tokens (max_len)")
        # arange, not tensor([pos]): no host-to-device copy, so a CUDA graph can capture it.
        q, k, v = self._qkv(x, torch.arange(pos, pos + 1, device=x.device))
        state.k[:, pos % slots] = k[:, 0].to(state.k.dtype)
        state.v[:, pos % slots] = v[:, 0].to(state.v.dtype)
        state.length = pos + 1
        filled = min(pos + 1, slots)  # every filled slot lies inside the window
        y = self._sdpa(q, state.k[:, :filled], state.v[:, :filled], None, causal=False,
                       decoding=True)
        return self.out_proj(y.reshape(B, 1, self.d_model))

    def track_position(self, state: KVCache, position: torch.Tensor) -> None:
        state.position = position

    def _step_fixed_shapes(self, x: torch.Tensor, state: KVCache) -> torch.Tensor:
        """The step at the device position, over the whole cache with the unwritten slots
        masked: no host value and no shape depends on the position. The G = H / H_kv query
        heads that share a KV head act as G queries of it, so no K/V copy per head is made."""
        B = x.shape[0]
        slots = state.k.shape[1]
        pos = state.position.view(1)  # [1]
        q, k, v = self._qkv(x, pos)
        state.k.index_copy_(1, pos % slots, k.to(state.k.dtype))
        state.v.index_copy_(1, pos % slots, v.to(state.v.dtype))
        # Slot s holds a position <= pos once written; the ring keeps only positions inside
        # the window, so every written slot may be seen.
        seen = (torch.arange(slots, device=x.device) <= pos).view(1, slots)  # [1, S]
        groups = self.n_heads // self.n_kv_heads
        q = q.view(B, self.n_kv_heads, groups, self.head_dim)  # [B, H_kv, G, Dh]
        k, v = (t.transpose(1, 2) for t in (state.k, state.v))  # [B, H_kv, S, Dh] views
        with _backend_context(self._backend(masked_or_decoding=True), x.device, decoding=True):
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype),
                                               attn_mask=seen)  # [B, H_kv, G, Dh]
        return self.out_proj(y.reshape(B, 1, self.d_model))

    def _backend(self, masked_or_decoding: bool) -> str:
        """The configured backend, or `auto` for a call it cannot run."""
        backend = self.cfg.backend
        if backend not in _RUN_EVERYTHING and masked_or_decoding:
            note_once(f"attn: backend {backend} runs unmasked training calls; masked and "
                      "decoding calls use auto")
            return "auto"
        return backend

    # -- accounting -------------------------------------------------------------------------
    def _ring_too_small(self, slots: int) -> bool:
        """True when the cache cannot wrap: no window, or fewer slots (max_len) than it."""
        return self.cfg.window is None or slots < self.cfg.window

    def _cache_slots(self, max_len: int) -> int:
        return max_len if self.cfg.window is None else min(max_len, self.cfg.window)

    def flops_per_token(self, seq_len: int) -> float:
        proj = linear_flops(self.q_proj, self.k_proj, self.v_proj, self.out_proj)
        # Token t attends to min(t + 1, window) keys; average over t in [0, seq_len).
        w = min(self.cfg.window or seq_len, seq_len)
        mean_keys = (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len
        # QK^T and PV: 2 matmuls x 2 FLOPs x Dh per head per key.
        return proj + 4.0 * self.n_heads * self.head_dim * mean_keys

    def state_bytes(self, batch_size: int, max_len: int, dtype: torch.dtype) -> int:
        elems = 2 * batch_size * self._cache_slots(max_len) * self.n_kv_heads * self.head_dim
        return elems * dtype.itemsize


def _causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[Tq, Tk] bool: query at q_pos may see key at k_pos (causal, within the window)."""
    delta = q_pos[:, None] - k_pos[None, :]
    mask = delta >= 0
    if window is not None:
        mask &= delta < window
    return mask


def _backend_context(backend: str, device: torch.device, decoding: bool = False):
    if backend == "auto":
        if device.type != "cuda":
            return nullcontext()
        return sdpa_kernel(_DECODE_CUDA if decoding else _AUTO_CUDA, set_priority=True)
    return sdpa_kernel(_SDPA_BACKENDS[backend])


def _require_flash_attn(key: str) -> None:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        raise ConfigError(key, "flash_attn",
                          ", ".join(b for b in BACKENDS if b != "flash_attn")
                          + " (or install the extra: pip install 'stripes[flash]')",
                          "flash-attn is not installed") from None
    note_once("attn: using the flash-attn package")


def _flash_attn(q, k, v, window: int | None, doc_ids: torch.Tensor | None) -> torch.Tensor:
    """flash-attn on [B, T, H, Dh]; packed documents go through its varlen entry point."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    window_size = (-1, -1) if window is None else (window - 1, 0)
    if doc_ids is None:
        return flash_attn_func(q, k, v, causal=True, window_size=window_size)
    B, T, H, Dh = q.shape
    flat_starts = document_starts(doc_ids).flatten().nonzero().flatten()
    cu_seqlens = torch.cat((flat_starts, flat_starts.new_tensor([B * T]))).to(torch.int32)
    max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    y = flash_attn_varlen_func(
        q.reshape(B * T, H, Dh), k.reshape(B * T, -1, Dh), v.reshape(B * T, -1, Dh),
        cu_seqlens, cu_seqlens, max_len, max_len, causal=True, window_size=window_size,
    )
    return y.view(B, T, H, Dh)
