"""Gated causal depthwise conv (Triton's interpreter on CPU) against the float64 reference,
and the reference against Hyena's plain convolution: outputs and every gradient, with
document resets, strided views and taps longer than the sequence."""

from __future__ import annotations

import functools

import pytest
import torch

from stripes.arch.hyena_filters import direct_causal_conv
from stripes.kernels.causal_conv import causal_conv
from stripes.kernels.causal_conv.kernel import causal_conv_triton
from stripes.kernels.causal_conv.reference import causal_conv as causal_conv_reference

from numerics import poison_empty, rel_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    poison_empty(monkeypatch)


def positions_of(doc_ids: torch.Tensor) -> torch.Tensor:
    steps = torch.arange(doc_ids.shape[1])
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return steps - torch.where(starts, steps, 0).cummax(dim=1).values


def run(fn, tensors, grad):
    """fn's output and the gradients of every tensor argument (None stays None)."""
    leaves = {n: (t.detach().clone().requires_grad_() if t is not None and t.is_floating_point()
                  else t) for n, t in tensors.items()}
    out = fn(**leaves)
    out.backward(grad.to(out.dtype))
    return [out] + [t.grad for n, t in leaves.items() if t is not None and t.is_floating_point()]


@pytest.mark.parametrize("B, T, C, L, x2, gate, bias, docs, silu", [
    (2, 70, 20, 3, False, False, False, False, False),  # the featurizer: plain taps
    (2, 70, 70, 7, True, True, False, False, False),    # Hyena-SE: q * (h * (k v)), 2 x 2 blocks
    (1, 40, 12, 4, False, False, True, True, True),     # Mamba-2's conv: bias, SiLU, documents
    (2, 70, 12, 4, False, False, True, False, True),    # Mamba-2's conv across a block edge
    (1, 5, 8, 9, True, True, True, True, False),        # more taps than steps
    (1, 70, 8, 5, True, True, True, True, True),        # everything at once
    (2, 130, 70, 4, True, True, True, True, True),      # ... across 3 x 2 blocks, SiLU's 2 passes
])
def test_float32_matches_float64_reference(B, T, C, L, x2, gate, bias, docs, silu):
    g = torch.Generator().manual_seed(T + C + L)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    doc_ids = torch.randint(0, 3, (B, T), generator=g).sort(dim=1).values
    tensors = {"x": rand(B, T, C), "h": rand(C, L), "bias": rand(C) if bias else None,
               "x2": rand(B, T, C) if x2 else None, "gate": rand(B, T, C) if gate else None,
               "positions": positions_of(doc_ids) if docs else None}
    grad = rand(B, T, C)
    want = run(functools.partial(causal_conv_reference, silu=silu), tensors, grad)
    dev = {n: (t.to(DEVICE, torch.float32) if t is not None and t.is_floating_point()
               else (t.to(DEVICE) if t is not None else None)) for n, t in tensors.items()}
    got = run(functools.partial(causal_conv_triton, silu=silu), dev,
              grad.to(DEVICE, torch.float32))
    assert len(got) == len(want)
    for actual, expected in zip(got, want, strict=True):
        assert actual.dtype == torch.float32 and torch.isfinite(actual).all()
        assert rel_error(actual, expected) < 1e-5


@pytest.mark.parametrize("split, silu, used", [
    ((40, 15, 15), True, (0, 1, 2)),  # Mamba's x | B | C; piece edges inside channel blocks
    ((40, 15, 15), True, (0, 2)),     # an unused piece: zeros
    ((30, 40), False, (0, 1)),        # two pieces, the featurizer's plain taps
    ((70,), False, (0,)),
])
def test_split_output_reads_each_pieces_gradient(split, silu, used):
    g = torch.Generator().manual_seed(sum(split) + len(used))
    B, T, C, L = 2, 70, 70, 4
    x, h, bias = (torch.randn(*s, generator=g, dtype=torch.float64) for s in
                  ((B, T, C), (C, L), (C,)))
    # Piece gradients at strides of their own (batch and time swapped, a padded row, plain),
    # so a piece read at another's strides would be caught.
    layouts = [lambda n: torch.randn(T, B, n, generator=g, dtype=torch.float64).transpose(0, 1),
               lambda n: torch.randn(B, T, n + 3, generator=g, dtype=torch.float64)[..., :n],
               lambda n: torch.randn(B, T, n, generator=g, dtype=torch.float64)]
    grads = [layouts[i](n) for i, n in enumerate(split)]

    def run_split(fn, dtype):
        leaves = [t.to(DEVICE, dtype).detach().requires_grad_() for t in (x, h, bias)]
        pieces = fn(*leaves, silu=silu, split=split)
        assert [p.shape[2] for p in pieces] == list(split)
        sum((pieces[i] * grads[i].to(DEVICE, dtype)).sum() for i in used).backward()
        return [torch.cat(pieces, dim=-1)] + [t.grad for t in leaves]

    want = run_split(causal_conv_reference, torch.float64)
    got = run_split(causal_conv_triton, torch.float32)
    for actual, expected in zip(got, want, strict=True):
        assert rel_error(actual, expected) < 1e-5


def test_reads_chunked_views_in_place():
    """q, k, v chunked out of one [B, T, 3C] projection: strided time, contiguous channels."""
    torch.manual_seed(1)
    qkv = torch.randn(2, 33, 3 * 16, device=DEVICE)
    q, k, v = qkv.chunk(3, dim=-1)
    h = torch.randn(16, 5, device=DEVICE)
    got = causal_conv_triton(k, h, x2=v, gate=q)
    want = causal_conv_reference(k.double(), h.double(), x2=v.double(), gate=q.double())
    assert rel_error(got, want) < 1e-6


def test_reference_without_documents_is_the_plain_conv():
    torch.manual_seed(2)
    u, h = torch.randn(2, 30, 6, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    assert rel_error(causal_conv_reference(u, h), direct_causal_conv(u, h)) < 1e-14


def test_documents_are_convolved_alone():
    torch.manual_seed(3)
    u, h = torch.randn(1, 12, 4, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    packed = causal_conv(u, h, positions=positions_of(doc_ids))
    assert torch.allclose(packed[:, :5], direct_causal_conv(u[:, :5], h))
    assert torch.allclose(packed[:, 5:], direct_causal_conv(u[:, 5:], h))


def test_bad_shapes_name_the_argument():
    x = torch.zeros(1, 4, 3)
    with pytest.raises(ValueError, match="gate"):
        causal_conv(x, torch.zeros(3, 2), gate=torch.zeros(1, 4, 2))
    with pytest.raises(ValueError, match=r"split must be 1 to 3 positive sizes adding up to C = 3"):
        causal_conv(x, torch.zeros(3, 2), split=[1, 1])
    with pytest.raises(ValueError, match="split"):
        causal_conv(x, torch.zeros(3, 2), split=[1, 1, 1, 0])
    with pytest.raises(ValueError, match="positions"):
        causal_conv(x, torch.zeros(3, 2), positions=torch.zeros(1, 5, dtype=torch.long))
