"""Tokenization throughput: stripes' worker processes vs `datasets.map`, on the demo corpus.

The demo corpus (data/corpus) is replicated to about `--mb` MB of text in a temporary
directory as one JSONL.zst file, and tokenized with the demo's tokenizer (BPE, 4096 pieces,
trained here on the demo text exactly as `stripes prepare configs/data/demo.yaml` does) by:

- `mp`: data/encode.py's Encoder (multiprocessing, spawn) fed by data/sources.py's reader,
  as `stripes prepare` does, without writing shards;
- `datasets`: `load_dataset("json")` (arrow conversion and cache included) then `.map` with
  `num_proc=workers` (batched, 512 documents a batch);
- `prepare`: the whole `stripes prepare` run, shards and manifest included.

Every variant starts from the same compressed file and ends with token ids for every
document, so times include reading. MB/s counts UTF-8 text bytes; per core = MB/s / workers.

    python bench/tokenize_throughput.py [--mb 50] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import zstandard

from stripes.core.config import to_typed
from stripes.data.encode import Encoder
from stripes.data.format import token_dtype
from stripes.data.prepare import prepare
from stripes.data.prepare_config import PrepareFile, TokenizerConfig  # noqa: E402
from stripes.data.sources import read_source  # noqa: E402
from stripes.data.tokenizer import Tokenizer, draw_sample, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CORPUS = [ROOT / "data/corpus/devil.jsonl.zst", ROOT / "data/corpus/jargon.jsonl.zst"]


def demo_documents() -> list[str]:
    texts = []
    for path in CORPUS:
        records = read_source([path], {path: "jsonl.zst"}, "auto")
        texts.extend(r.text for r in records if r.text is not None)
    return texts


def replicate(directory: Path, megabytes: float) -> tuple[Path, int]:
    """One JSONL.zst file holding the demo documents repeated to about `megabytes` MB."""
    docs = demo_documents()
    size = sum(len(d.encode()) for d in docs)
    copies = max(1, round(megabytes * 1e6 / size))
    path = directory / "corpus.jsonl.zst"
    with open(path, "wb") as f, zstandard.ZstdCompressor(level=3).stream_writer(f) as out:
        for copy in range(copies):
            for doc in docs:
                out.write((json.dumps({"text": doc, "meta": {"copy": copy}}) + "\n").encode())
    return path, copies * size


def demo_tokenizer() -> Tokenizer:
    cfg = to_typed(PrepareFile, {"data": {"output": "unused", "sources": [
        {"name": p.name.split(".")[0], "paths": [str(p)]} for p in CORPUS]}}, prefix="").data
    cfg.tokenizer = TokenizerConfig(vocab_size=4096)
    lines = draw_sample(cfg.resolve(), cfg.tokenizer.sample_bytes, strict=False)
    return Tokenizer(train(cfg.tokenizer, lines), "demo", None)


def run_mp(path: Path, tokenizer: Tokenizer, workers: int) -> int:
    dtype = token_dtype(tokenizer.vocab_size)
    records = read_source([path], {path: "jsonl.zst"}, "text")

    def batches():
        batch = []
        for record in records:
            batch.append(record.text)
            if len(batch) == 512:
                yield batch
                batch = []
        yield batch

    with Encoder(tokenizer.model, tokenizer.eos_id, dtype, workers) as encoder:
        return sum(len(encoded.tokens) for _, encoded in encoder.map(batches()))


def run_datasets(path: Path, tokenizer: Tokenizer, workers: int, cache: Path) -> int:
    import datasets
    import sentencepiece as spm

    datasets.disable_progress_bars()
    model, eos = tokenizer.model, tokenizer.eos_id
    processor = {}

    def tokenize(batch):
        if "sp" not in processor:
            processor["sp"] = spm.SentencePieceProcessor(model_proto=model)
        ids = processor["sp"].encode(batch["text"], num_threads=1)
        return {"ids": [x + [eos] for x in ids]}

    data = datasets.load_dataset("json", data_files=str(path), split="train",
                                 cache_dir=str(cache))
    mapped = data.map(tokenize, batched=True, batch_size=512, remove_columns=data.column_names,
                      num_proc=workers if workers > 1 else None)
    return sum(len(x) for x in mapped.with_format("numpy")["ids"])


def run_prepare(path: Path, tokenizer_path: Path, workers: int, out: Path) -> int:
    cfg = to_typed(PrepareFile, {"data": {
        "output": str(out), "sources": [{"name": "corpus", "paths": [str(path)]}],
        "tokenizer": {"model": str(tokenizer_path)}, "workers": workers}}, prefix="").data
    return sum(s.tokens for s in prepare(cfg).manifest.sources)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=50.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="stripes-bench-") as tmp:
        tmp = Path(tmp)
        path, text_bytes = replicate(tmp, args.mb)
        tokenizer = demo_tokenizer()
        tokenizer_path = tmp / "demo.model"
        tokenizer_path.write_bytes(tokenizer.model)
        runs = {
            "mp": lambda w: run_mp(path, tokenizer, w),
            "datasets": lambda w: run_datasets(path, tokenizer, w, tmp / f"hf-{w}"),
            "prepare": lambda w: run_prepare(path, tokenizer_path, w, tmp / f"out-{w}"),
        }
        print(f"{text_bytes / 1e6:.1f} MB of text, demo BPE tokenizer (4096)")
        print(f"{'method':9} {'workers':>7} {'seconds':>8} {'MB/s':>7} {'MB/s/core':>9} "
              f"{'Mtokens':>8}")
        for name, run in runs.items():
            for workers in args.workers:
                began = time.perf_counter()
                tokens = run(workers)
                seconds = time.perf_counter() - began
                rate = text_bytes / 1e6 / seconds
                print(f"{name:9} {workers:7d} {seconds:8.2f} {rate:7.2f} {rate / workers:9.2f} "
                      f"{tokens / 1e6:8.2f}", flush=True)


if __name__ == "__main__":
    main()
