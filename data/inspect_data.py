"""`stripes data verify|stats`: check a prepared directory against its manifest; count it.

`verify` re-reads every file the manifest names (sizes, sha256, index offsets, and that the
per-source totals add up) and names each bad one, so a truncated copy or a flipped bit is
caught before a training run reads it. `stats` reads the manifest only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stripes.data.format import Manifest, read_manifest, sha256_file, verify_shard


@dataclass
class Verdict:
    manifest: Manifest
    files_checked: int
    problems: list[str]  # one line each, naming the file


def verify(directory: Path) -> Verdict:
    """Check every file of the dataset in `directory`; read_manifest's ValueError if the
    directory holds no readable manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    dtype = np.dtype(manifest.dtype)
    problems, checked = [], 1
    tokenizer = directory / manifest.tokenizer.file
    if not tokenizer.is_file():
        problems.append(f"{tokenizer}: missing")
    elif sha256_file(tokenizer) != manifest.tokenizer.sha256:
        problems.append(f"{tokenizer}: checksum mismatch (not the tokenizer of these shards)")
    for source in manifest.sources:
        for shard in source.shards:
            problems.extend(verify_shard(directory, shard, dtype))
            checked += 2
        for what in ("documents", "tokens"):
            total = sum(getattr(shard, what) for shard in source.shards)
            if total != getattr(source, what):
                problems.append(f"{directory / 'manifest.json'}: source {source.name!r} has "
                                f"{getattr(source, what)} {what} but its shards add up to "
                                f"{total}")
    return Verdict(manifest, checked, problems)


@dataclass
class Row:
    source: str
    documents: int
    tokens: int
    text_bytes: int
    shards: int
    skipped: int


def stats(directory: Path) -> tuple[Manifest, list[Row]]:
    """One row per source and a final `total` row, from the manifest."""
    manifest = read_manifest(Path(directory))
    rows = [Row(s.name, s.documents, s.tokens, s.text_bytes, len(s.shards),
                sum(s.skipped.values())) for s in manifest.sources]
    rows.append(Row("total", *(sum(getattr(r, f) for r in rows) for f in
                               ("documents", "tokens", "text_bytes", "shards", "skipped"))))
    return manifest, rows


def format_stats(rows: list[Row]) -> str:
    header = ("source", "documents", "tokens", "text bytes", "bytes/token", "shards", "skipped")
    body = [(r.source, f"{r.documents:,}", f"{r.tokens:,}", f"{r.text_bytes:,}",
             f"{r.text_bytes / r.tokens:.2f}" if r.tokens else "-", f"{r.shards:,}",
             f"{r.skipped:,}") for r in rows]
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]

    def fmt(line: tuple[str, ...]) -> str:
        return "  ".join([line[0].ljust(widths[0]),
                          *(c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True))])

    rule = "-" * len(fmt(header))
    return "\n".join([fmt(header), rule, *map(fmt, body[:-1]), rule, fmt(body[-1])])
