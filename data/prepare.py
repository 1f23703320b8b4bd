"""`stripes prepare`: sources -> tokenizer -> token shards per source -> manifest.

Order of work, chosen so that an interrupted or failed run never leaves data that looks
complete: the tokenizer is obtained and checked against an existing manifest before anything
is written; then the old manifest is removed; shards are written under temporary names,
renamed, and vouched for by a recipe record (data/shards.py); the manifest comes last,
atomically. A re-run keeps every shard whose record matches and redoes the rest, so a killed
run is finished by the next one.

Documents are read in this process (in order), tokenized in `workers` processes
(data/encode.py, order kept) and cut into shards of at most `shard_tokens` tokens here, so the
shards do not depend on `workers`. A shard boundary depends on every document before it, so
shards are keyed by the source's whole input (files, sizes, mtimes), the tokenizer and the
shard size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stripes.core.config import ConfigError
from stripes.data.encode import Encoded, Encoder
from stripes.data.format import (
    MANIFEST,
    Manifest,
    SourceEntry,
    TokenizerEntry,
    read_manifest,
    token_dtype,
    write_atomic,
    write_manifest,
)
from stripes.data.prepare_config import PrepareConfig, ResolvedSource
from stripes.data.progress import PrepareProgress
from stripes.data.shards import ShardRecord, ShardWriter, remove_leftovers, reusable
from stripes.data.sources import Position, Record, read_source, strict_error
from stripes.data.tokenizer import RECIPE, Tokenizer, obtain, recipe_record

# Bump when reading or writing changes what a given input produces: old shards are redone.
PREPARE_VERSION = 1
BATCH_DOCUMENTS = 512  # documents per tokenizer task: large enough to amortise the
BATCH_CHARS = 1 << 20  # inter-process hop, small enough to keep every worker busy


@dataclass
class Batch:
    texts: list[str] = field(default_factory=list)
    positions: list[Position] = field(default_factory=list)
    skips: list[tuple[int, str]] = field(default_factory=list)  # (next document, reason)
    chars: int = 0


@dataclass
class SourceResult:
    entry: SourceEntry
    reused: int = 0  # shards kept from an earlier run
    written: int = 0


@dataclass
class PrepareResult:
    output: Path
    manifest: Manifest
    sources: list[SourceResult]
    seconds: float


def prepare(cfg: PrepareConfig, show_progress: bool = False) -> PrepareResult:
    began = time.perf_counter()
    sources = cfg.resolve()
    output = Path(cfg.output)
    tokenizer = obtain(cfg.tokenizer, sources, output, cfg.strict)
    _refuse_other_tokenizer(output, tokenizer, cfg.overwrite)
    output.mkdir(parents=True, exist_ok=True)
    (output / MANIFEST).unlink(missing_ok=True)
    _install_tokenizer(output, tokenizer)
    dtype = token_dtype(tokenizer.vocab_size)
    results = []
    with Encoder(tokenizer.model, tokenizer.eos_id, dtype, cfg.workers) as encoder, \
            PrepareProgress(show_progress) as progress:
        for source in sources:
            job = _SourceJob(cfg, source, output, tokenizer, dtype, encoder, progress)
            results.append(job.run())
    manifest = Manifest(
        tokenizer=TokenizerEntry("tokenizer.model", tokenizer.sha256, tokenizer.vocab_size,
                                 tokenizer.eos_id),
        dtype=dtype.str,
        sources=[r.entry for r in results],
        config={**dataclasses.asdict(cfg),
                "resolved_files": {s.name: [str(p) for p in s.files] for s in sources}},
    )
    write_manifest(output, manifest)
    return PrepareResult(output, manifest, results, time.perf_counter() - began)


def _refuse_other_tokenizer(output: Path, tokenizer: Tokenizer, overwrite: bool) -> None:
    """A complete dataset made with another tokenizer is not replaced unless asked to."""
    if overwrite or not (output / MANIFEST).exists():
        return
    allowed = "true to replace the dataset there, or another data.output"
    try:
        previous = read_manifest(output).tokenizer.sha256
    except ValueError as err:
        raise ConfigError("data.overwrite", overwrite, allowed, str(err)) from None
    if previous != tokenizer.sha256:
        raise ConfigError("data.overwrite", overwrite, allowed,
                          f"{output} holds a dataset made with another tokenizer (sha256 "
                          f"{previous[:12]}..., this run's is {tokenizer.sha256[:12]}...)")


def _install_tokenizer(output: Path, tokenizer: Tokenizer) -> None:
    path = output / "tokenizer.model"
    if not path.is_file() or path.read_bytes() != tokenizer.model:
        write_atomic(path, tokenizer.model)
    if tokenizer.recipe is None:
        (output / RECIPE).unlink(missing_ok=True)
    else:
        write_atomic(output / RECIPE, recipe_record(tokenizer))


def source_key(cfg: PrepareConfig, source: ResolvedSource, tokenizer: Tokenizer,
               dtype: np.dtype) -> str:
    """Digest of everything a shard of `source` depends on. Input files are identified by
    path, size and modification time (not content, which would mean reading them all)."""
    files = []
    for path in source.files:
        stat = path.stat()
        files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns, source.formats[path]])
    recipe = {"version": PREPARE_VERSION, "tokenizer": tokenizer.sha256, "dtype": dtype.str,
              "shard_tokens": cfg.shard_tokens, "text_field": source.text_field,
              "files": files}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


class _SourceJob:
    """Prepares one source: keeps the reusable shards, writes the others."""

    def __init__(self, cfg: PrepareConfig, source: ResolvedSource, output: Path,
                 tokenizer: Tokenizer, dtype: np.dtype, encoder: Encoder,
                 progress: PrepareProgress) -> None:
        self.cfg, self.source, self.output, self.dtype = cfg, source, output, dtype
        self.encoder, self.progress = encoder, progress
        self.key = source_key(cfg, source, tokenizer, dtype)
        self.result = SourceResult(SourceEntry(source.name))
        self.skipped: Counter[str] = Counter()

    def run(self) -> SourceResult:
        (self.output / self.source.name).mkdir(exist_ok=True)
        self.progress.start(self.source.name)
        number, position = 0, Position(0, 0)
        end = Position(len(self.source.files), 0)
        while position != end:
            record = reusable(self.output, self.source.name, number, self.key, position,
                              self.dtype)
            if record is None:
                number, position = self._write_from(number, position)
                continue
            self._count(record)
            self.result.reused += 1
            self.progress.advance(record.entry.documents, record.entry.tokens)
            number, position = number + 1, record.end
        remove_leftovers(self.output, self.source.name, keep=number)
        self.result.entry.skipped = dict(sorted(self.skipped.items()))
        return self.result

    def _count(self, record: ShardRecord) -> None:
        entry = self.result.entry
        entry.shards.append(record.entry)
        entry.documents += record.entry.documents
        entry.tokens += record.entry.tokens
        entry.text_bytes += record.text_bytes
        self.skipped.update(record.skipped)

    def _write_from(self, number: int, position: Position) -> tuple[int, Position]:
        """Tokenize from `position` and write shards `number`, `number + 1`, ... until the
        input ends or the next shard on disk is reusable; return where that leaves us."""
        records = read_source(self.source.files, self.source.formats, self.source.text_field,
                              position)
        stream = self.encoder.map(_batches(records, self.cfg.strict), lambda b: b.texts)
        writer: ShardWriter | None = None
        orphans: Counter[str] = Counter()  # bad records read while no shard is open
        first_start: Position | None = position
        try:
            with closing(stream):
                for batch, encoded in stream:
                    skips = defaultdict(list)
                    for index, reason in batch.skips:
                        skips[index].append(reason)
                    offsets = np.concatenate([[0], np.cumsum(encoded.lengths)])
                    i = 0
                    while i < len(batch.texts):
                        (writer.skipped if writer else orphans).update(skips.pop(i, ()))
                        if writer and writer.tokens + encoded.lengths[i] > self.cfg.shard_tokens:
                            self._finish(writer, batch.positions[i])
                            writer, number = None, number + 1
                            if reusable(self.output, self.source.name, number, self.key,
                                        batch.positions[i], self.dtype):
                                return number, batch.positions[i]
                        if writer is None:
                            # the first shard of this run starts where reading started (bad
                            # records before its first document are its own); later ones at
                            # their first document, where the shard before them ended
                            start = batch.positions[i] if first_start is None else first_start
                            writer = ShardWriter(self.output, self.source.name, number,
                                                 start, self.dtype)
                            first_start = None
                            writer.skipped.update(orphans)
                            orphans.clear()
                        i = self._fill(writer, batch, encoded, offsets, i, skips)
                    for reasons in skips.values():  # bad records after the last document
                        (writer.skipped if writer else orphans).update(reasons)
            if writer is not None:
                self._finish(writer, Position(len(self.source.files), 0))
                writer, number = None, number + 1
            self.skipped.update(orphans)
            return number, Position(len(self.source.files), 0)
        finally:
            if writer is not None:
                writer.abort()

    def _fill(self, writer: ShardWriter, batch: Batch, encoded: Encoded, offsets: np.ndarray,
              i: int, skips: dict[int, list[str]]) -> int:
        """Add documents i, i+1, ... of the batch while they fit; return the first left."""
        room = self.cfg.shard_tokens - writer.tokens
        fit = int(np.searchsorted(offsets[i + 1:] - offsets[i], room, side="right"))
        stop = i + max(fit, 1)  # a document longer than a shard gets a shard of its own
        for j in range(i + 1, stop):
            writer.skipped.update(skips.pop(j, ()))
        writer.add(encoded.tokens[offsets[i]:offsets[stop]], encoded.lengths[i:stop],
                   int(encoded.text_bytes[i:stop].sum()))
        self.progress.advance(stop - i, int(offsets[stop] - offsets[i]))
        return stop

    def _finish(self, writer: ShardWriter, end: Position) -> None:
        self._count(writer.finish(self.key, end))
        self.result.written += 1


def _batches(records: Iterator[Record], strict: bool) -> Iterator[Batch]:
    """Group documents into tokenizer tasks; bad records ride along, placed before the
    document that follows them. The last batch may hold bad records only."""
    batch = Batch()
    for record in records:
        if record.skip is not None:
            if strict:
                raise strict_error(record)
            batch.skips.append((len(batch.texts), record.skip))
            continue
        batch.texts.append(record.text)
        batch.positions.append(record.position)
        batch.chars += len(record.text)
        if len(batch.texts) >= BATCH_DOCUMENTS or batch.chars >= BATCH_CHARS:
            yield batch
            batch = Batch()
    yield batch
