"""Readers for the input corpora: RedPajama-style JSONL (plain or .zst) and Parquet.

A reader turns one source's files into a stream of `Record`s, in file order and, within a file,
line (or row) order. A record is either a document (`text`) or a bad input (`skip` = one of
`SKIP_REASONS`, with `detail`); the caller decides whether to count it or stop (`strict`).
Every record carries its `Position` so that a later run can resume reading right after the
last complete shard, and a `where` ("file:line", or "file:row N" for Parquet) for messages.

Bad records are the input's fault and are reported one by one. A file that cannot be read at
all (missing, corrupt compression, not Parquet) raises `InputError`: skipping a whole file
would lose data silently, so that always stops the run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import zstandard

# RedPajama v1 keeps the document in `text`, v2 in `raw_content`; `auto` takes the first
# present, per line, so one source may mix both.
AUTO_FIELDS = ("text", "raw_content")
SKIP_REASONS = {
    "malformed_json": "not a JSON object",
    "missing_text": "no text field",
    "not_utf8": "not valid UTF-8",
    "empty_document": "empty document",
    "blank_line": "blank line",
    "empty_file": "empty file",
}
_CHUNK = 1 << 20


class InputError(ValueError):
    """Input that stops the run; `str(err)` is one line naming the file (and line)."""


class Position(NamedTuple):
    """Where a record is: file number within the source, record (line or row) within the
    file, both from 0. The end of a source is Position(number of files, 0)."""

    file: int
    record: int


START = Position(0, 0)


@dataclass
class Record:
    position: Position
    where: str
    text: str | None = None
    skip: str | None = None  # a key of SKIP_REASONS when this is not a document
    detail: str = ""

    def describe(self) -> str:
        """One line for the user: where, what is wrong."""
        extra = f" ({self.detail})" if self.detail else ""
        return f"{self.where}: {SKIP_REASONS[self.skip]}{extra}"


def strict_error(record: Record) -> InputError:
    """The error that stops a `strict` run at its first bad record."""
    return InputError(f"{record.describe()} (allowed: well-formed documents while "
                      "data.strict=true; data.strict=false skips and counts bad input)")


def read_source(files: list[Path], fmt: dict[Path, str], text_field: str,
                start: Position = START) -> Iterator[Record]:
    """Records of `files` from `start` on; `fmt[path]` is a key of READERS."""
    for number in range(start.file, len(files)):
        path = files[number]
        first = start.record if number == start.file else 0
        try:
            if path.stat().st_size == 0:
                if first == 0:
                    yield Record(Position(number, 0), str(path), skip="empty_file")
                continue
            yield from READERS[fmt[path]](path, number, text_field, first)
        except OSError as err:
            raise InputError(f"{path}: cannot read: {err.strerror or err}") from None


def _document(position: Position, where: str, value: object) -> Record:
    """The record for one field value: a document, or why it is not one."""
    if isinstance(value, bytes):  # Parquet binary columns
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as err:
            return Record(position, where, skip="not_utf8", detail=f"byte {err.start}")
    if not isinstance(value, str):
        return Record(position, where, skip="missing_text",
                      detail=f"value is {type(value).__name__}, not a string")
    if not value.isascii():
        try:  # a JSON "\ud800" escape decodes to a lone surrogate, which has no UTF-8 form
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            return Record(position, where, skip="not_utf8", detail=f"character {err.start}")
    if not value.strip():
        return Record(position, where, skip="empty_document")
    return Record(position, where, text=value)


def _pick(row: dict, text_field: str) -> tuple[bool, object]:
    """(found, value) of the text field of one JSON object or Parquet row."""
    names = AUTO_FIELDS if text_field == "auto" else (text_field,)
    for name in names:
        if row.get(name) is not None:
            return True, row[name]
    return False, None


def _json_lines(path: Path, number: int, text_field: str, first: int,
                lines: Iterator[bytes]) -> Iterator[Record]:
    wanted = " or ".join(AUTO_FIELDS) if text_field == "auto" else text_field
    seen = 0
    for seen, line in enumerate(lines, start=1):
        if seen <= first:  # resuming: lines before `first` were handled by an earlier run
            continue
        position, where = Position(number, seen - 1), f"{path}:{seen}"
        try:
            decoded = line.decode("utf-8")
        except UnicodeDecodeError as err:
            yield Record(position, where, skip="not_utf8", detail=f"byte {err.start}")
            continue
        if not decoded.strip():
            yield Record(position, where, skip="blank_line")
            continue
        try:
            row = json.loads(decoded)
        except json.JSONDecodeError as err:
            yield Record(position, where, skip="malformed_json", detail=err.msg)
            continue
        if not isinstance(row, dict):
            yield Record(position, where, skip="malformed_json",
                         detail=f"a JSON {type(row).__name__}")
            continue
        found, value = _pick(row, text_field)
        if not found:
            yield Record(position, where, skip="missing_text", detail=f"wanted {wanted}")
            continue
        yield _document(position, where, value)
    if seen == 0 and first == 0:  # a .zst file that decompresses to nothing
        yield Record(Position(number, 0), str(path), skip="empty_file")


def _read_jsonl(path: Path, number: int, text_field: str, first: int) -> Iterator[Record]:
    with open(path, "rb") as f:
        yield from _json_lines(path, number, text_field, first, iter(f))


def _read_jsonl_zst(path: Path, number: int, text_field: str, first: int) -> Iterator[Record]:
    yield from _json_lines(path, number, text_field, first, _split_lines(_zstd_chunks(path)))


def _zstd_chunks(path: Path) -> Iterator[bytes]:
    """Decompressed bytes of every frame of `path`. zstandard's stream reader ends quietly at
    a truncated frame, which would drop documents unnoticed; here truncation is an error."""
    try:
        with open(path, "rb") as f:
            frame, fed = zstandard.ZstdDecompressor().decompressobj(), False
            while block := f.read(_CHUNK):
                while block:
                    fed = True
                    if out := frame.decompress(block):
                        yield out
                    block = b""
                    if frame.eof:  # a file may hold several frames back to back
                        block = frame.unused_data
                        frame, fed = zstandard.ZstdDecompressor().decompressobj(), False
    except zstandard.ZstdError as err:
        raise InputError(f"{path}: cannot decompress (allowed: zstd-compressed JSONL): "
                         f"{err}") from None
    if fed:
        raise InputError(f"{path}: truncated zstd stream (allowed: complete zstd frames)")


def _split_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    tail = b""
    for chunk in chunks:
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        yield from lines
    if tail:
        yield tail


def _read_parquet(path: Path, number: int, text_field: str, first: int) -> Iterator[Record]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        names = table.schema_arrow.names
        wanted = [n for n in (AUTO_FIELDS if text_field == "auto" else (text_field,))
                  if n in names]
        rows = table.metadata.num_rows
        if rows == 0:
            yield Record(Position(number, 0), str(path), skip="empty_file")
            return
        if not wanted:
            for row in range(first, rows):
                yield Record(Position(number, row), f"{path}:row {row}", skip="missing_text",
                             detail=f"no column {text_field!r} (columns: {', '.join(names)})")
            return
        row = 0
        for batch in table.iter_batches(batch_size=1024, columns=wanted):
            columns = [batch.column(n).to_pylist() for n in wanted]
            for values in zip(*columns, strict=True):
                if row >= first:
                    found, value = _pick(dict(zip(wanted, values, strict=True)), text_field)
                    position, where = Position(number, row), f"{path}:row {row}"
                    yield (_document(position, where, value) if found else
                           Record(position, where, skip="missing_text", detail="null"))
                row += 1
    except (pyarrow.ArrowException, OSError) as err:
        raise InputError(f"{path}: cannot read as Parquet: {str(err).splitlines()[0]}") from None


# format name (as in the config's `format`) -> reader
READERS = {
    "jsonl": _read_jsonl,
    "jsonl.zst": _read_jsonl_zst,
    "parquet": _read_parquet,
}
# file name ending -> format, for `format: auto`
SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".jsonl.zst": "jsonl.zst",
            ".json.zst": "jsonl.zst", ".parquet": "parquet"}


def format_of(path: Path) -> str | None:
    """The format `auto` picks for `path` by its name, or None when the name says nothing."""
    name = path.name.lower()
    matches = [s for s in SUFFIXES if name.endswith(s)]
    return SUFFIXES[max(matches, key=len)] if matches else None
