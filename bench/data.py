"""The data loader on the CPU: batch latency, open cost and resume far into a run.

Writes a synthetic prepared directory under /tmp (three sources, `--tokens` uint16 tokens in
all, 20M-token shards, document lengths uniform in 50..2000) with `data/format.py`, then
measures, with the page cache warm (the files were just written) unless said otherwise:
- one 64 x 4096 global batch from `DataLoader` on one rank: median and p90 over `--batches`;
- the same with the shards dropped from the page cache before every batch (posix_fadvise),
  i.e. every window read from disk;
- opening the dataset with `verify: false` (sizes only) and `verify: true` (sha256 of all);
- a fresh dataset + loader, `load_state_dict` at sample 10^8, first batch (verify: false).
The directory is removed at the end.

    .venv/bin/python bench/data.py [--tokens 200000000] [--batches 300] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from stripes.data import format as fmt
from stripes.data.loader import DataLoader, LoaderConfig, SourceWeight, TokenDataset

SHARES = {"web": 0.5, "code": 0.3, "books": 0.2}
SHARD_TOKENS = 20_000_000
T, BATCH = 4096, 64


def write_source(directory: Path, name: str, tokens: int, rng: np.random.Generator,
                 vocab: int) -> fmt.SourceEntry:
    entry = fmt.SourceEntry(name=name)
    (directory / name).mkdir()
    for number, start in enumerate(range(0, tokens, SHARD_TOKENS)):
        size = min(SHARD_TOKENS, tokens - start)
        tokens_file, index_file = fmt.shard_names(name, number)
        out = np.memmap(directory / tokens_file, dtype="<u2", mode="w+", shape=(size,))
        for lo in range(0, size, 1 << 24):  # in 32 MiB pieces
            hi = min(size, lo + (1 << 24))
            out[lo:hi] = rng.integers(0, vocab, size=hi - lo, dtype=np.uint16)
        out.flush()
        del out
        lengths = rng.integers(50, 2001, size=size // 50 + 1)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        starts = np.append(starts[starts < size], size).astype(fmt.INDEX_DTYPE)
        starts.tofile(directory / index_file)
        entry.shards.append(fmt.ShardEntry(
            tokens_file, index_file, len(starts) - 1, size,
            fmt.sha256_file(directory / tokens_file), fmt.sha256_file(directory / index_file)))
    entry.tokens = tokens
    entry.documents = sum(s.documents for s in entry.shards)
    return entry


def build(directory: Path, total: int, vocab: int = 32000) -> None:
    rng = np.random.default_rng(0)
    (directory / "tokenizer.model").write_bytes(b"synthetic")
    tokenizer = fmt.TokenizerEntry("tokenizer.model",
                                   fmt.sha256_file(directory / "tokenizer.model"), vocab, 2)
    sources = [write_source(directory, name, int(total * share), rng, vocab)
               for name, share in SHARES.items()]
    fmt.write_manifest(directory, fmt.Manifest(tokenizer, "<u2", sources))


def drop_page_cache(directory: Path) -> None:
    for path in directory.rglob("shard-*"):
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def batch_ms(loader: DataLoader, n: int, before=None) -> list[float]:
    times = []
    for _ in range(n):
        if before is not None:
            before()
        t0 = time.perf_counter()
        next(loader)
        times.append(1e3 * (time.perf_counter() - t0))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200_000_000)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="stripes-bench-data-", dir="/tmp"))
    try:
        t0 = time.perf_counter()
        build(directory, args.tokens)
        print(f"wrote {args.tokens / 1e6:.0f}M tokens in {time.perf_counter() - t0:.1f} s")

        def config(verify: bool) -> LoaderConfig:
            return LoaderConfig(seq_len=T, verify=verify, sources=[
                SourceWeight(str(directory), name, share) for name, share in SHARES.items()])

        results: dict[str, float] = {}
        for verify in (False, True):
            t0 = time.perf_counter()
            TokenDataset(config(verify))
            results[f"open, verify={verify} (s)"] = time.perf_counter() - t0

        loader = DataLoader(TokenDataset(config(False)), global_batch=BATCH)
        batch_ms(loader, 10)  # warm-up
        warm = batch_ms(loader, args.batches)
        results["batch 64x4096, warm cache, median (ms)"] = float(np.median(warm))
        results["batch 64x4096, warm cache, p90 (ms)"] = float(np.percentile(warm, 90))
        cold = batch_ms(loader, min(args.batches, 50), lambda: drop_page_cache(directory))
        results["batch 64x4096, cache dropped, median (ms)"] = float(np.median(cold))

        resume = []
        for _ in range(5):
            drop_page_cache(directory)
            t0 = time.perf_counter()
            fresh = DataLoader(TokenDataset(config(False)), global_batch=BATCH)
            fresh.load_state_dict({**fresh.state_dict(), "samples_consumed": 10**8})
            next(fresh)
            resume.append(time.perf_counter() - t0)
        results["open + resume at 1e8 + first batch, cache dropped, median (s)"] = float(
            np.median(resume))
        for name, value in results.items():
            print(f"{name:<66} {value:10.4f}")
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))
    finally:
        shutil.rmtree(directory)


if __name__ == "__main__":
    main()
