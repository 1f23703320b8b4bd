"""The on-disk format of prepared data: token shards, document indexes and the manifest.

    OUT/
      manifest.json                 written last, atomically: a directory without it is not data
      tokenizer.model               the sentencepiece model the tokens come from
      <source>/shard-00000.tokens   token ids, little-endian `dtype` (uint16 or uint32), no header
      <source>/shard-00000.index    uint64 [documents + 1]: offsets (in tokens) where documents
                                    start in the shard; index[0] = 0, index[-1] = token count

Every document ends with the tokenizer's EOS id. A source's token stream is its shards
concatenated in manifest order. The manifest names each file with its size and sha256, so a
truncated or bit-flipped shard is caught and named (`verify_shard`), and the dataset
fingerprint (`Manifest.fingerprint`) changes whenever any token could have changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "stripes-shards/1"
MANIFEST = "manifest.json"
INDEX_DTYPE = np.dtype("<u8")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32; always little-endian."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def shard_names(source: str, number: int) -> tuple[str, str]:
    """Relative paths of shard `number` of `source`: (tokens file, index file)."""
    stem = f"{source}/shard-{number:05d}"
    return f"{stem}.tokens", f"{stem}.index"


@dataclass
class ShardEntry:
    tokens_file: str  # relative to the data directory
    index_file: str
    documents: int
    tokens: int
    tokens_sha256: str
    index_sha256: str


@dataclass
class SourceEntry:
    name: str
    documents: int = 0
    tokens: int = 0
    text_bytes: int = 0  # UTF-8 bytes of the documents' text
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> lines skipped
    shards: list[ShardEntry] = field(default_factory=list)


@dataclass
class TokenizerEntry:
    file: str  # relative to the data directory
    sha256: str
    vocab_size: int
    eos_id: int


@dataclass
class Manifest:
    tokenizer: TokenizerEntry
    dtype: str  # numpy dtype string of the token files, e.g. "<u2"
    sources: list[SourceEntry]
    config: dict[str, Any] = field(default_factory=dict)  # the resolved prepare config
    format: str = FORMAT

    def source(self, name: str) -> SourceEntry:
        for entry in self.sources:
            if entry.name == name:
                return entry
        known = ", ".join(s.name for s in self.sources)
        raise KeyError(f"no source {name!r} in this dataset (sources: {known})")

    def fingerprint(self) -> str:
        """sha256 over what determines the token streams: tokenizer, dtype and every shard's
        checksum, in order. Independent of paths, timestamps and the prepare config."""
        digest = hashlib.sha256()
        digest.update(f"{self.format}|{self.tokenizer.sha256}|{self.dtype}".encode())
        for source in self.sources:
            digest.update(f"|{source.name}".encode())
            for shard in source.shards:
                digest.update(f"|{shard.tokens_sha256}|{shard.index_sha256}".encode())
        return digest.hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name beside `path`, fsync, then rename: never half-written."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(directory: Path, manifest: Manifest) -> None:
    text = json.dumps(dataclasses.asdict(manifest), indent=1, sort_keys=False)
    write_atomic(Path(directory) / MANIFEST, text.encode())


def read_manifest(directory: Path) -> Manifest:
    """Load `directory/manifest.json`; a missing or malformed one raises ValueError."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ValueError(f"{path}: no manifest (not a prepared data directory, or its "
                         "preparation did not finish)")
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT:
            raise ValueError(f"format {raw.get('format')!r}, expected {FORMAT!r}")
        return Manifest(
            tokenizer=TokenizerEntry(**raw["tokenizer"]),
            dtype=raw["dtype"],
            sources=[SourceEntry(**{**s, "shards": [ShardEntry(**h) for h in s["shards"]]})
                     for s in raw["sources"]],
            config=raw.get("config", {}),
            format=raw["format"],
        )
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: malformed manifest: {err}") from None


def verify_shard(directory: Path, shard: ShardEntry, dtype: np.dtype) -> list[str]:
    """Problems with one shard (empty when sound): sizes, checksums, index consistency."""
    problems = []
    tokens_path = Path(directory) / shard.tokens_file
    index_path = Path(directory) / shard.index_file
    for path, size in ((tokens_path, shard.tokens * dtype.itemsize),
                       (index_path, (shard.documents + 1) * INDEX_DTYPE.itemsize)):
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != size:
            problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {size}")
    if problems:
        return problems
    if sha256_file(tokens_path) != shard.tokens_sha256:
        problems.append(f"{tokens_path}: checksum mismatch (corrupted or replaced)")
    if sha256_file(index_path) != shard.index_sha256:
        problems.append(f"{index_path}: checksum mismatch (corrupted or replaced)")
    else:
        index = np.fromfile(index_path, dtype=INDEX_DTYPE).astype(np.int64)
        if index[0] != 0 or index[-1] != shard.tokens or np.any(np.diff(index) <= 0):
            problems.append(f"{index_path}: offsets are not increasing from 0 to {shard.tokens}")
    return problems
