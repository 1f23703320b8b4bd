"""`stripes prepare`, `stripes data verify` and `stripes data stats` through the CLI."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
import zstandard

from stripes.data.format import read_manifest
from stripes.launch.cli import main

from conftest import ROOT

DOCS = [f"Document {i}: " + " ".join(["alpha", "beta", "gamma", "delta"][: 1 + i % 4] * (i + 1))
        for i in range(40)]


def stripes(capsys, *args: str) -> subprocess.CompletedProcess:
    """Run the CLI in this process; the same exit codes and streams a user would get."""
    code = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def write_config(tmp_path: Path, extra: str = "", output: str = "out") -> Path:
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    raw = "".join(json.dumps({"raw_content": d[::-1]}) + "\n" for d in DOCS).encode()
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    path = tmp_path / "data.yaml"
    path.write_text(f"""\
data:
  output: {tmp_path / output}
  sources:
    - {{name: a, paths: [{tmp_path / 'a.jsonl'}]}}
    - {{name: b, paths: [{tmp_path / 'b.jsonl.zst'}]}}
  tokenizer: {{vocab_size: 300}}
  shard_tokens: 200
  workers: 1
{extra}""")
    return path


@pytest.fixture
def prepared(tmp_path, capsys) -> Path:
    out = stripes(capsys, "prepare", str(write_config(tmp_path)))
    assert out.returncode == 0, out.stderr
    return tmp_path / "out"


def test_prepare_verify_stats(prepared, capsys):
    manifest = read_manifest(prepared)
    assert [s.documents for s in manifest.sources] == [40, 40]
    verify = stripes(capsys, "data", "verify", str(prepared))
    assert verify.returncode == 0 and verify.stderr == ""
    shards = sum(len(s.shards) for s in manifest.sources)
    assert f"ok; {shards} shards" in verify.stdout

    stats = stripes(capsys, "data", "stats", str(prepared))
    assert stats.returncode == 0, stats.stderr
    rows = {line.split()[0]: [int(c.replace(",", "")) for c in line.split()[1:4]]
            for line in stats.stdout.splitlines() if re.match(r"^(a|b|total) ", line)}
    for source in manifest.sources:
        assert rows[source.name] == [source.documents, source.tokens, source.text_bytes]
    assert rows["total"] == [sum(r[i] for k, r in rows.items() if k != "total")
                             for i in range(3)]
    assert rows["total"][2] == 2 * sum(len(d.encode()) for d in DOCS)


def test_prepare_prints_a_summary_and_reruns_keep_everything(tmp_path, capsys):
    config = str(write_config(tmp_path, extra="  strict: false\n"))
    (tmp_path / "a.jsonl").open("a").write("{broken\n")
    first = stripes(capsys, "prepare", config, "data.workers=2")
    assert first.returncode == 0, first.stderr
    assert re.search(r"^a: 40 documents, .* skipped: malformed_json=1$", first.stdout, re.M)
    again = stripes(capsys, "prepare", config)
    assert re.search(r"^b: 40 documents, .*\((0 written), \d+ kept\)", again.stdout, re.M)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_verify_names_each_bad_shard(prepared, capsys, damage):
    manifest = read_manifest(prepared)
    tokens = prepared / manifest.source("a").shards[1].tokens_file
    index = prepared / manifest.source("b").shards[0].index_file
    for path in (tokens, index):
        data = bytearray(path.read_bytes())
        if damage == "truncate":
            del data[-3:]
        else:
            data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    out = stripes(capsys, "data", "verify", str(prepared))
    assert out.returncode == 1
    bad = [line for line in out.stderr.splitlines() if line.startswith("bad: ")]
    assert len(bad) == 2
    assert str(tokens) in bad[0] and str(index) in bad[1]
    assert ("bytes, manifest says" if damage == "truncate" else "checksum mismatch") in bad[0]


def test_verify_catches_a_replaced_tokenizer(prepared, capsys):
    (prepared / "tokenizer.model").write_bytes(b"something else")
    out = stripes(capsys, "data", "verify", str(prepared))
    assert out.returncode == 1 and "tokenizer.model: checksum mismatch" in out.stderr


@pytest.mark.parametrize("action", ["verify", "stats"])
def test_data_without_manifest_is_one_line(tmp_path, capsys, action):
    out = stripes(capsys, "data", action, str(tmp_path))
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "no manifest" in out.stderr


def sources(*entries: str) -> str:
    return "data.sources=[" + ", ".join(entries) + "]"


@pytest.mark.parametrize("setup, args, expected", [
    ("data:\n  output: [x\n", [], "cannot parse"),
    (None, ["data.shard_tokenz=5"], "data.shard_tokenz: unknown key"),
    (None, ["data.workers=0"], "data.workers=0"),
    (None, ["data.shard_tokens=0"], "data.shard_tokens=0"),
    (None, ["data.output={dir}/a.jsonl"], "data.output='{dir}/a.jsonl': exists and is not"),
    (None, [sources("{name: a, paths: [{dir}/a.jsonl], format: csv}")],
     "data.sources[0].format='csv': unknown source format"),
    (None, [sources("{name: a, paths: [{dir}/none-*.jsonl]}")],
     "data.sources[0].paths[0]='{dir}/none-*.jsonl': matches no file"),
    (None, [sources("{name: a, paths: [{dir}/a.jsonl, {dir}/missing.jsonl]}")],
     "data.sources[0].paths[1]='{dir}/missing.jsonl': no such file"),
    (None, [sources("{name: a, paths: [{dir}]}")], "data.sources[0].paths[0]='{dir}': not a"),
    (None, [sources("{name: a, paths: [{dir}/data.yaml]}")],
     "data.sources[0].format='auto': cannot tell the format of {dir}/data.yaml"),
    (None, [sources("{name: a, paths: [{dir}/a.jsonl]}", "{name: a, paths: [{dir}/a.jsonl]}")],
     "data.sources[1].name='a': duplicate source name"),
    (None, [sources("{name: ../up, paths: [{dir}/a.jsonl]}")], "data.sources[0].name='../up'"),
    (None, ["data.sources=[]"], "data.sources=[]"),
    (None, ["data.tokenizer.vocab_size=100"], "data.tokenizer.vocab_size=100: vocabulary too"),
    (None, ["data.tokenizer.vocab_size=270"], "data.tokenizer.vocab_size=270: Vocabulary"),
    (None, ["data.tokenizer.type=wordpiece"], "data.tokenizer.type='wordpiece'"),
    (None, ["data.tokenizer.model=missing.model"], "data.tokenizer.model='missing.model'"),
])
def test_broken_config_is_one_line_exit_2(tmp_path, capsys, setup, args, expected):
    path = write_config(tmp_path)
    if setup is not None:
        path.write_text(setup)
    args = [a.replace("{dir}", str(tmp_path)) for a in args]
    out = stripes(capsys, "prepare", str(path), *args)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stripes prepare: error: "), out.stderr
    assert expected.replace("{dir}", str(tmp_path)) in lines[0]
    assert not (tmp_path / "out").exists()


def test_strict_bad_input_is_one_line_exit_2(tmp_path, capsys):
    config = write_config(tmp_path, extra="  strict: true\n")
    with (tmp_path / "a.jsonl").open("ab") as f:
        f.write(b'{"text": "\xff"}\n')
    out = stripes(capsys, "prepare", str(config))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines == [f"stripes prepare: error: {tmp_path / 'a.jsonl'}:41: not valid UTF-8 "
                     "(byte 10) (allowed: well-formed documents while data.strict=true; "
                     "data.strict=false skips and counts bad input)"]
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_other_tokenizer_is_refused_on_the_command_line(prepared, capsys, tmp_path):
    before = (prepared / "manifest.json").read_bytes()
    out = stripes(capsys, "prepare", str(tmp_path / "data.yaml"), "data.tokenizer.vocab_size=320")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "another tokenizer" in out.stderr
    assert (prepared / "manifest.json").read_bytes() == before


def test_demo_config_prepares_the_bundled_corpus(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the config's paths are relative to the repository root
    out_dir = tmp_path / "demo"
    out = stripes(capsys, "prepare", "configs/data/demo.yaml", f"data.output={out_dir}")
    assert out.returncode == 0, out.stderr
    manifest = read_manifest(out_dir)
    assert [(s.name, s.documents, s.skipped) for s in manifest.sources] == \
        [("devil", 999, {}), ("jargon", 2307, {})]
    assert manifest.dtype == "<u2" and manifest.tokenizer.vocab_size == 4096
    assert stripes(capsys, "data", "verify", str(out_dir)).returncode == 0


def test_loader_reads_the_prepared_demo(tmp_path, capsys, monkeypatch):
    """End to end: prepare the bundled corpus, mix its two sources, decode a training window."""
    import sentencepiece as spm

    from stripes.data.loader import DataLoader, LoaderConfig, SourceWeight, TokenDataset

    monkeypatch.chdir(ROOT)
    out_dir = tmp_path / "demo"
    assert stripes(capsys, "prepare", "configs/data/demo.yaml",
                   f"data.output={out_dir}").returncode == 0
    cfg = LoaderConfig(seq_len=64, sources=[SourceWeight(str(out_dir), "devil", 0.25),
                                            SourceWeight(str(out_dir), "jargon", 0.75)])
    batch = next(iter(DataLoader(TokenDataset(cfg), global_batch=8, rank=0, world_size=1)))
    assert batch["input_ids"].shape == (8, 64)
    assert torch.equal(batch["input_ids"][:, 1:], batch["targets"][:, :-1])
    sp = spm.SentencePieceProcessor(model_file=str(out_dir / "tokenizer.model"))
    text = sp.decode(batch["input_ids"][0].tolist())
    corpus = "".join(json.loads(line).get("text") or json.loads(line)["raw_content"]
                     for name in ("devil", "jargon")
                     for line in zstandard.decompress((ROOT / f"data/corpus/{name}.jsonl.zst")
                                                      .read_bytes()).decode().splitlines())
    # A window may start or end inside a multi-byte piece; its middle is verbatim corpus text.
    middle = text[len(text) // 4: len(text) // 2]
    assert middle and middle in corpus
