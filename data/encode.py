"""Tokenize batches of documents in worker processes, in order, with bounded memory.

`Encoder.map(batches)` yields `(batch, Encoded)` in the order the batches came, whatever the
number of workers, so the shards that follow are byte-identical for any `workers`. At most
`2 * workers` batches are in flight: the reader cannot run ahead of the tokenizers and fill
memory (multiprocessing's `Pool.imap` would, as it drains its input eagerly). With one
worker the same function runs in this process, without a pool.

Measured against `datasets.map` on 50 MB of the demo corpus (bench/tokenize.py, 2 cores):
about 7 MB/s with 2 workers here against 2.8 MB/s there, which converts to Arrow and writes a
cache first.

Workers are started with `spawn`: a forked child of a process that has started threads (torch
and logging do) can inherit a held lock and hang.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import sentencepiece as spm


@dataclass
class Encoded:
    tokens: np.ndarray  # every document's ids followed by EOS, concatenated, in `dtype`
    lengths: np.ndarray  # int64 [documents]: tokens per document, EOS included
    text_bytes: np.ndarray  # int64 [documents]: UTF-8 bytes of each document's text


class Encoder:
    def __init__(self, model: bytes, eos_id: int, dtype: np.dtype, workers: int) -> None:
        self.workers = workers
        self._args = (model, eos_id, dtype.str)
        self._pool = None
        if workers > 1:
            context = multiprocessing.get_context("spawn")
            self._pool = context.Pool(workers, initializer=_start, initargs=self._args)
        else:
            _start(*self._args)

    def map(self, batches: Iterable[Any], texts=lambda batch: batch) -> Iterator[tuple]:
        """(batch, Encoded of texts(batch)) for each batch, in input order."""
        if self._pool is None:
            for batch in batches:
                yield batch, encode(texts(batch))
            return
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, self._pool.apply_async(encode, (texts(batch),))))
            if len(pending) >= 2 * self.workers:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()

    def close(self) -> None:
        """Stop the workers now (results still queued are dropped)."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_worker: dict = {}  # this process's tokenizer, set by _start


def _start(model: bytes, eos_id: int, dtype: str) -> None:
    if multiprocessing.parent_process() is not None:
        # Ctrl-C reaches every process of the terminal's group; the parent alone handles it
        # (it drops the unfinished shard and stops the pool), so workers ignore it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker.update(processor=spm.SentencePieceProcessor(model_proto=model), eos=eos_id,
                   dtype=np.dtype(dtype))


def encode(texts: list[str]) -> Encoded:
    """Token ids of each text plus EOS, flattened (runs in a worker)."""
    # One thread: the parallelism is across processes, and threads here would oversubscribe.
    ids = _worker["processor"].encode(texts, num_threads=1)
    eos = _worker["eos"]
    flat: list[int] = []
    for piece_ids in ids:
        flat.extend(piece_ids)
        flat.append(eos)
    return Encoded(
        tokens=np.array(flat, dtype=_worker["dtype"]),
        lengths=np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids)),
        text_bytes=np.fromiter((len(t.encode("utf-8")) for t in texts), dtype=np.int64,
                               count=len(texts)),
    )
