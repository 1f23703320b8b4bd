"""Writing shards so that a killed run leaves nothing that looks complete, and knowing which
shards a re-run may keep.

A shard is written under temporary names and renamed; then a recipe record is written beside
it (`shard-00000.recipe.json`, atomically): the key of what produced it, the input range it
covers, its counts and its checksums. A shard is reusable when its record has the key the
current run would use, starts where the current run is, and its files still match the
checksums. Anything else (no record, an old key, a truncated or bit-flipped file) is redone.
The loader never reads recipe records: the manifest alone describes the data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np

from stripes.data.format import INDEX_DTYPE, ShardEntry, shard_names, verify_shard, write_atomic
from stripes.data.sources import Position

RECIPE_SUFFIX = ".recipe.json"


def recipe_path(directory: Path, source: str, number: int) -> Path:
    tokens_file, _ = shard_names(source, number)
    return Path(directory) / tokens_file.replace(".tokens", RECIPE_SUFFIX)


@dataclasses.dataclass
class ShardRecord:
    """What produced one shard and what it holds; stored as its recipe record."""

    key: str  # digest of tokenizer, dtype, shard size, input files (see prepare.source_key)
    number: int
    start: Position  # first input record the shard covers
    end: Position  # first input record it does not cover (the next shard's start)
    text_bytes: int
    skipped: dict[str, int]  # bad records inside [start, end)
    entry: ShardEntry

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), indent=1).encode()

    @classmethod
    def from_json(cls, text: str) -> ShardRecord:
        raw = json.loads(text)
        return cls(key=raw["key"], number=raw["number"], start=Position(*raw["start"]),
                   end=Position(*raw["end"]), text_bytes=raw["text_bytes"],
                   skipped=raw["skipped"], entry=ShardEntry(**raw["entry"]))


def reusable(directory: Path, source: str, number: int, key: str, start: Position,
             dtype: np.dtype) -> ShardRecord | None:
    """The record of shard `number` when it can be kept as is, else None."""
    try:
        record = ShardRecord.from_json(recipe_path(directory, source, number).read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if record.key != key or record.number != number or record.start != start:
        return None
    if verify_shard(directory, record.entry, dtype):
        return None
    return record


class ShardWriter:
    """One shard being written: tokens stream to a temporary file, hashed on the way."""

    def __init__(self, directory: Path, source: str, number: int, start: Position,
                 dtype: np.dtype) -> None:
        self.directory, self.source, self.number, self.start = directory, source, number, start
        self.dtype = dtype
        self.names = shard_names(source, number)
        self.tokens_path, self.index_path = (directory / name for name in self.names)
        self._tmp = self.tokens_path.with_name(f".{self.tokens_path.name}.tmp-{os.getpid()}")
        self._file = open(self._tmp, "wb")  # noqa: SIM115 (closed by finish or abort)
        self._hash = hashlib.sha256()
        self.offsets = [0]
        self.text_bytes = 0
        self.skipped: Counter[str] = Counter()

    @property
    def tokens(self) -> int:
        return self.offsets[-1]

    @property
    def documents(self) -> int:
        return len(self.offsets) - 1

    def add(self, tokens: np.ndarray, lengths: np.ndarray, text_bytes: int) -> None:
        """Append whole documents: `tokens` concatenated, `lengths` tokens each."""
        data = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        self._file.write(data)
        self._hash.update(data)
        self.offsets.extend((self.tokens + np.cumsum(lengths)).tolist())
        self.text_bytes += text_bytes

    def finish(self, key: str, end: Position) -> ShardRecord:
        """Close, rename into place, then write the recipe record that vouches for it."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.tokens_path)
        index = np.asarray(self.offsets, dtype=INDEX_DTYPE).tobytes()
        write_atomic(self.index_path, index)
        entry = ShardEntry(
            tokens_file=self.names[0], index_file=self.names[1],
            documents=self.documents, tokens=self.tokens,
            tokens_sha256=self._hash.hexdigest(),
            index_sha256=hashlib.sha256(index).hexdigest(),
        )
        record = ShardRecord(key, self.number, self.start, end, self.text_bytes,
                             dict(sorted(self.skipped.items())), entry)
        write_atomic(recipe_path(self.directory, self.source, self.number), record.to_json())
        return record

    def abort(self) -> None:
        """Drop the unfinished shard (on an error or an interrupt)."""
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)


def remove_leftovers(directory: Path, source: str, keep: int) -> None:
    """Delete temporary files (a killed run's), and shards numbered `keep` or more (from an
    older run that made more), each shard's record first so that none looks complete."""
    folder = Path(directory) / source
    for tmp in folder.glob(".*.tmp-*"):
        tmp.unlink()
    stale = sorted({int(m.group(1)) for p in folder.iterdir()
                    if (m := _SHARD_FILE.fullmatch(p.name)) and int(m.group(1)) >= keep})
    for number in stale:
        recipe_path(directory, source, number).unlink(missing_ok=True)
        for name in shard_names(source, number):
            (Path(directory) / name).unlink(missing_ok=True)


_SHARD_FILE = re.compile(r"shard-(\d+)\.(tokens|index|recipe\.json)")
