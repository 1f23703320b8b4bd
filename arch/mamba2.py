"""`mamba`: the Mamba-2 block (Dao & Gu 2024, "Transformers are SSMs", §7) around SSD.

x [B, T, D] -> in_proj -> z [d_inner] | xBC [d_inner + 2 G N] | dt [H]
xBC -> causal depthwise conv (kernel d_conv) -> SiLU -> x [B, T, H, P], B/C [B, T, G, N]
dt = softplus(dt + dt_bias), A = -exp(A_log)    (float32)
y = SSD(x, dt, A, B, C)                           (stripes.kernels.ssd: Triton on CUDA)
y = rmsnorm((y + D x) * silu(z)) * weight         (per group of d_inner / G channels, float32;
                                                   stripes.kernels.gated_norm: one pass)
out_proj: d_inner -> D

d_inner = expand * D, H = d_inner / head_dim heads of size P = head_dim, N = d_state,
G = n_groups. Parameter names follow the reference implementation (`in_proj`, `conv1d`,
`dt_bias`, `A_log`, `D`, `norm.weight`, `out_proj`), so Mamba-2 checkpoints map 1:1.

Training runs stripes.kernels.causal_conv (conv and SiLU in one pass) and the chunked SSD
algorithm (stripes.kernels.ssd: Triton kernels on CUDA, stripes.arch.ssd's reference
elsewhere); packed documents go in as per-token document positions and cu_seqlens spans.
Decoding keeps the last d_conv - 1 conv inputs and the SSM state, and `step` is the
recurrence for one token (a fused kernel on CUDA).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stripes.arch.mixer import Mixer, MixerConfig, linear_flops
from stripes.arch.packing import cu_seqlens, document_positions
from stripes.arch.projection import Linear, project_split
from stripes.arch.registry import register_mixer
from stripes.core.config import ConfigError, require_positive
from stripes.kernels.causal_conv import causal_conv
from stripes.kernels.gated_norm import gated_norm
from stripes.kernels.ssd import ssd, ssd_step


@dataclass
class Mamba2Config(MixerConfig):
    d_state: int = 128  # N: state size per head (per channel of the head)
    expand: int = 2  # d_inner = expand * d_model
    head_dim: int = 64  # P
    n_groups: int = 1  # G: B and C are shared by groups of H / G heads
    d_conv: int = 4  # kernel of the causal depthwise conv over xBC
    # Q of the chunked SSD algorithm. Every Q computes the same function; 64 is the fastest
    # for stripes' Triton kernels (1.7x Q = 256, which they run as 128, at hybrid-1b's
    # shape; BENCHMARKS.md).
    chunk_size: int = 64
    dt_min: float = 0.001  # dt at init is log-uniform in [dt_min, dt_max]
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    A_init_min: float = 1.0  # -A at init is uniform in [A_init_min, A_init_max]
    A_init_max: float = 16.0
    conv_bias: bool = True
    norm_eps: float = 1e-5

    def validate(self, d_model: int, key: str) -> None:
        for name in ("d_state", "expand", "head_dim", "n_groups", "d_conv", "chunk_size"):
            require_positive(f"{key}.{name}", getattr(self, name), integer=True)
        for name in ("dt_min", "dt_max", "dt_init_floor", "A_init_min", "A_init_max", "norm_eps"):
            require_positive(f"{key}.{name}", getattr(self, name))
        d_inner = self.expand * d_model
        if d_inner % self.head_dim:
            raise ConfigError(f"{key}.head_dim", self.head_dim,
                              f"a divisor of expand * d_model = {d_inner}",
                              "the inner width is split into heads of head_dim channels")
        n_heads = d_inner // self.head_dim
        if n_heads % self.n_groups:
            raise ConfigError(f"{key}.n_groups", self.n_groups,
                              f"a divisor of the number of heads {n_heads}",
                              "each group of B and C serves the same number of heads")
        if self.dt_max <= self.dt_min:
            raise ConfigError(f"{key}.dt_max", self.dt_max, f"a number > dt_min={self.dt_min}")
        if not 0 < self.dt_init_floor <= self.dt_max:
            raise ConfigError(f"{key}.dt_init_floor", self.dt_init_floor,
                              f"a number in (0, dt_max={self.dt_max}]")
        if self.A_init_max < self.A_init_min:
            raise ConfigError(f"{key}.A_init_max", self.A_init_max,
                              f"a number >= A_init_min={self.A_init_min}")


@dataclass
class Mamba2State:
    conv: torch.Tensor  # [B, conv_dim, d_conv - 1]: the last d_conv - 1 inputs (xBC) of the conv
    ssm: torch.Tensor  # [B, H, P, N]: h of recurrence (S1) in stripes.arch.ssd


# (x, dt, A, B, C, initial_state) -> (y, final_state): the one-token step or a chunked SSD.
SSMFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@register_mixer("mamba", Mamba2Config)
class Mamba2(Mixer):
    """Mamba-2 mixer. x: [B, T, D] -> [B, T, D]; heads [B, T, H, P]."""

    fixed_shape_step = True  # arch/mixer.py

    cfg: Mamba2Config
    fp32_params = ("A_log", "dt_bias", "D")
    no_decay_params = ("A_log", "dt_bias", "D")

    def __init__(self, d_model: int, cfg: Mamba2Config) -> None:
        super().__init__(d_model, cfg)
        self.d_inner = cfg.expand * d_model
        self.n_heads = self.d_inner // cfg.head_dim
        H, G, N = self.n_heads, cfg.n_groups, cfg.d_state
        self.conv_dim = self.d_inner + 2 * G * N  # channels of xBC
        self.in_proj = Linear(d_model, self.d_inner + self.conv_dim + H, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.d_conv, groups=self.conv_dim,
                                bias=cfg.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.empty(H))
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // G, cfg.norm_eps)
        self.out_proj = Linear(self.d_inner, d_model, bias=False)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        """Linears as the base class; then the Mamba-2 initialisation of the SSM parameters.

        dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max] floored at dt_init_floor,
        so softplus(dt_bias) starts at time scales from 1/dt_max to 1/dt_min steps.
        A_log = log(U[A_init_min, A_init_max]); D = 1; the gated norm's weight = 1.
        conv1d: PyTorch's Conv1d default, which Mamba-2 keeps: weight and bias ~
        U(-1/sqrt(d_conv), 1/sqrt(d_conv)) (fan-in d_conv for a depthwise kernel).
        """
        super().init_weights(std, out_std)
        cfg = self.cfg
        log_dt = torch.empty_like(self.dt_bias)
        log_dt.uniform_(math.log(cfg.dt_min), math.log(cfg.dt_max))
        dt = log_dt.exp().clamp_min(cfg.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # log(exp(dt) - 1), stable
        minus_A = torch.empty_like(self.A_log).uniform_(cfg.A_init_min, cfg.A_init_max)
        self.A_log.copy_(minus_A.log())
        self.D.fill_(1.0)
        bound = 1.0 / math.sqrt(cfg.d_conv)
        nn.init.uniform_(self.conv1d.weight, -bound, bound)
        if self.conv1d.bias is not None:
            nn.init.uniform_(self.conv1d.bias, -bound, bound)
        self.norm.init_weights()

    # -- training ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, D] -> [B, T, D]. With doc_ids [B, T] the conv and the state restart at
        every document: the conv kernel keeps its taps inside each document, and SSD takes
        the documents as cu_seqlens spans of the flat tokens."""
        if doc_ids is None:
            return self._mix(x, None, None, self._ssd_training)[0]
        batch, T, _ = x.shape
        seqlens = cu_seqlens(doc_ids)

        def packed_ssd(xs, dt, A, B, C, initial_state):
            flat = [t.reshape(1, batch * T, *t.shape[2:]) for t in (xs, dt, B, C)]
            y, _ = ssd(flat[0], flat[1], A, flat[2], flat[3], self.cfg.chunk_size,
                       cu_seqlens=seqlens)
            return y.view(xs.shape), None
        return self._mix(x, None, None, packed_ssd, doc_ids)[0]

    def _ssd_training(self, x, dt, A, B, C, initial_state):
        """stripes.kernels.ssd (Triton on CUDA); training needs no final state."""
        return ssd(x, dt, A, B, C, self.cfg.chunk_size, initial_state)[0], None

    def _ssd_prefill(self, x, dt, A, B, C, initial_state):
        return ssd(x, dt, A, B, C, self.cfg.chunk_size, initial_state, return_state=True)

    @staticmethod
    def _ssd_step(x, dt, A, B, C, state):
        """Recurrence (S1) for one token, the state advanced in place (a fused kernel on
        CUDA)."""
        return ssd_step(x, dt, A, B, C, state), state

    def _mix(self, x: torch.Tensor, conv_cache: torch.Tensor | None,
             ssm_state: torch.Tensor | None, ssm: SSMFn, doc_ids: torch.Tensor | None = None):
        """The block on x [B, T, D], continuing from conv_cache [B, conv_dim, d_conv - 1] and
        ssm_state [B, H, P, N] (None: a sequence start), or, with doc_ids, on packed
        documents from their starts. Returns y [B, T, D] and both states (None in training)."""
        batch, T, _ = x.shape
        H, P, G, N = self.n_heads, self.cfg.head_dim, self.cfg.n_groups, self.cfg.d_state
        z, xBC, dt = project_split(x, self.in_proj, [self.d_inner, self.conv_dim, H])
        pieces = [self.d_inner, G * N, G * N]
        if conv_cache is None:  # training: each row, or each packed document, from zeros
            positions = None if doc_ids is None else document_positions(doc_ids)
            x_inner, B, C = causal_conv(xBC, self.conv1d.weight[:, 0].flip(-1), self.conv1d.bias,
                                        positions=positions, silu=True, split=pieces)
        else:
            xBC, conv_cache = self._conv(xBC, conv_cache)
            x_inner, B, C = F.silu(xBC).split(pieces, dim=-1)
        xs = x_inner.reshape(batch, T, H, P)  # heads [B, T, H, P]
        B, C = B.reshape(batch, T, G, N), C.reshape(batch, T, G, N)  # [B, T, G, N]
        dt = F.softplus(_fp32(dt) + _fp32(self.dt_bias))  # [B, T, H], > 0
        A = -torch.exp(_fp32(self.A_log))  # [H], < 0
        y, ssm_state = ssm(xs, dt, A, B, C, ssm_state)  # [B, T, H, P]
        # The skip term D_h x_t goes into the norm's fused pass: D repeated over each
        # head's P channels.
        skip = _fp32(self.D)[:, None].expand(H, P).reshape(-1)  # [d_inner]
        y = self.norm(y.reshape(batch, T, self.d_inner), z, x_inner, skip)  # [B, T, d_inner]
        return self.out_proj(y), conv_cache, ssm_state

    def _conv(self, xBC: torch.Tensor, cache: torch.Tensor | None):
        """Causal depthwise conv over time. xBC [B, T, C]; cache [B, C, K - 1]: the K - 1
        inputs before xBC (None: zeros, a sequence start). Returns [B, T, C], new cache."""
        K = self.cfg.d_conv
        xt = xBC.transpose(1, 2)  # [B, C, T]
        if cache is None:
            cache = xt.new_zeros(xt.shape[0], xt.shape[1], K - 1)
        window = torch.cat((cache.to(xt.dtype), xt), dim=-1)  # [B, C, K - 1 + T]
        out = self.conv1d(window)  # [B, C, T]: no padding, output t sees inputs t-K+1..t
        return out.transpose(1, 2), window[..., window.shape[-1] - (K - 1):]

    # -- decoding ---------------------------------------------------------------------------
    def allocate_state(self, batch_size, max_len, device, dtype) -> Mamba2State:
        """Constant-size state (max_len unused), kept in promote_types(dtype, float32)."""
        dtype = torch.promote_types(dtype, torch.float32)
        conv = torch.zeros(batch_size, self.conv_dim, self.cfg.d_conv - 1, device=device,
                           dtype=dtype)
        ssm = torch.zeros(batch_size, self.n_heads, self.cfg.head_dim, self.cfg.d_state,
                          device=device, dtype=dtype)
        return Mamba2State(conv, ssm)

    def prefill(self, x: torch.Tensor, state: Mamba2State) -> torch.Tensor:
        """Chunked SSD from the stored states; may follow earlier prefill/step calls."""
        y, conv, ssm = self._mix(x, state.conv, state.ssm, self._ssd_prefill)
        state.conv.copy_(conv)
        state.ssm.copy_(ssm)
        return y

    def step(self, x: torch.Tensor, state: Mamba2State) -> torch.Tensor:
        """One token through recurrence (S1): h = exp(dt A) h + dt x B^T, y = h C + D x."""
        if x.shape[1] != 1:
            raise ValueError(f"mamba.step takes one token, got x of shape {tuple(x.shape)}")
        y, conv, ssm = self._mix(x, state.conv, state.ssm, self._ssd_step)
        state.conv.copy_(conv)
        state.ssm.copy_(ssm)
        return y

    # -- accounting -------------------------------------------------------------------------
    def flops_per_token(self, seq_len: int) -> float:
        """in_proj + out_proj, the depthwise conv, and the matmuls of the chunked SSD.

        With Q = min(chunk_size, seq_len) and c = ceil(seq_len / Q) chunks, per token:
        C B^T per group 2 Q G N; (L o CB) X per head 2 Q H P; chunk states 2 H P N;
        reading the entering states 2 H P N; state passing, a [c+1, c+1] matmul per head
        over P N, 2 H P N (c+1)^2 / seq_len. Elementwise work (exp, gates, norm) is not counted.
        """
        H, P, G, N = self.n_heads, self.cfg.head_dim, self.cfg.n_groups, self.cfg.d_state
        Q = min(self.cfg.chunk_size, seq_len)
        chunks = -(-seq_len // Q)
        proj = linear_flops(self.in_proj, self.out_proj)
        conv = 2.0 * self.conv_dim * self.cfg.d_conv
        ssd = 2.0 * (Q * G * N + Q * H * P + 2 * H * P * N)
        passing = 2.0 * H * P * N * (chunks + 1) ** 2 / seq_len
        return proj + conv + ssd + passing

    def state_bytes(self, batch_size: int, max_len: int, dtype: torch.dtype) -> int:
        per_sequence = (self.conv_dim * (self.cfg.d_conv - 1)
                        + self.n_heads * self.cfg.head_dim * self.cfg.d_state)
        return batch_size * per_sequence * torch.promote_types(dtype, torch.float32).itemsize


class GatedRMSNorm(nn.Module):
    """rmsnorm((y + x * skip) * silu(z)) * weight over groups of `group_size` channels, in
    float32 (stripes.kernels.gated_norm: one fused pass on CUDA).

    y, z, x: [B, T, C] -> [B, T, C] in z's dtype; skip [C] (x and skip optional).
    Normalising per group of d_inner / G channels (the heads that share one B/C group), as
    the Mamba-2 reference does, keeps the norm local to a group: heads can be sharded by
    group (tensor parallel) with no cross-shard reduction, and pretrained Mamba-2 weights
    keep their meaning. With G = 1 it is a plain RMSNorm.
    """

    def __init__(self, dim: int, group_size: int, eps: float) -> None:
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor, x: torch.Tensor | None = None,
                skip: torch.Tensor | None = None) -> torch.Tensor:
        return gated_norm(y, z, self.weight, self.group_size, self.eps, x, skip)

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """t in at least float32 (float64 stays float64: the exactness tests run in it)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
