"""`hyena_se`, `hyena_mr`, `hyena_li`: the StripedHyena 2 Hyena operator with three filters.

One operator (Poli et al. 2023, "Hyena Hierarchy", order 2; Ku et al. 2025, StripedHyena 2),
x: [B, T, D] -> [B, T, D]; every one of the D channels is its own "head" of size 1:

    q, k, v = split(in_proj(x))                  [B, T, D] each
    q, k, v = short causal conv of each          featurizer, `short_len` taps per channel
    u = k * v;  y = h * u                        causal depthwise long convolution
    out = out_proj(q * y)

The kinds differ only in the long filter h ([C, L], tap j multiplies u[t - j]; the
formulas and convolutions are in `hyena_filters`):
  hyena_se  short explicit taps, `filter_len` (7).
  hyena_mr  explicit taps times a learned decay exp(-a_c t), `filter_len` (128).
  hyena_li  modal filter Re(sum_n R_n p_n^t), `state_size` modes: the diagonal complex
            recurrence it is, in training (on CUDA) and decoding.
The filter's tap 0 multiplies the current token, so it also plays the role of Hyena's
per-channel skip term D * u; there is no separate one.

Channels may share filters: `filter_groups` G filters for the D channels, channel c uses
filter c // (D / G). The featurizer runs in stripes.kernels.causal_conv (Triton on CUDA),
which keeps packed documents apart by position. The gated long convolution q * (h * (k v))
of SE and MR: on CUDA, with filters shared by groups of a multiple of 16 channels
(StripedHyena 2 shares them) and 17 to 512 taps (TOEPLITZ_*_TAPS), as block-Toeplitz
matmuls on tensor cores (stripes.kernels.toeplitz_conv, documents kept apart by position);
otherwise chosen by filter length (DIRECT_MAX_TAPS, 64): direct, in the featurizer's kernel,
up to it (7 taps cost 14 FLOPs per channel and token against ~186 by FFT at T = 2048); by
FFT beyond, in stripes.kernels.fft_conv (a backward that keeps only its inputs), with packed
documents as separate rows (`per_document`). LI's filter is as long as the
sequence, but it is a sum of N decaying exponentials: on CUDA stripes.kernels.modal_conv
walks its recurrence (N complex multiply-adds a token and channel, no filter, no FFT) and
restarts it at document starts; elsewhere the filter is built and convolved by FFT, with
packed documents as separate rows.

Decoding state (`HyenaState`): the featurizer's last short_len-1 inputs, plus for SE/MR the
last filter_len-1 values of u (FIR history), for LI the complex modal state [B, D, N].
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from stripes.arch.hyena_filters import (
    compute_dtype,
    decayed_filter,
    direct_causal_conv,
    fft_causal_conv,
    fft_conv_flops,
    fir_continue,
    modal_filter,
    modal_poles,
    positive_rate,
)
from stripes.arch.mixer import Mixer, MixerConfig, linear_flops
from stripes.arch.packing import document_positions, per_document
from stripes.arch.projection import Linear
from stripes.arch.registry import register_mixer
from stripes.core.config import ConfigError
from stripes.kernels.causal_conv import causal_conv
from stripes.kernels.dispatch import use_triton
from stripes.kernels.fft_conv import fft_gated_conv
from stripes.kernels.hyena_step import hyena_step_
from stripes.kernels.modal_conv import modal_conv_continue, modal_gated_conv
from stripes.kernels.toeplitz_conv import fits as toeplitz_fits
from stripes.kernels.toeplitz_conv import toeplitz_gated_conv


def _positive(key: str, value: int, why: str) -> None:
    if value < 1:
        raise ConfigError(key, value, "a positive integer", why)


@dataclass
class HyenaConfig(MixerConfig):
    short_len: int = 3  # taps of the featurizer's causal conv on q, k and v
    filter_groups: int | None = None  # long filters shared by D/G channels each; None: D

    def validate(self, d_model: int, key: str) -> None:
        _positive(f"{key}.short_len", self.short_len, "the featurizer conv needs a tap")
        groups = self.filter_groups
        if groups is not None and (groups <= 0 or d_model % groups):
            raise ConfigError(f"{key}.filter_groups", groups, f"a divisor of d_model={d_model}"
                              " or null", "channels are split evenly among the filters")


@dataclass
class HyenaSEConfig(HyenaConfig):
    filter_len: int = 7  # explicit taps of the long filter

    def validate(self, d_model: int, key: str) -> None:
        super().validate(d_model, key)
        _positive(f"{key}.filter_len", self.filter_len, "the filter needs a tap")


@dataclass
class HyenaMRConfig(HyenaSEConfig):  # the SE settings, a longer default filter
    filter_len: int = 128


@dataclass
class HyenaLIConfig(HyenaConfig):
    state_size: int = 16  # modes (poles) per filter

    def validate(self, d_model: int, key: str) -> None:
        super().validate(d_model, key)
        _positive(f"{key}.state_size", self.state_size, "the modal filter needs a pole")


@dataclass
class HyenaState:
    short: torch.Tensor  # [B, short_len-1, 3D]: last in_proj outputs, the featurizer's FIR
    long: torch.Tensor  # SE/MR: [B, filter_len-1, D] last u; LI: complex [B, D, N] modes


class Hyena(Mixer):
    """The shared operator. x: [B, T, D] -> [B, T, D]; channels are heads of size 1.

    Subclasses give the long filter: its training convolution and its decoding state."""

    fixed_shape_step = True  # arch/mixer.py

    def __init__(self, d_model: int, cfg: HyenaConfig) -> None:
        super().__init__(d_model, cfg)
        self.groups = cfg.filter_groups or d_model
        self.in_proj = Linear(d_model, 3 * d_model, bias=False)
        self.short_filter = nn.Parameter(torch.empty(3 * d_model, cfg.short_len))  # [3D, K]
        self.out_proj = Linear(d_model, d_model, bias=False)

    # -- training ---------------------------------------------------------------------------
    # Whether the long convolution keeps packed documents apart by itself (from per-token
    # document positions); if not, packed rows run as one padded row per document.
    packs_documents: ClassVar[bool] = False

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        if doc_ids is not None and not self.packs_documents:
            return per_document(self._forward_fn, x, doc_ids)
        return self._forward_fn(x, None if doc_ids is None else document_positions(doc_ids))

    def _forward_fn(self, x: torch.Tensor, positions: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """x: [B, T, D]; positions [B, T]: steps since each token's document start, or None
        (one document a row). The featurizer runs in stripes.kernels.causal_conv."""
        D = self.d_model
        q, k, v = causal_conv(self.in_proj(x), self.short_filter, positions=positions,
                              split=[D, D, D])  # [B, T, D] each
        return self.out_proj(self.gated_long_conv(q, k, v, positions))

    @abc.abstractmethod
    def gated_long_conv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        positions: torch.Tensor | None) -> torch.Tensor:
        """q * (h * (k v)) over the whole sequence, [B, T, D] each; positions only where
        `packs_documents`."""

    def _per_channel(self, per_group: torch.Tensor) -> torch.Tensor:
        """[G, ...] -> [D, ...]: channel c uses group c // (D / G)."""
        return per_group.repeat_interleave(self.d_model // self.groups, dim=0)

    # -- decoding ---------------------------------------------------------------------------
    def allocate_state(self, batch_size, max_len, device, dtype) -> HyenaState:
        """Constant in `max_len`. FIR histories hold activations, kept in `dtype` exactly."""
        short = torch.zeros(batch_size, self.cfg.short_len - 1, 3 * self.d_model,
                            device=device, dtype=dtype)
        return HyenaState(short, self._allocate_long(batch_size, device, dtype))

    def prefill(self, x: torch.Tensor, state: HyenaState) -> torch.Tensor:
        return self._decode(x, state, self._long_prefill)

    def step(self, x: torch.Tensor, state: HyenaState) -> torch.Tensor:
        """One token: featurizer, gates and the long filter's step in one fused kernel on
        CUDA (stripes.kernels.hyena_step), the composed reference elsewhere."""
        if x.shape[1] != 1:
            raise ValueError(f"{type(self).__name__}.step takes one token, got {tuple(x.shape)}")
        gated = hyena_step_(self.in_proj(x), state.short, self.short_filter, state.long,
                            **self._step_filter())
        return self.out_proj(gated)

    def _decode(self, x: torch.Tensor, state: HyenaState, long_fn) -> torch.Tensor:
        z, short = fir_continue(self.in_proj(x), state.short, self.short_filter,
                                direct_causal_conv)  # [B, T, 3D]
        state.short.copy_(short)
        q, k, v = z.chunk(3, dim=-1)  # [B, T, D] each
        return self.out_proj(q * long_fn(k * v, state))

    @abc.abstractmethod
    def _allocate_long(self, batch_size: int, device, dtype) -> torch.Tensor: ...

    @abc.abstractmethod
    def _long_prefill(self, u: torch.Tensor, state: HyenaState) -> torch.Tensor:
        """y = h * u for a chunk u [B, T, D] continuing `state.long`; advances it."""

    @abc.abstractmethod
    def _step_filter(self) -> dict[str, torch.Tensor]:
        """The long filter as `hyena_step_` takes it, per channel: long_filter [D, L], or
        poles and residues complex [D, N]."""

    # -- accounting -------------------------------------------------------------------------
    def flops_per_token(self, seq_len: int) -> float:
        """in_proj + out_proj, the featurizer (2 per tap and channel of 3D), the two gates
        (one multiply per channel each) and the long conv (`_long_flops` per channel)."""
        D = self.d_model
        short = 2.0 * self.cfg.short_len * 3 * D
        return linear_flops(self.in_proj, self.out_proj) + short + 2.0 * D \
            + D * self._long_flops(seq_len)

    @abc.abstractmethod
    def _long_flops(self, seq_len: int) -> float:
        """FLOPs per token and channel of the training long convolution."""

    def state_bytes(self, batch_size: int, max_len: int, dtype: torch.dtype) -> int:
        short = batch_size * (self.cfg.short_len - 1) * 3 * self.d_model * dtype.itemsize
        return short + self._long_state_bytes(batch_size, dtype)

    @abc.abstractmethod
    def _long_state_bytes(self, batch_size: int, dtype: torch.dtype) -> int: ...

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        """Projections as every mixer. Featurizer: tap 0 = 1 plus N(0, 0.1) noise on every
        tap, so the operator starts close to the plain gate q * (h * (k * v)) of the
        projections and the look-back of the short conv is learned from there."""
        super().init_weights(std, out_std)
        nn.init.normal_(self.short_filter, std=0.1)
        self.short_filter[:, 0] += 1.0
        self._init_filter()

    @abc.abstractmethod
    def _init_filter(self) -> None: ...


# Explicit filters of one a channel up to this many taps convolve directly, longer ones by
# FFT (grouped filters: TOEPLITZ_*_TAPS below). On an H200
# (BENCHMARKS.md, 2026-12-02; B16 T4096 D2048, forward+backward) the direct kernel took 2.08
# ms at 7 taps and 35.6 ms at 128, about 0.28 ms a tap, and plain PyTorch's FFT 17.8 ms at any
# length: the two cross near 64 taps.
DIRECT_MAX_TAPS = 64
# Filters shared by a multiple of 16 channels run, on CUDA, as block-Toeplitz matmuls from
# TOEPLITZ_MIN_TAPS to TOEPLITZ_MAX_TAPS taps. On an H100 (BENCHMARKS.md, 2026-12-06;
# B16 T4096 D2048, 16-channel groups, forward+backward) they took 4.84 / 6.44 / 16.0 ms at
# 7 / 128 / 512 taps, against 2.15 + 0.28 ms a tap past 7 for the direct kernel (equal near
# 17 taps) and 22.6 ms for plain PyTorch's FFT at any length (each 64 taps more add a
# [64, 64] piece).
TOEPLITZ_MIN_TAPS = 17
TOEPLITZ_MAX_TAPS = 512


class _ExplicitHyena(Hyena):
    """SE and MR: explicit taps `filter_taps` [G, L]; decoding keeps the last L-1 inputs.

    The long convolution: on CUDA, with groups of a multiple of 16 channels and
    TOEPLITZ_MIN_TAPS to TOEPLITZ_MAX_TAPS taps, the block-Toeplitz matmul kernel
    (stripes.kernels.toeplitz_conv, Triton only: elsewhere such filters take the paths below);
    otherwise by length, up to DIRECT_MAX_TAPS taps the direct kernel with both gates fused
    into it (stripes.kernels.causal_conv); beyond, the FFT (stripes.kernels.fft_conv: nothing
    but the inputs kept for backward), with packed documents run one a row. The first two keep
    packed documents apart by position."""

    cfg: HyenaSEConfig

    @property
    def by_matmul(self) -> bool:
        return (use_triton(self.filter_taps) and toeplitz_fits(self.d_model, self.groups)
                and TOEPLITZ_MIN_TAPS <= self.cfg.filter_len <= TOEPLITZ_MAX_TAPS)

    @property
    def direct(self) -> bool:
        """In the time domain (by matmul or tap by tap), rather than by FFT."""
        return self.by_matmul or self.cfg.filter_len <= DIRECT_MAX_TAPS

    @property
    def packs_documents(self) -> bool:
        return self.direct

    @property
    def train_conv(self):
        """The plain convolution of the chosen kind (prefill uses it: training's rounding, but
        for the matmul kernel's tf32 operands)."""
        return direct_causal_conv if self.direct else fft_causal_conv

    def gated_long_conv(self, q, k, v, positions):
        if self.by_matmul:
            return toeplitz_gated_conv(q, k, v, self.filter(), positions)
        h = self._per_channel(self.filter())
        if self.direct:
            return causal_conv(k, h, x2=v, gate=q, positions=positions)
        return fft_gated_conv(q, k, v, h)

    def _long_flops(self, seq_len: int) -> float:
        return 2.0 * self.cfg.filter_len if self.direct else fft_conv_flops(seq_len)

    def __init__(self, d_model: int, cfg: HyenaSEConfig) -> None:
        super().__init__(d_model, cfg)
        self.filter_taps = nn.Parameter(torch.empty(self.groups, cfg.filter_len))  # [G, L]

    def filter(self) -> torch.Tensor:
        """The long filter h: [G, L]."""
        return self.filter_taps

    def _allocate_long(self, batch_size, device, dtype) -> torch.Tensor:
        return torch.zeros(batch_size, self.cfg.filter_len - 1, self.d_model, device=device,
                           dtype=dtype)

    def _long_prefill(self, u: torch.Tensor, state: HyenaState) -> torch.Tensor:
        return self._fir(u, state, self.train_conv)  # the conv of training, same rounding

    def _step_filter(self) -> dict[str, torch.Tensor]:
        return {"long_filter": self._per_channel(self.filter())}  # L MACs a channel, no FFT

    def _fir(self, u: torch.Tensor, state: HyenaState, conv) -> torch.Tensor:
        y, history = fir_continue(u, state.long, self._per_channel(self.filter()), conv)
        state.long.copy_(history)
        return y

    def _long_state_bytes(self, batch_size: int, dtype: torch.dtype) -> int:
        return batch_size * (self.cfg.filter_len - 1) * self.d_model * dtype.itemsize

    def _init_filter(self) -> None:
        """Taps ~ N(0, 1/L): the expected energy sum_t h_t^2 is 1, so the conv starts
        neither amplifying nor shrinking u."""
        nn.init.normal_(self.filter_taps, std=1 / math.sqrt(self.cfg.filter_len))


@register_mixer("hyena_se", HyenaSEConfig)
class HyenaSE(_ExplicitHyena):
    """Hyena-SE: short explicit filter (default 7 taps: the direct convolution).
    x: [B, T, D] -> [B, T, D]."""


@register_mixer("hyena_mr", HyenaMRConfig)
class HyenaMR(_ExplicitHyena):
    """Hyena-MR: explicit filter (default 128 taps: by FFT) times exp(-a_c t),
    a_c = exp(log_decay). x: [B, T, D] -> [B, T, D]."""

    fp32_params = ("log_decay",)
    no_decay_params = ("log_decay",)  # weight decay would pull every a_c towards 1

    def __init__(self, d_model: int, cfg: HyenaMRConfig) -> None:
        super().__init__(d_model, cfg)
        self.log_decay = nn.Parameter(torch.empty(self.groups))  # [G], float32

    def filter(self) -> torch.Tensor:
        """h[g, t] = w[g, t] exp(-a_g t): [G, L] in float32 (float64 in a float64 model)."""
        return decayed_filter(self.filter_taps, self.log_decay)

    def _init_filter(self) -> None:
        """Decay lengths 1/a spread log-uniformly over the groups from 1 token to L, so some
        filters stay local and some use all their taps. Taps ~ N(0, s_g^2) with
        s_g^-2 = sum_t exp(-2 a_g t): expected energy 1 after the decay."""
        L = self.cfg.filter_len
        self.log_decay.copy_(torch.linspace(0.0, -math.log(L), self.groups))
        t = torch.arange(L, dtype=torch.float64, device=self.log_decay.device)
        decay = self.log_decay.double().exp()[:, None]  # [G, 1]
        scale = torch.exp(-2 * decay * t).sum(1, keepdim=True).rsqrt()  # [G, 1]
        nn.init.normal_(self.filter_taps)
        self.filter_taps.mul_(scale.to(self.filter_taps.dtype))


@register_mixer("hyena_li", HyenaLIConfig)
class HyenaLI(Hyena):
    """Hyena-LI: modal filter h[t] = Re(sum_n R_n p_n^t), p_n = exp(-r_n + i theta_n),
    r_n = exp(log_rate_n). FFT convolution in training, complex recurrence in decoding.
    x: [B, T, D] -> [B, T, D]."""

    cfg: HyenaLIConfig
    # Weight decay would pull rates to 1 and residues to 0; bf16 would round p^t away.
    fp32_params = ("log_rate", "theta", "residue_re", "residue_im")
    no_decay_params = fp32_params

    def __init__(self, d_model: int, cfg: HyenaLIConfig) -> None:
        super().__init__(d_model, cfg)
        shape = (self.groups, cfg.state_size)  # [G, N]
        self.log_rate = nn.Parameter(torch.empty(shape))
        self.theta = nn.Parameter(torch.empty(shape))
        self.residue_re = nn.Parameter(torch.empty(shape))
        self.residue_im = nn.Parameter(torch.empty(shape))

    def residues(self) -> torch.Tensor:
        """R: complex [G, N], in complex64 (complex128 in a float64 model)."""
        dtype = torch.promote_types(self.residue_re.dtype, torch.float32)
        return torch.complex(self.residue_re.to(dtype), self.residue_im.to(dtype))

    def filter(self, length: int) -> torch.Tensor:
        """h[g, t] for t < length: [G, length], float32 (float64 in a float64 model)."""
        return modal_filter(self.log_rate, self.theta, self.residues(), length)

    @property
    def packs_documents(self) -> bool:
        """Where the modal_conv kernels run (CUDA, float32 filter parameters: all but float64
        models) they restart the state at each document start; the FFT path elsewhere
        cannot, so documents run there as separate rows."""
        return use_triton(self.log_rate) and self.log_rate.dtype == torch.float32

    def _modal_params(self) -> tuple[torch.Tensor, ...]:
        """(rate, theta, residue_re, residue_im) [G, N] as stripes.kernels.modal_conv takes
        them: rate = exp(log_rate) clamped, all in at least float32."""
        dtype = compute_dtype(self.log_rate, self.theta)
        return (positive_rate(self.log_rate), self.theta.to(dtype), self.residue_re.to(dtype),
                self.residue_im.to(dtype))

    def gated_long_conv(self, q, k, v, positions):
        """As the recurrence the filter is (stripes.kernels.modal_conv: no filter, no FFT, on
        CUDA); elsewhere the filter built for this length, convolved by FFT."""
        return modal_gated_conv(q, k, v, *self._modal_params(), positions)

    def _allocate_long(self, batch_size, device, dtype) -> torch.Tensor:
        complex_dtype = torch.promote_types(dtype, torch.float32).to_complex()
        return torch.zeros(batch_size, self.d_model, self.cfg.state_size, device=device,
                           dtype=complex_dtype)  # [B, D, N]

    def _long_prefill(self, u: torch.Tensor, state: HyenaState) -> torch.Tensor:
        y, modes = modal_conv_continue(u, *self._modal_params(), state.long)
        state.long.copy_(modes)
        return y

    def _step_filter(self) -> dict[str, torch.Tensor]:
        return {"poles": self._per_channel(modal_poles(self.log_rate, self.theta)),
                "residues": self._per_channel(self.residues())}  # complex [D, N] each

    def _long_flops(self, seq_len: int) -> float:
        """The recurrence's: per mode, p s + u (a complex product and an add, 8 FLOPs) and
        Re(R s) summed (4); the FFT the reference runs would count fft_conv_flops."""
        return 12.0 * self.cfg.state_size

    def _long_state_bytes(self, batch_size: int, dtype: torch.dtype) -> int:
        complex_dtype = torch.promote_types(dtype, torch.float32).to_complex()
        return batch_size * self.d_model * self.cfg.state_size * complex_dtype.itemsize

    def _init_filter(self) -> None:
        """Rates r ~ log-uniform [1e-4, 1] (memory from 1 to 10^4 tokens) and frequencies
        theta ~ log-uniform [1e-3, pi] (near-constant to alternating), so the modes span
        short to long filters. Residues R ~ CN(0, 2 (1 - |p|^2) / N): each mode then has
        expected energy sum_t Re(R p^t)^2 ~ 1/N and the filter ~ 1, slow modes included."""
        _log_uniform_(self.log_rate, 1e-4, 1.0, log=True)
        _log_uniform_(self.theta, 1e-3, math.pi, log=False)
        modulus_sq = torch.exp(-2 * self.log_rate.double().exp())  # |p|^2
        scale = ((1 - modulus_sq) / self.cfg.state_size).sqrt()  # per real/imag part
        for part in (self.residue_re, self.residue_im):
            nn.init.normal_(part)
            part.mul_(scale.to(part.dtype))


def _log_uniform_(param: torch.Tensor, low: float, high: float, log: bool) -> None:
    """Fill with values log-uniform in [low, high]; with log=True store their logarithm."""
    values = torch.empty_like(param, dtype=torch.float64).uniform_(math.log(low),
                                                                    math.log(high))
    param.copy_(values if log else values.exp())
