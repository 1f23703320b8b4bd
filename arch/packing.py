"""Packed rows: several documents per row, told apart by a per-token document index.

`doc_ids` is `[B, T]`; a new document starts at every row start and wherever the index
changes. Attention masks across documents directly. Kernels that take document boundaries
natively read them as `cu_seqlens` over the B * T flat tokens (retention, Mamba's SSD) or
as `document_positions` (the causal conv kernel: Hyena's featurizer and SE filter, Mamba's
short conv). Hyena's FFT filters use `per_document`: each document becomes its own
right-padded row, so convolutions and states start fresh at every boundary. Padding sits
after each document's last token and causal mixers never look forward, so it cannot change
real outputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: True where a document starts (each row start, each change of index)."""
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] int64: the steps since the start of each token's document (0 at a start)."""
    steps = torch.arange(doc_ids.shape[1], device=doc_ids.device)
    return steps - torch.where(document_starts(doc_ids), steps, 0).cummax(dim=1).values


def cu_seqlens(doc_ids: torch.Tensor) -> torch.Tensor:
    """int64 [S + 1]: where each of the S documents starts in the B * T flat tokens, then
    B * T (FlashAttention's convention). Finding the starts is one device sync."""
    starts = document_starts(doc_ids).flatten().nonzero().flatten()  # [S]
    end = torch.tensor([doc_ids.numel()], device=doc_ids.device)
    return torch.cat((starts, end))


def sequence_bounds(x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int]]:
    """[(first token, end)] of each sequence, as flat indices into x's B * T tokens ([B, T,
    ...]): its rows, or the cu_seqlens spans of one packed row. Reading cu_seqlens is one
    copy to the host."""
    B, T = x.shape[:2]
    if cu_seqlens is None:
        return [(b * T, (b + 1) * T) for b in range(B)]
    cu = [int(c) for c in cu_seqlens.tolist()]
    if cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu, cu[1:], strict=False)):
        shown = cu if len(cu) <= 6 else [*cu[:3], "...", *cu[-2:]]
        raise ValueError(f"cu_seqlens must rise from 0 to T = {T} (never "
                         f"falling), got {shown}")
    return list(zip(cu[:-1], cu[1:], strict=True))


def per_document(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                 doc_ids: torch.Tensor) -> torch.Tensor:
    """Apply `fn` ([N, L, C] -> [N, L, C']) to every document of x [B, T, C] separately."""
    B, T, C = x.shape
    starts = document_starts(doc_ids).flatten()  # [B*T]
    segment = starts.cumsum(0) - 1  # document number of each token
    first = starts.nonzero().flatten()  # flat index where each document starts
    offset = torch.arange(B * T, device=x.device) - first[segment]  # position in document
    n_docs, longest = first.numel(), int(offset.max()) + 1
    padded = x.new_zeros(n_docs, longest, C)  # [N, L, C]
    padded[segment, offset] = x.flatten(0, 1)
    y = fn(padded)  # [N, L, C']
    return y[segment, offset].view(B, T, -1)
