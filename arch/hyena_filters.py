"""Hyena long filters and the causal convolutions that apply them: pure functions.

Layouts: sequences `u` are `[B, T, C]` (time, then channels, like every activation);
filters `h` are `[C, L]` with tap `h[c, j]` multiplying `u[t - j, c]` (tap 0 = the current
token). Every routine computes

    y[t, c] = sum_{j=0}^{min(t, L-1)} h[c, j] * u[t - j, c]                      (causal conv)

and they differ only in how (Poli et al. 2023, "Hyena Hierarchy", Sec. 3: the long
convolution of the order-2 operator y = q * (h * (k * v))):
  direct_causal_conv   the sum above as a depthwise conv1d: O(T L); short filters, decoding
  fft_causal_conv      zero-padded FFT product at length 2T: O(T log T); training of MR (and
                       of LI off CUDA)
  modal_recurrence     the modal filter's state space, one token at a time: decoding of LI
                       (stripes.kernels.modal_conv walks it by segments for LI's training
                       and prefill on CUDA)

Filters (Ku et al. 2025, StripedHyena 2: SE short explicit, MR medium explicit with decay,
LI long implicit; the LI form is the modal / poles-residues form of StripedHyena, Together
2023, and Massaroli et al. 2023 "Laughing Hyena Distillery"):
  decayed_filter   MR:  h[c, t] = w[c, t] * exp(-a_c t),  a_c > 0
  modal_filter     LI:  h[c, t] = Re( sum_n R[c, n] p[c, n]^t ),  p = exp(-r + i theta)

Arithmetic runs in float32, or float64 when the inputs are float64 (`compute_dtype`), never
in bf16: long sums of small taps and powers p^t lose everything at 8 bits of mantissa.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from stripes.kernels.modal_filter import modal_filter as modal_filter_taps
from stripes.kernels.modal_filter.reference import rate_powers

# Rates (decays of MR, pole rates of LI) are exp(log_rate) clamped to this range. Below
# MIN_RATE, exp(-rate) rounds to 1 in float32 (|p| = 1: a pure integrator, memory beyond
# 1M tokens); above MAX_RATE every tap after the first is 0 already, and an infinite rate
# would make the tap-0 power exp(-inf * 0) = nan. Outside the range the parameter is inert.
MIN_RATE, MAX_RATE = 1e-6, 1e3


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when any input is float64: the precision of all filter math."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def positive_rate(log_rate: torch.Tensor) -> torch.Tensor:
    """exp(log_rate) in [MIN_RATE, MAX_RATE], in at least float32."""
    log_rate = log_rate.to(compute_dtype(log_rate))
    return torch.exp(log_rate.clamp(math.log(MIN_RATE), math.log(MAX_RATE)))


# -- filters ----------------------------------------------------------------------------------
def decayed_filter(taps: torch.Tensor, log_decay: torch.Tensor) -> torch.Tensor:
    """MR filter h[c, t] = w[c, t] exp(-a_c t) (Ku et al. 2025: explicit taps regularised by
    an exponential decay). taps: [C, L]; log_decay: [C], a = exp(log_decay). Returns [C, L]
    in at least float32."""
    decay = positive_rate(log_decay)  # [C]
    t = torch.arange(taps.shape[1], device=taps.device, dtype=decay.dtype)  # [L]
    return taps.to(decay.dtype) * torch.exp(-decay[:, None] * t)


def modal_poles(log_rate: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Poles p = exp(-r + i theta), r = exp(log_rate) >= MIN_RATE, so |p| = exp(-r) < 1 for
    every parameter value. log_rate, theta: [C, N]. Returns complex [C, N]."""
    dtype = compute_dtype(log_rate, theta)
    return torch.exp(torch.complex(-positive_rate(log_rate), theta.to(dtype)))


def modal_powers(log_rate: torch.Tensor, theta: torch.Tensor, times: torch.Tensor
                 ) -> torch.Tensor:
    """p^t for each pole and each t in `times` ([K], integers): complex [C, N, K].

    Computed as exp(t (-r + i theta)), not by repeated multiplication, so the rounding
    error does not grow with t and nothing depends on a maximum length."""
    return rate_powers(positive_rate(log_rate), theta.to(compute_dtype(log_rate, theta)), times)


def modal_filter(log_rate: torch.Tensor, theta: torch.Tensor, residues: torch.Tensor,
                 length: int) -> torch.Tensor:
    """LI filter h[c, t] = Re( sum_n R[c, n] p[c, n]^t ) for t < length: [C, length].

    residues: complex [C, N]. The taps for t < T are the same whatever `length` >= T is:
    the filter is evaluated at the length at hand, with no stored maximum. Built by
    stripes.kernels.modal_filter (Triton on CUDA: no [C, N, length] powers in memory)."""
    dtype = compute_dtype(log_rate, theta)
    return modal_filter_taps(positive_rate(log_rate), theta.to(dtype),
                             residues.real.to(dtype), residues.imag.to(dtype), length)


# -- convolutions -----------------------------------------------------------------------------
def direct_causal_conv(u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Causal depthwise convolution by its definition. u: [B, T, C], h: [C, L] -> [B, T, C].

    conv1d computes a cross-correlation, so the taps are flipped; L-1 zeros on the left make
    it causal. Runs in the common dtype of u and h (the conv1d of autocast when enabled);
    the result has u's dtype."""
    B, T, C = u.shape
    L = h.shape[1]
    dtype = torch.promote_types(u.dtype, h.dtype)
    x = F.pad(u.to(dtype).transpose(1, 2), (L - 1, 0))  # [B, C, L-1+T]
    w = h.to(dtype).flip(1)[:, None, :]  # [C, 1, L]: w[c, 0, k] = h[c, L-1-k]
    y = F.conv1d(x, w, groups=C)  # [B, C, T]
    return y.transpose(1, 2).to(u.dtype)  # [B, T, C]


def fft_causal_conv(u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Causal depthwise convolution by FFT. u: [B, T, C], h: [C, L] -> [B, T, C].

    Taps beyond T cannot reach an output, so h is cut to T taps; zero-padding both to
    n = 2T >= T + L - 1 makes the circular convolution of the DFT equal the linear one for
    the first T outputs. Computed in float32 (float64 for float64 inputs) with autocast off."""
    B, T, C = u.shape
    dtype = compute_dtype(u, h)
    n = 2 * T
    with torch.autocast(u.device.type, enabled=False):
        u_f = torch.fft.rfft(u.to(dtype).transpose(1, 2), n=n)  # [B, C, n/2+1]
        h_f = torch.fft.rfft(h[:, :T].to(dtype), n=n)  # [C, n/2+1]
        y = torch.fft.irfft(u_f * h_f, n=n)[..., :T]  # [B, C, T]
    return y.transpose(1, 2).to(u.dtype)  # [B, T, C]


def fir_continue(u: torch.Tensor, history: torch.Tensor, h: torch.Tensor, conv
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal conv of a chunk that continues a sequence: the FIR form used in decoding.

    u: [B, T, C] new inputs; history: [B, L-1, C] the L-1 inputs before them (zeros where
    the sequence had not started, which is exactly the zero padding of the causal conv);
    h: [C, L]; conv: `direct_causal_conv` or `fft_causal_conv`. Returns (y [B, T, C], the
    new history [B, L-1, C])."""
    past = history.shape[1]
    full = torch.cat((history.to(u.dtype), u), dim=1)  # [B, L-1+T, C]
    y = conv(full, h)[:, past:]  # outputs of the chunk only
    return y, full[:, full.shape[1] - past:]


def modal_recurrence(u: torch.Tensor, poles: torch.Tensor, residues: torch.Tensor,
                     state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The LI filter as a diagonal linear recurrence, token by token (decoding, reference):

        s[t] = p * s[t-1] + u[t],    y[t] = Re( sum_n R_n s_n[t] )

    which unrolls to y[t] = sum_j Re(sum_n R_n p_n^(t-j)) u[j] + Re(sum_n R_n p_n^(t+1) s[-1]),
    the modal filter's convolution plus the carried state. u: [B, T, C]; poles, residues:
    complex [C, N]; state: complex [B, C, N] (s[-1]). Returns (y [B, T, C] in u's dtype,
    the new state)."""
    ys = []
    u_c = u.to(state.dtype)  # [B, T, C] as complex
    for t in range(u.shape[1]):
        state = poles * state + u_c[:, t, :, None]  # [B, C, N]
        ys.append((state * residues).real.sum(-1))  # [B, C]
    return torch.stack(ys, dim=1).to(u.dtype), state


def fft_conv_flops(seq_len: int) -> float:
    """Forward FLOPs per token and channel of `fft_causal_conv` at length T: three real FFTs
    of size n = 2T (input, filter, inverse) at 2.5 n log2 n each (half a complex FFT's
    5 n log2 n), plus the complex product of n/2+1 bins at 6 FLOPs, divided by T tokens."""
    n = 2 * seq_len
    return (3 * 2.5 * n * math.log2(n) + 6 * (n // 2 + 1)) / seq_len
