"""`stripes prepare`: readers, bad input, tokenizer, shards, determinism, resuming.

Corpora are generated in tmp_path (a few dozen documents); most tests load one small
tokenizer trained once per session, the tokenizer tests train their own (vocab 400).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import zstandard

from stripes.core.config import ConfigError, to_typed
from stripes.data import prepare as prepare_module
from stripes.data import tokenizer as tokenizer_module
from stripes.data.format import INDEX_DTYPE, read_manifest, token_dtype, verify_shard
from stripes.data.prepare import prepare
from stripes.data.prepare_config import PrepareFile, TokenizerConfig
from stripes.data.sources import InputError
from stripes.data.tokenizer import Tokenizer

WORDS = ["the", "of", "and", "to", "in", "is", "was", "for", "that", "with", "on", "as", "by",
         "at", "from", "this", "be", "are", "an", "or", "it", "not", "which", "have", "had",
         "but", "were", "they", "hacker", "kludge", "dictionary", "cynic", "naïve", "café", "™",
         "日本", "🙂", "x86", "2024", "3.14"]


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Varied text: paragraphs, newlines, double spaces, tabs, leading and trailing blanks and
    non-ASCII, so that a lossy tokenizer or reader would show in the round trip."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        paragraphs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 40)))
                      for _ in range(rng.randint(1, 3))]
        doc = f"Doc {i}: " + rng.choice(["\n\n", "\n", "  ", "\t"]).join(paragraphs)
        docs.append(doc + rng.choice(["", "\n", "  "]))
    return docs


def write_jsonl(path: Path, rows: list, zst: bool = False) -> Path:
    raw = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(raw) if zst else raw)
    return path


def write_parquet(path: Path, field: str, docs: list[str | None]) -> Path:
    pq.write_table(pa.table({field: pa.array(docs, pa.string()),
                             "meta": pa.array([{"i": i} for i in range(len(docs))])}), path)
    return path


def config(tmp_path: Path, sources: list[dict], tokenizer=None, **data):
    data = {"output": str(tmp_path / "out"), "sources": sources, "workers": 1,
            "tokenizer": tokenizer if tokenizer is not None else {}, **data}
    return to_typed(PrepareFile, {"data": data}, prefix="").data


def documents(out: Path, source: str, decode: bool = True) -> list:
    """Every document of `source` from its shards (decoded text, or token ids without EOS),
    checking that each ends with EOS."""
    manifest = read_manifest(out)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    docs = []
    for shard in manifest.source(source).shards:
        tokens = np.fromfile(out / shard.tokens_file, dtype=manifest.dtype)
        index = np.fromfile(out / shard.index_file, dtype=INDEX_DTYPE)
        for a, b in zip(index[:-1], index[1:], strict=True):
            assert tokens[b - 1] == manifest.tokenizer.eos_id
            docs.append(sp.decode(tokens[a:b - 1].tolist()) if decode else tokens[a:b - 1])
    return docs


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/shard-*"))}


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> str:
    """A 400-piece BPE tokenizer trained once, loaded by most tests (`tokenizer.model`)."""
    lines = [ln for doc in make_docs(300, seed=99) for ln in doc.split("\n") if ln.strip()]
    path = tmp_path_factory.mktemp("tok") / "tiny.model"
    path.write_bytes(tokenizer_module.train(TokenizerConfig(vocab_size=400), lines))
    return str(path)


@pytest.fixture
def two_sources(tmp_path):
    """A v1 JSONL.zst source and a v2 JSONL source, with their documents."""
    devil, jargon = make_docs(40, seed=1), make_docs(30, seed=2)
    write_jsonl(tmp_path / "devil.jsonl.zst", [{"text": d, "meta": {}} for d in devil], True)
    write_jsonl(tmp_path / "jargon.jsonl", [{"raw_content": d, "meta": {}} for d in jargon])
    sources = [{"name": "devil", "paths": [str(tmp_path / "devil.jsonl.zst")]},
               {"name": "jargon", "paths": [str(tmp_path / "jargon.jsonl")]}]
    return sources, {"devil": devil, "jargon": jargon}


# --- readers and the round trip ---------------------------------------------------------

@pytest.mark.parametrize("kind", ["jsonl-v1", "jsonl.zst-v2", "parquet-v1", "parquet-v2",
                                  "jsonl-mixed"])
def test_round_trip(tmp_path, sp_model, kind):
    docs = make_docs(25, seed=3)
    if kind.startswith("parquet"):
        path = write_parquet(tmp_path / "x.parquet", "text" if kind.endswith("v1")
                             else "raw_content", docs)
    else:
        # mixed: v1 and v2 lines alternate in one file; text_field auto takes either
        fields = ["text", "raw_content"] if kind == "jsonl-mixed" else \
            ["text"] if kind.endswith("v1") else ["raw_content"]
        rows = [{fields[i % len(fields)]: d, "meta": {"i": i}} for i, d in enumerate(docs)]
        path = write_jsonl(tmp_path / ("x.jsonl.zst" if "zst" in kind else "x.jsonl"), rows,
                           zst="zst" in kind)
    out = prepare(config(tmp_path, [{"name": "s", "paths": [str(path)]}],
                         {"model": sp_model})).output
    assert documents(out, "s") == docs
    entry = read_manifest(out).source("s")
    assert entry.documents == len(docs) and entry.skipped == {}
    assert entry.text_bytes == sum(len(d.encode()) for d in docs)


def test_named_text_field_and_globs(tmp_path, sp_model):
    docs = make_docs(12, seed=4)
    for part in range(3):
        write_jsonl(tmp_path / f"part-{part}.jsonl",
                    [{"content": d, "text": "not this"} for d in docs[part::3]])
    cfg = config(tmp_path, [{"name": "s", "paths": [str(tmp_path / "part-*.jsonl")],
                             "text_field": "content"}], {"model": sp_model})
    out = prepare(cfg).output
    assert documents(out, "s") == docs[0::3] + docs[1::3] + docs[2::3]  # sorted file order


def test_uint16_and_uint32_token_files(tmp_path, sp_model, monkeypatch):
    assert token_dtype(65536) == np.dtype("<u2") and token_dtype(65537) == np.dtype("<u4")
    docs = make_docs(10, seed=5)
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": d} for d in docs])
    sources = [{"name": "s", "paths": [str(path)]}]
    small = prepare(config(tmp_path, sources, {"model": sp_model}))
    # a vocabulary too large for uint16, without training one: the same ids in wider files
    monkeypatch.setattr(Tokenizer, "vocab_size", property(lambda self: 70_000))
    wide = prepare(config(tmp_path, sources, {"model": sp_model}, output=str(tmp_path / "w")))
    assert (small.manifest.dtype, wide.manifest.dtype) == ("<u2", "<u4")
    assert wide.manifest.tokenizer.vocab_size == 70_000
    for result, width in ((small, 2), (wide, 4)):
        shard = result.manifest.source("s").shards[0]
        assert (result.output / shard.tokens_file).stat().st_size == shard.tokens * width
        assert documents(result.output, "s") == docs
    ids = [np.fromfile(r.output / r.manifest.source("s").shards[0].tokens_file,
                       dtype=r.manifest.dtype) for r in (small, wide)]
    np.testing.assert_array_equal(ids[0], ids[1])


# --- bad input ------------------------------------------------------------------------------

GOOD = [{"text": "first good document"}, {"text": "second good document"}]
BAD_LINES = {  # case -> (reason counted, the raw line between the two good ones)
    "malformed_json": ("malformed_json", b'{"text": "unterminated'),
    "not_an_object": ("malformed_json", b"[1, 2]"),
    "missing_text": ("missing_text", b'{"meta": {"title": "no text"}}'),
    "null_text": ("missing_text", b'{"text": null}'),
    "not_utf8": ("not_utf8", b'{"text": "caf\xe9"}'),
    "lone_surrogate": ("not_utf8", b'{"text": "half \\ud800 a pair"}'),
    "empty_document": ("empty_document", b'{"text": "  \\n  "}'),
    "blank_line": ("blank_line", b"   "),
}
EMPTY_FILES = {  # an empty second file of the source, in each format
    "b.jsonl": lambda path: path.write_bytes(b""),
    "b.jsonl.zst": lambda path: path.write_bytes(zstandard.ZstdCompressor().compress(b"")),
    "b.parquet": lambda path: write_parquet(path, "text", []),
}


@pytest.mark.parametrize("case", [*BAD_LINES, *EMPTY_FILES])
@pytest.mark.parametrize("strict", [False, True])
def test_bad_input(tmp_path, sp_model, case, strict):
    path = tmp_path / "a.jsonl"
    first, second = (json.dumps(r).encode() for r in GOOD)
    if case in BAD_LINES:
        reason, line = BAD_LINES[case]
        path.write_bytes(b"\n".join([first, line, second, b""]))
        paths, where = [path], f"{path}:2: "
    else:
        path.write_bytes(b"\n".join([first, second, b""]))
        EMPTY_FILES[case](tmp_path / case)
        paths, reason, where = [path, tmp_path / case], "empty_file", f"{tmp_path / case}: "
    cfg = config(tmp_path, [{"name": "s", "paths": [str(p) for p in paths]}],
                 {"model": sp_model}, strict=strict)
    if strict:
        with pytest.raises(InputError) as err:
            prepare(cfg)
        message = str(err.value)
        assert message.startswith(where) and "\n" not in message and "strict" in message
        out = Path(cfg.output)
        assert not (out / "manifest.json").exists()
        assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    else:
        result = prepare(cfg)
        assert result.manifest.source("s").skipped == {reason: 1}
        assert documents(result.output, "s") == [r["text"] for r in GOOD]


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_unreadable_zst_stops_the_run(tmp_path, sp_model, damage):
    raw = "".join(json.dumps({"text": d}) + "\n" for d in make_docs(50)).encode()
    packed = zstandard.ZstdCompressor().compress(raw)
    path = tmp_path / "x.jsonl.zst"
    path.write_bytes(packed[:len(packed) // 2] if damage == "truncated" else b"not zstd" * 9)
    with pytest.raises(InputError, match=f"^{path}: (truncated|cannot decompress)"):
        prepare(config(tmp_path, [{"name": "s", "paths": [str(path)]}], {"model": sp_model}))


# --- shards: size cap, determinism -------------------------------------------------------

def test_shards_are_capped_and_documents_never_span(tmp_path, sp_model, two_sources):
    sources, docs = two_sources
    docs["devil"][5] = "a long one " * 200  # longer than a shard: gets a shard of its own
    write_jsonl(tmp_path / "devil.jsonl.zst", [{"text": d} for d in docs["devil"]], True)
    result = prepare(config(tmp_path, sources, {"model": sp_model}, shard_tokens=300))
    shards = result.manifest.source("devil").shards
    assert len(shards) > 3
    oversized = [s for s in shards if s.tokens > 300]
    assert len(oversized) == 1 and oversized[0].documents == 1
    assert documents(result.output, "devil") == docs["devil"]
    # each shard is as full as the next document allows: it would not have fit
    lengths = [len(d) + 1 for d in documents(result.output, "devil", decode=False)]
    used = 0
    for shard in shards[:-1]:
        used += shard.documents
        assert shard.tokens + lengths[used] > 300


def test_workers_do_not_change_the_shards(tmp_path, sp_model, two_sources, monkeypatch):
    sources, _ = two_sources
    monkeypatch.setattr(prepare_module, "BATCH_DOCUMENTS", 3)  # many batches in flight
    one = prepare(config(tmp_path, sources, {"model": sp_model}, shard_tokens=400,
                         output=str(tmp_path / "w1")))
    two = prepare(config(tmp_path, sources, {"model": sp_model}, shard_tokens=400,
                         output=str(tmp_path / "w2"), workers=2))
    assert len(one.manifest.source("devil").shards) > 2
    assert shard_bytes(one.output) == shard_bytes(two.output)
    assert one.manifest.fingerprint() == two.manifest.fingerprint()


# --- re-running -----------------------------------------------------------------------------

def _inodes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_ino for p in sorted(out.glob("*/shard-*"))}


def test_rerun_keeps_valid_shards_and_redoes_a_corrupted_one(tmp_path, sp_model, two_sources):
    sources, docs = two_sources
    cfg = config(tmp_path, sources, {"model": sp_model}, shard_tokens=400)
    first = prepare(cfg)
    reference, inodes = shard_bytes(first.output), _inodes(first.output)
    shards = first.manifest.source("devil").shards
    assert len(shards) >= 3

    again = prepare(cfg)
    assert [(s.written, s.reused) for s in again.sources] == \
        [(0, len(s.entry.shards)) for s in first.sources]
    assert _inodes(first.output) == inodes  # not rewritten
    assert again.manifest == first.manifest

    victim = first.output / shards[1].tokens_file
    data = bytearray(victim.read_bytes())
    data[7] ^= 0x10
    victim.write_bytes(bytes(data))
    redone = prepare(cfg)
    assert [(s.written, s.reused) for s in redone.sources][0] == (1, len(shards) - 1)
    changed = {k for k, v in _inodes(first.output).items() if inodes[k] != v}
    assert changed == {"devil/shard-00001.tokens", "devil/shard-00001.index",
                       "devil/shard-00001.recipe.json"}
    assert shard_bytes(first.output) == reference
    assert documents(first.output, "devil") == docs["devil"]


def test_killed_run_is_finished_by_the_next(tmp_path, sp_model, two_sources):
    sources, docs = two_sources
    cfg = config(tmp_path, sources, {"model": sp_model}, shard_tokens=400)
    out = prepare(cfg).output
    reference = shard_bytes(out)
    # as a SIGKILL while writing jargon's shard 1 leaves it: no manifest, the shard's files
    # renamed but no recipe record vouching for them, and a temporary file
    (out / "manifest.json").unlink()
    (out / "jargon/shard-00001.recipe.json").unlink()
    (out / "jargon/shard-00001.tokens").write_bytes(b"\0" * 10)
    (out / "jargon/.shard-00002.tokens.tmp-4242").write_bytes(b"\1" * 64)
    result = prepare(cfg)
    assert result.sources[0].written == 0 and result.sources[1].written >= 1
    assert shard_bytes(out) == reference
    assert not list(out.rglob("*.tmp-*"))
    assert documents(out, "jargon") == docs["jargon"]
    dtype = np.dtype(result.manifest.dtype)
    assert all(not verify_shard(out, shard, dtype)
               for source in result.manifest.sources for shard in source.shards)


def test_skip_counts_survive_resuming(tmp_path, sp_model):
    """Bad records before, between and after shards are counted once, however the shards
    are split between runs."""
    docs = make_docs(30, seed=6)
    lines = [b"not json", *(json.dumps({"text": d}).encode() for d in docs)]
    for at in (25, 17, 9, 8):
        lines.insert(at, b'{"meta": {}}')
    lines.append(b"{]")
    path = tmp_path / "x.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    cfg = config(tmp_path, [{"name": "s", "paths": [str(path)]}], {"model": sp_model},
                 shard_tokens=250)
    first = prepare(cfg)
    entry = first.manifest.source("s")
    assert entry.skipped == {"malformed_json": 2, "missing_text": 4}
    assert len(entry.shards) >= 4
    out = first.output
    (out / "s/shard-00001.index").write_bytes(b"")
    (out / "s/shard-00003.recipe.json").unlink()
    (out / "manifest.json").unlink()
    again = prepare(cfg)
    assert again.sources[0].written == 2
    assert again.manifest == first.manifest
    assert documents(out, "s") == docs


def test_changed_input_redoes_the_source_and_drops_stale_shards(tmp_path, sp_model,
                                                                 two_sources):
    sources, docs = two_sources
    cfg = config(tmp_path, sources, {"model": sp_model}, shard_tokens=400)
    before = prepare(cfg)
    fewer = docs["jargon"][:5]
    write_jsonl(tmp_path / "jargon.jsonl", [{"raw_content": d} for d in fewer])
    after = prepare(cfg)
    assert after.sources[0].written == 0
    assert after.sources[1].reused == 0
    assert documents(after.output, "jargon") == fewer
    count = len(after.manifest.source("jargon").shards)
    assert count < len(before.manifest.source("jargon").shards)
    left = sorted(p.name for p in (after.output / "jargon").iterdir())
    assert left == sorted(f"shard-{n:05d}.{ext}" for n in range(count)
                          for ext in ("tokens", "index", "recipe.json"))


def test_another_tokenizers_dataset_is_refused(tmp_path, sp_model, two_sources):
    sources, _ = two_sources
    first = prepare(config(tmp_path, sources, {"model": sp_model}))
    trained = {"vocab_size": 350}
    with pytest.raises(ConfigError, match=r"^data.overwrite=False: .*another tokenizer"):
        prepare(config(tmp_path, sources, trained))
    assert read_manifest(first.output) == first.manifest  # untouched
    replaced = prepare(config(tmp_path, sources, trained, overwrite=True))
    assert replaced.manifest.tokenizer.sha256 != first.manifest.tokenizer.sha256
    assert replaced.manifest.tokenizer.vocab_size == 350


# --- tokenizer --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_trained_tokenizer_round_trips_and_is_reused(tmp_path, two_sources, monkeypatch, kind):
    sources, docs = two_sources
    cfg = config(tmp_path, sources, {"vocab_size": 350, "type": kind})
    first = prepare(cfg)
    assert first.manifest.tokenizer.vocab_size == 350
    assert documents(first.output, "jargon") == docs["jargon"]
    # the same recipe in a fresh directory trains the same tokenizer
    fresh = prepare(config(tmp_path, sources, {"vocab_size": 350, "type": kind},
                           output=str(tmp_path / "fresh")))
    assert fresh.manifest.tokenizer.sha256 == first.manifest.tokenizer.sha256

    def refuse(*args):
        raise AssertionError("trained again although the recipe did not change")

    monkeypatch.setattr(tokenizer_module, "train", refuse)
    again = prepare(cfg)
    assert again.manifest == first.manifest


def test_training_sample_is_bounded_and_drawn_from_every_source(tmp_path, two_sources):
    sources, docs = two_sources
    resolved = config(tmp_path, sources).resolve()
    lines = tokenizer_module.draw_sample(resolved, 2000, strict=False)
    assert 1000 < sum(len(x.encode()) for x in lines) <= 2000
    firsts = [docs[name][0].split("\n")[0] for name in ("devil", "jargon")]
    assert all(first.strip() in {x.strip() for x in lines} for first in firsts)
    assert tokenizer_module.draw_sample(resolved, 2000, strict=False) == lines


def test_tokenizer_problems_are_config_errors(tmp_path, two_sources):
    sources, _ = two_sources
    with pytest.raises(ConfigError, match=r"^data.tokenizer.vocab_size=20000"):
        prepare(config(tmp_path, sources, {"vocab_size": 20000, "type": "unigram"}))
    no_eos = tmp_path / "no_eos.model"
    lines = [ln for d in make_docs(50) for ln in d.split("\n") if ln.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(no_eos)[:-6],
                                   vocab_size=300, eos_id=-1, minloglevel=2, byte_fallback=True)
    with pytest.raises(ConfigError, match=r"^data.tokenizer.model=.*no EOS id"):
        prepare(config(tmp_path, sources, {"model": str(no_eos)}))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match=r"^data.tokenizer.model=.*cannot load"):
        prepare(config(tmp_path, sources, {"model": str(junk)}))
    assert not (tmp_path / "out").exists()  # nothing written before the tokenizer is sound
