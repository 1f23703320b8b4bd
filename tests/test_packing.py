"""per_document runs a function on each packed document as if it were alone."""

from __future__ import annotations

import torch

from stripes.arch.packing import cu_seqlens, document_starts, per_document


def test_document_starts():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1], [3, 3, 3, 3, 4]])
    starts = document_starts(doc_ids)
    assert starts.tolist() == [[True, False, True, False, False],
                               [True, False, False, False, True]]


def test_cu_seqlens_spans_flat_tokens():
    """A document starts at every row start too, even when the index carries over."""
    doc_ids = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 4]])
    assert cu_seqlens(doc_ids).tolist() == [0, 2, 5, 9, 10]
    assert cu_seqlens(torch.zeros(3, 4, dtype=torch.long)).tolist() == [0, 4, 8, 12]


def test_per_document_equals_separate_calls():
    x = torch.randn(2, 9, 3)
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [2, 2, 2, 2, 2, 2, 2, 2, 7]])
    prefix_sum = lambda t: t.cumsum(1)  # causal: output t sees inputs 0..t of its row
    y = per_document(prefix_sum, x, doc_ids)
    assert torch.allclose(y[0, :3], x[0, :3].cumsum(0))
    assert torch.allclose(y[0, 3:], x[0, 3:].cumsum(0))
    assert torch.allclose(y[1, :8], x[1, :8].cumsum(0))
    assert torch.allclose(y[1, 8], x[1, 8])
