"""Block-Toeplitz gated conv (Triton's interpreter on CPU) against the float64 reference:
output and every gradient, for one to four Toeplitz pieces a block, channel tiles of 16 to
64, packed documents, filters longer than the sequence and strided views."""

from __future__ import annotations

import pytest
import torch

from stripes.arch.packing import document_positions
from stripes.kernels.toeplitz_conv import fits, kernel, toeplitz_gated_conv
from stripes.kernels.toeplitz_conv.kernel import S, channel_block, pieces, toeplitz_conv_triton
from stripes.kernels.toeplitz_conv.reference import toeplitz_gated_conv as reference

from numerics import poison_empty, rel_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    poison_empty(monkeypatch)


def forward_backward(fn, tensors, positions, grad):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves, positions)
    out.backward(grad.to(out.dtype))
    return [out] + [t.grad for t in leaves]


@pytest.mark.parametrize("B, T, C, G, L, docs", [
    (2, 150, 32, 2, 130, False),  # four pieces, a last block cut short, two groups
    (1, 200, 64, 1, 70, True),    # three pieces, a 64-channel tile, packed documents
    (2, 40, 96, 3, 5, False),     # one block (piece 1 reads only before step 0), 32 channels
    (1, 70, 16, 1, 1, False),     # one piece: tap 0 alone
    (1, 40, 16, 1, 130, True),    # more taps than steps
    (1, 70, 32, 1, 200, False),   # more taps than steps, two blocks side by side
    (1, 100, 128, 1, 70, False),  # two 64-channel tiles in one group
    (2, 90, 96, 2, 20, True),     # three 16-channel tiles in each 48-channel group
])
def test_float32_matches_float64_reference(B, T, C, G, L, docs):
    g = torch.Generator().manual_seed(T + C + L)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    tensors = [rand(B, T, C), rand(B, T, C), rand(B, T, C), rand(G, L)]
    doc_ids = torch.randint(0, 3, (B, T), generator=g).sort(dim=1).values
    positions = document_positions(doc_ids) if docs else None
    grad = rand(B, T, C)
    want = forward_backward(reference, tensors, positions, grad)
    got = forward_backward(toeplitz_conv_triton, [t.to(DEVICE, torch.float32) for t in tensors],
                           None if positions is None else positions.to(DEVICE),
                           grad.to(DEVICE, torch.float32))
    for actual, expected in zip(got, want, strict=True):
        assert actual.dtype == torch.float32 and torch.isfinite(actual).all()
        assert rel_error(actual, expected) < 1e-5


def test_filter_gradient_sums_spans_and_documents_starting_at_a_block_edge(monkeypatch):
    """Four blocks a span (the spans' partials and their layout), documents starting at
    steps 64 and 65, and the same bits from a second backward."""
    monkeypatch.setattr(kernel, "SPAN", 4)
    g = torch.Generator().manual_seed(6)
    B, T, C, G, L = 2, 600, 32, 2, 90  # 10 blocks: spans of 4, 4 and 2
    tensors = [torch.randn(B, T, C, generator=g, dtype=torch.float64) for _ in range(3)]
    tensors.append(torch.randn(G, L, generator=g, dtype=torch.float64))
    doc_ids = torch.zeros(B, T, dtype=torch.long)
    doc_ids[0, 64:], doc_ids[1, 65:], doc_ids[1, 400:] = 1, 1, 2
    grad = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    for positions in (None, document_positions(doc_ids)):
        want = forward_backward(reference, tensors, positions, grad)
        args = [t.to(DEVICE, torch.float32) for t in tensors], positions, grad.float()
        got = forward_backward(toeplitz_conv_triton, *args)
        for actual, expected in zip(got, want, strict=True):
            assert rel_error(actual, expected) < 1e-5
        assert torch.equal(forward_backward(toeplitz_conv_triton, *args)[4], got[4])


def test_reads_chunked_views_in_place():
    """q, k, v chunked out of one [B, T, 3C] projection: strided time, contiguous channels."""
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 70, 3 * 32, device=DEVICE).chunk(3, dim=-1)
    h = torch.randn(2, 9, device=DEVICE)
    got = toeplitz_conv_triton(q, k, v, h)
    want = reference(q.double(), k.double(), v.double(), h.double())
    assert rel_error(got, want) < 1e-6


def test_reference_is_the_per_channel_conv_of_the_spread_filter():
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 20, 8, dtype=torch.float64) for _ in range(3))
    h = torch.randn(2, 5, dtype=torch.float64)
    spread = h.repeat_interleave(4, dim=0)  # channels 0-3 use filter 0, 4-7 filter 1
    y = torch.stack([torch.nn.functional.pad(k * v, (0, 0, j, 0))[:, :20] * spread[:, j]
                     for j in range(5)]).sum(0)
    assert rel_error(reference(q, k, v, h), q * y) < 1e-14


def test_pieces_cover_every_tap():
    """Piece m holds taps m S - (S - 1) .. m S + S - 1: every tap below L is held, each
    piece holds one, and the next piece would hold none."""
    for taps in (1, 2, S - 1, S, S + 1, 2 * S, 2 * S + 1, 512):
        nm = pieces(taps)
        assert (nm - 1) * S + S - 1 >= taps - 1
        assert (nm - 1) * S - (S - 1) <= taps - 1 < nm * S - (S - 1)


def test_groups_the_matmuls_cannot_take_are_refused_or_routed_to_the_reference():
    assert channel_block(16) == 16 and channel_block(96) == 32 and channel_block(128) == 64
    assert fits(2048, 128) and not fits(2048, 2048) and not fits(24, 1)
    with pytest.raises(ValueError, match="multiple of 16"):
        toeplitz_conv_triton(*(torch.zeros(1, 4, 24) for _ in range(3)), torch.zeros(3, 2))
    q = torch.randn(1, 6, 24, dtype=torch.float64)  # 8 channels a group: the reference runs
    out = toeplitz_gated_conv(q, q, q, torch.ones(3, 1, dtype=torch.float64))
    assert torch.allclose(out, q ** 3)


def test_bad_shapes_name_the_argument():
    x = torch.zeros(1, 4, 32)
    with pytest.raises(ValueError, match="h must be"):
        toeplitz_gated_conv(x, x, x, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="positions"):
        toeplitz_gated_conv(x, x, x, torch.zeros(2, 2), torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="q, k, v"):
        toeplitz_gated_conv(x, torch.zeros(1, 4, 16), x, torch.zeros(2, 2))


@pytest.mark.parametrize("C, G, docs", [(64, 1, False), (64, 1, True), (32, 2, False)])
def test_bfloat16_activations_match_float64_reference(C, G, docs):
    """bf16 q, k, v (what training feeds it; tf32 matmuls on a GPU) with a float32 filter;
    16-channel groups run four blocks side by side."""
    g = torch.Generator().manual_seed(5)
    B, T, L = 1, 130, 100
    q, k, v = (torch.randn(B, T, C, generator=g).to(torch.bfloat16) for _ in range(3))
    h = torch.randn(G, L, generator=g) / L ** 0.5
    doc_ids = torch.randint(0, 3, (B, T), generator=g).sort(dim=1).values
    positions = document_positions(doc_ids) if docs else None
    grad = torch.randn(B, T, C, generator=g)
    want = forward_backward(reference, [t.double() for t in (q, k, v, h)], positions,
                            grad.double())
    got = forward_backward(toeplitz_conv_triton, [t.to(DEVICE) for t in (q, k, v, h)],
                           None if positions is None else positions.to(DEVICE),
                           grad.to(DEVICE))
    for actual, expected in zip(got, want, strict=True):
        assert torch.isfinite(actual).all()
        assert rel_error(actual, expected) < 1e-2
