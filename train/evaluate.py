"""Held-out evaluation: mean next-token loss per source on windows training never reads.

    data: {heldout: 0.01, ...}  # the last 1% of each source's windows are never trained on
    eval:
      every_steps: 100          # 0: never
      samples: 64               # windows per source (fewer if fewer are held out)
      sources: null             # null: the held-out tail of data.sources; or a list of
                                # {path, source, weight} of separately prepared data

Each source's evaluation set is fixed for the whole run (its first `samples` held-out windows in
stream order), so every evaluation reads the same tokens and the curve compares point to point.
The reported `loss` is the sources' losses averaged with the mixture weights, so it estimates
the training mixture's held-out loss; each source's own loss is reported beside it.

Windows are dealt to ranks round-robin and every rank runs the same number of micro-batches
(padding rows weigh zero): FSDP all-gathers inside each forward, so a rank that stopped early
would leave the others waiting. Token-loss sums and counts are all-reduced, so the numbers do
not depend on the world size.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from stripes.arch.packing import document_positions
from stripes.core.config import ConfigError
from stripes.data.loader import LoaderConfig, SourceWeight, TokenDataset


@dataclass
class EvalSet:
    dataset: TokenDataset
    names: list[str]  # one per source, unique
    weights: list[float]  # mixture weights, for the averaged loss
    streams: np.ndarray  # [n] stream of each evaluation window
    windows: np.ndarray  # [n] window index within its stream


def build_eval_set(train_data: TokenDataset, sources: list[SourceWeight] | None,
                   samples: int) -> EvalSet:
    """The held-out tail of the training streams (`sources` None) or the whole of `sources`."""
    if sources is None:
        return _first_windows(train_data, [(s.first_heldout, s.n_windows)
                                           for s in train_data.streams], samples)
    cfg = LoaderConfig(seq_len=train_data.seq_len, sources=sources,
                       verify=train_data.cfg.verify)
    dataset = TokenDataset(cfg, prefix="eval")
    if dataset.tokenizer.sha256 != train_data.tokenizer.sha256:
        raise ConfigError("eval.sources", sources[0].path, "data prepared with the training "
                          "data's tokenizer", "its tokenizer.model differs")
    return whole_sources(dataset, samples)


def whole_sources(dataset: TokenDataset, samples: int) -> EvalSet:
    """The first `samples` windows of each of `dataset`'s sources, held out or not."""
    return _first_windows(dataset, [(0, s.n_windows) for s in dataset.streams], samples)


def _first_windows(dataset: TokenDataset, ranges: list[tuple[int, int]],
                   samples: int) -> EvalSet:
    streams, windows = [], []
    for i, (lo, hi) in enumerate(ranges):
        count = min(samples, hi - lo)
        streams.append(np.full(count, i, dtype=np.int64))
        windows.append(np.arange(lo, lo + count, dtype=np.int64))
    entries = dataset.cfg.sources
    return EvalSet(dataset, _unique_names(entries), [float(e.weight) for e in entries],
                   np.concatenate(streams), np.concatenate(windows))


def evaluate(model: nn.Module, eval_set: EvalSet, micro_batch: int, rank: int,
             world_size: int, device: torch.device, autocast: AbstractContextManager,
             document_masking: bool, by_position: bool = False) -> dict[str, Any]:
    """{"loss": weighted mean, <source name>: mean loss, ...} over the evaluation windows, and
    with `by_position` also "by_position": {"0-63": mean loss, "64-127": ..., up to the
    sequence length} (position_edges), from the same forward passes. The position is the
    token's place in its document with document masking, else in its window: long-context
    training should lower the later buckets. Every rank calls it (collectives inside) and
    gets the same numbers."""
    sums = loss_sums(model, eval_set, micro_batch, rank, world_size, device, autocast,
                     document_masking, by_position)
    edges = position_edges(eval_set.dataset.seq_len)
    if dist.is_initialized():
        dist.all_reduce(sums)
    loss_sum, token_count = sums.tolist()
    n = len(eval_set.names)
    # A source without a full window has no tokens to score: NaN, not a crash.
    per_source = [total / count if count else math.nan
                  for total, count in zip(loss_sum[:n], token_count[:n], strict=True)]
    weights = eval_set.weights
    result: dict[str, Any] = {
        "loss": sum(w * x for w, x in zip(weights, per_source, strict=True)) / sum(weights)}
    result.update(zip(eval_set.names, per_source, strict=True))
    if by_position:
        result["by_position"] = {
            f"{lo}-{hi - 1}": total / count for lo, hi, total, count in
            zip(edges[:-1], edges[1:], loss_sum[n:], token_count[n:], strict=True) if count}
    return result


def loss_sums(model: nn.Module, eval_set: EvalSet, micro_batch: int, rank: int,
              world_size: int, device: torch.device, autocast: AbstractContextManager,
              document_masking: bool, by_position: bool = False) -> torch.Tensor:
    """This rank's float64 [2, n]: row 0 the token-loss sums, row 1 the token counts, per
    source and then, with `by_position`, per position bucket (position_edges)."""
    edges = position_edges(eval_set.dataset.seq_len)
    bounds = torch.tensor(edges[1:-1], device=device)
    n_sources = len(eval_set.names)
    sums = torch.zeros(2, n_sources + (len(edges) - 1) * by_position, dtype=torch.float64,
                       device=device)
    for losses, weight, source, positions in window_losses(model, eval_set, micro_batch, rank,
                                                           world_size, device, autocast,
                                                           document_masking):
        _add(sums, source, losses, weight)
        if by_position:
            bucket = torch.bucketize(positions.contiguous(), bounds, right=True)
            _add(sums, n_sources + bucket, losses, weight)
    return sums


def _add(sums: torch.Tensor, index: torch.Tensor, losses: torch.Tensor,
         weight: torch.Tensor) -> None:
    """sums[0, index] += weighted token losses, sums[1, index] += token weights; `index` is
    one per row [b] or one per token [b, T]."""
    index = index[:, None].expand_as(losses) if index.dim() == 1 else index
    weights = weight[:, None].expand_as(losses)
    sums[0].index_add_(0, index.flatten(), (losses * weights).flatten())
    sums[1].index_add_(0, index.flatten(), weights.flatten())


def position_edges(seq_len: int, first: int = 64) -> list[int]:
    """Bucket edges over context positions: [0, first, 2 first, 4 first, ..., seq_len]."""
    edges = [0]
    while edges[-1] < seq_len:
        edges.append(min(seq_len, max(first, 2 * edges[-1])))
    return edges


@torch.no_grad()
def window_losses(model: nn.Module, eval_set: EvalSet, micro_batch: int, rank: int,
                  world_size: int, device: torch.device, autocast: AbstractContextManager,
                  document_masking: bool):
    """Per micro-batch of this rank's windows: (token losses [b, T] float64, row weight [b]
    float64 (0 for padding rows), source [b], context position of each token [b, T])."""
    mine = np.arange(rank, len(eval_set.windows), world_size)  # round-robin over ranks
    per_rank = math.ceil(len(eval_set.windows) / world_size)
    rows = np.resize(mine, per_rank) if len(mine) else np.zeros(per_rank, dtype=np.int64)
    real = np.arange(per_rank) < len(mine)  # np.resize repeats rows to pad; they weigh 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, per_rank, micro_batch):
            chunk = rows[start:start + micro_batch]
            tokens, doc_ids = eval_set.dataset.read_windows(eval_set.streams[chunk],
                                                            eval_set.windows[chunk])
            tokens_t = torch.from_numpy(tokens).to(device)
            docs = torch.from_numpy(doc_ids).to(device)
            with torch.no_grad(), autocast:
                logits = model(tokens_t[:, :-1], docs if document_masking else None)
            losses = token_losses(logits, tokens_t[:, 1:])
            positions = (document_positions(docs) if document_masking else
                         torch.arange(losses.shape[1], device=device).expand_as(docs))
            weight = torch.from_numpy(real[start:start + micro_batch]).to(device).double()
            yield losses, weight, torch.from_numpy(eval_set.streams[chunk]).to(device), positions
    finally:
        model.train(was_training)


def token_losses(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 4096
                 ) -> torch.Tensor:
    """Cross-entropy of each token, float64 [B, T], computed `chunk` positions at a time: at
    long context a float32 copy of all the logits would dwarf the model (42 GB for one
    sequence of 128k at a 32k vocabulary)."""
    return torch.cat([F.cross_entropy(logits[:, i:i + chunk].flatten(0, 1).float(),
                                      targets[:, i:i + chunk].flatten(), reduction="none")
                      .view(len(targets), -1) for i in range(0, targets.shape[1], chunk)],
                     dim=1).double()


def _unique_names(entries: list[SourceWeight]) -> list[str]:
    """`source`, else the directory's name; repeated names get #2, #3, ..."""
    names: list[str] = []
    for entry in entries:
        base = entry.source or Path(entry.path).name
        name, k = base, 1
        while name in names or name == "loss":
            k += 1
            name = f"{base}#{k}"
        names.append(name)
    return names
