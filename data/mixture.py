"""Which source each global sample comes from: a blocked, shuffled, exactly-proportioned schedule.

Global samples are cut into blocks of `block` samples. In every block source s owns a fixed
number of slots, counts[s], from largest-remainder rounding of block * w_s / sum(w): so over
any whole number of blocks the mixture is exact, and inside a block it is off by at most one
sample per source. The slots are dealt to positions by a seeded permutation of the block
(a fresh one per block), so the sources interleave without a fixed pattern.

Global sample g sits in block b = g // block at position g % block. Its source is the owner
of the slot at that position, and its index within the source, j = b * counts[s] + (the
number of s's slots earlier in the block), counts up 0, 1, 2, ... along the global order, so
the first n_s samples drawn from s are exactly one epoch of s. Nothing is replayed: a block
costs O(block) to lay out, once, and the last few layouts are cached.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from stripes.data.permute import permute, round_keys

_CACHED_BLOCKS = 4  # a batch rarely spans more than two blocks; ranks read neighbouring ones


def largest_remainder(weights: Sequence[float], total: int) -> np.ndarray:
    """Integer counts summing to `total`, proportional to `weights`, each within 1 of exact.

    Ties in the remainders go to the earlier source, so the result is deterministic."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    order = sorted(range(len(w)), key=lambda s: (-(exact[s] - counts[s]), s))
    counts[order[:short]] += 1
    return counts


class Schedule:
    """Maps global sample indices to (source, index within that source's endless stream)."""

    def __init__(self, weights: Sequence[float], seed: int, block: int) -> None:
        self.block = block
        self.seed = seed
        self.counts = largest_remainder(weights, block)
        self._owner = np.repeat(np.arange(len(self.counts)), self.counts)  # slot -> source
        self._first = np.concatenate([[0], np.cumsum(self.counts)[:-1]])  # first slot of s
        self._layouts: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _layout(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, j) of every position in block b, for a block-sized array of positions."""
        if b in self._layouts:
            self._layouts.move_to_end(b)
            return self._layouts[b]
        slots = permute(np.arange(self.block), self.block, round_keys("mixture", self.seed, b))
        source = self._owner[slots]
        # Rank of each position among its source's positions, in position order: a stable sort
        # by source lists every source's positions in order, contiguous from _first[s].
        order = np.argsort(source, kind="stable")
        rank = np.empty(self.block, dtype=np.int64)
        rank[order] = np.arange(self.block) - self._first[source[order]]
        layout = (source, b * self.counts[source] + rank)
        self._layouts[b] = layout
        if len(self._layouts) > _CACHED_BLOCKS:
            self._layouts.popitem(last=False)
        return layout

    def locate(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, j) as int64 arrays for global samples start, start + 1, ..., + count - 1."""
        sources, js = [], []
        g, end = start, start + count
        while g < end:
            b, pos = divmod(g, self.block)
            take = min(end - g, self.block - pos)
            source, j = self._layout(b)
            sources.append(source[pos:pos + take])
            js.append(j[pos:pos + take])
            g += take
        if not sources:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(sources), np.concatenate(js)
