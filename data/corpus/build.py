"""Rebuild the bundled demo corpus from Debian's dictd packages (a one-off, kept reproducible).

    cd /tmp && apt-get download dict-devil dict-jargon
    python data/corpus/build.py /tmp/dict-devil_*.deb /tmp/dict-jargon_*.deb

A `.deb` is an `ar` archive whose `data.tar.xz` holds `usr/share/dictd/NAME.index` and
`NAME.dict.dz` (gzip). Each index line is `headword TAB offset TAB length`, the numbers in
dictd's base64 digits; several headwords may share one entry. We emit one document per entry,
in dictionary order, skipping dictd's own `00database*` / `00-database-*` header entries. The
Devil's Dictionary is written in RedPajama v1 style (`text`), the Jargon File in v2 style
(`raw_content`), so the demo exercises both readers. Output: data/corpus/NAME.jsonl.zst (zstd
level 19).
"""

from __future__ import annotations

import gzip
import io
import json
import sys
import tarfile
from pathlib import Path

import zstandard

HERE = Path(__file__).resolve().parent
DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
# dictionary name in the package -> (title for meta, field that holds the text)
DICTIONARIES = {
    "devil": ("The Devil's Dictionary (Ambrose Bierce, 1911)", "text"),
    "jargon": ("The Jargon File 4.4.7 (2003)", "raw_content"),
}


def ar_members(blob: bytes) -> dict[str, bytes]:
    """The files of a Unix `ar` archive: 8-byte magic, then 60-byte headers, 2-byte aligned."""
    if not blob.startswith(b"!<arch>\n"):
        raise SystemExit("not a .deb (ar) archive")
    members, at = {}, 8
    while at < len(blob):
        header = blob[at:at + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode())
        members[name] = blob[at + 60:at + 60 + size]
        at += 60 + size + (size % 2)
    return members


def dictd_files(deb: Path) -> dict[str, bytes]:
    """usr/share/dictd/* of a .deb, by base name."""
    data = ar_members(deb.read_bytes())["data.tar.xz"]
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:xz") as tar:
        return {Path(m.name).name: tar.extractfile(m).read() for m in tar.getmembers()
                if m.isfile() and "/dictd/" in m.name}


def b64_number(digits: str) -> int:
    value = 0
    for digit in digits:
        value = value * 64 + DIGITS.index(digit)
    return value


def entries(index: bytes, body: bytes) -> list[tuple[str, str]]:
    """(headword, text) per distinct entry, in the order the entries appear in the body."""
    first_headword: dict[tuple[int, int], str] = {}
    for line in index.decode("utf-8").splitlines():
        headword, offset, length = line.split("\t")
        if headword.replace("-", "").startswith("00database"):  # dictd's own header
            continue
        first_headword.setdefault((b64_number(offset), b64_number(length)), headword)
    return [(headword, body[start:start + length].decode("utf-8").strip())
            for (start, length), headword in sorted(first_headword.items())]


def main(debs: list[str]) -> None:
    for deb in map(Path, debs):
        files = dictd_files(deb)
        for name, (title, field) in DICTIONARIES.items():
            if f"{name}.index" not in files:
                continue
            body = gzip.decompress(files[f"{name}.dict.dz"])
            lines = [json.dumps({field: text, "meta": {"source": name, "headword": headword,
                                                       "title": title}}, ensure_ascii=False)
                     for headword, text in entries(files[f"{name}.index"], body) if text]
            raw = ("\n".join(lines) + "\n").encode("utf-8")
            out = HERE / f"{name}.jsonl.zst"
            out.write_bytes(zstandard.ZstdCompressor(level=19).compress(raw))
            print(f"{out.name}: {len(lines)} documents, {len(raw):,} bytes of JSONL, "
                  f"{out.stat().st_size:,} bytes compressed")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
