"""The loader: exact windows and document ids, permutation, mixture, determinism, resume on
another number of ranks, fingerprint checks, corrupt shards and config errors.

Every test writes its own tiny prepared directory with `data/format.py` (random token ids,
random document lengths), independent of the prepare pipeline."""

from __future__ import annotations

import json
import shutil
import textwrap

import numpy as np
import pytest

from stripes.core.config import ConfigError, load_config
from stripes.data import format as fmt
from stripes.data.loader import DataLoader, LoaderConfig, SourceWeight, TokenDataset
from stripes.data.mixture import Schedule
from stripes.data.permute import permute, round_keys


def write_data(directory, sources, *, vocab=1000, tokenizer=b"tokenizer-a", seed=0):
    """Write a prepared directory. `sources`: name -> shards -> document lengths.
    Returns name -> (tokens, document starts) of each source's concatenated stream."""
    rng = np.random.default_rng(seed)
    dtype = fmt.token_dtype(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(tokenizer)
    entries, streams = [], {}
    for name, shards in sources.items():
        entry, pieces, starts, offset = fmt.SourceEntry(name=name), [], [], 0
        for number, lengths in enumerate(shards):
            tokens_file, index_file = fmt.shard_names(name, number)
            (directory / name).mkdir(exist_ok=True)
            tokens = rng.integers(0, vocab, size=sum(lengths)).astype(dtype)
            index = np.concatenate([[0], np.cumsum(lengths)]).astype(fmt.INDEX_DTYPE)
            tokens.tofile(directory / tokens_file)
            index.tofile(directory / index_file)
            entry.shards.append(fmt.ShardEntry(
                tokens_file, index_file, len(lengths), int(tokens.size),
                fmt.sha256_file(directory / tokens_file), fmt.sha256_file(directory / index_file)))
            pieces.append(tokens.astype(np.int64))
            starts.append(index[:-1].astype(np.int64) + offset)
            offset += tokens.size
        entry.documents = sum(s.documents for s in entry.shards)
        entry.tokens = offset
        entries.append(entry)
        streams[name] = (np.concatenate(pieces), np.concatenate(starts))
    tok = fmt.TokenizerEntry("tokenizer.model", fmt.sha256_file(directory / "tokenizer.model"),
                             vocab, 0)
    fmt.write_manifest(directory, fmt.Manifest(tok, dtype.str, entries))
    return streams


def doc_lengths(rng, tokens):
    """Random document lengths (1..40) summing to `tokens`."""
    lengths = rng.integers(1, 41, size=tokens)
    lengths = lengths[:np.searchsorted(np.cumsum(lengths), tokens) + 1]
    lengths[-1] -= lengths.sum() - tokens
    return [int(n) for n in lengths if n > 0]


@pytest.fixture
def corpus(tmp_path):
    """Three sources of 2-3 shards each, sizes chosen so windows cross shard boundaries."""
    rng = np.random.default_rng(1)
    layout = {"web": [doc_lengths(rng, n) for n in (301, 250, 199)],
              "code": [doc_lengths(rng, n) for n in (173, 411)],
              "books": [doc_lengths(rng, n) for n in (97, 96, 150)]}
    streams = write_data(tmp_path / "d", layout)
    return tmp_path / "d", streams


def config(directory, seq_len=8, weights=None, **kw):
    weights = weights or {"web": 0.5, "code": 0.3, "books": 0.2}
    sources = [SourceWeight(str(directory), name, w) for name, w in weights.items()]
    return LoaderConfig(seq_len=seq_len, sources=sources, **kw)


def reference_window(stream, w, T):
    """What sample window w of `stream` must be, computed from the plain concatenation."""
    tokens, starts = stream
    window = tokens[w * T:w * T + T + 1]
    doc_of = np.searchsorted(starts, np.arange(w * T, w * T + T), side="right") - 1
    return window[:-1], window[1:], doc_of - doc_of[0]


@pytest.mark.parametrize("vocab", [1000, 70000])  # uint16 and uint32 shards
def test_windows_and_doc_ids_match_plain_concatenation(tmp_path, vocab):
    rng = np.random.default_rng(2)
    layout = {"a": [doc_lengths(rng, n) for n in (53, 40, 77)], "b": [doc_lengths(rng, 90)]}
    streams = write_data(tmp_path, layout, vocab=vocab)
    T = 7
    ds = TokenDataset(LoaderConfig(seq_len=T, sources=[SourceWeight(str(tmp_path), "a"),
                                                       SourceWeight(str(tmp_path), None)]))
    whole = tuple(np.concatenate(parts) for parts in zip(
        streams["a"], (streams["b"][0], streams["b"][1] + len(streams["a"][0])), strict=True))
    per_stream = [streams["a"], whole]  # source None: every source, in manifest order
    assert [s.n_samples for s in ds.streams] == [(170 - 1) // T, (260 - 1) // T]
    seen = [set(), set()]
    for g in range(400):
        (s,), (w,) = ds.locate(g, 1)
        seen[s].add(int(w))
        inputs, targets, doc_ids = ds.sample(g)
        for got, want in zip((inputs, targets, doc_ids),
                             reference_window(per_stream[s], int(w), T), strict=True):
            np.testing.assert_array_equal(got, want)
    assert seen == [set(range(24)), set(range(37))]  # every window, incl. across shards
    assert 53 // T < 24 and (53 + 40) // T < 24  # ... of which some cross a shard boundary


def test_batch_rows_equal_samples(corpus):
    directory, _ = corpus
    ds = TokenDataset(config(directory))
    batch = next(DataLoader(ds, global_batch=6))
    assert {k: (tuple(v.shape), str(v.dtype)) for k, v in batch.items()} == {
        k: ((6, 8), "torch.int64") for k in ("input_ids", "targets", "doc_ids")}
    for row in range(6):
        for got, want in zip((batch["input_ids"], batch["targets"], batch["doc_ids"]),
                             ds.sample(row), strict=True):
            np.testing.assert_array_equal(got[row].numpy(), want)


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 2**16 + 3])
def test_permutation_is_a_bijection(n):
    images = permute(np.arange(n), n, round_keys(0, 0, 0))
    np.testing.assert_array_equal(np.sort(images), np.arange(n))
    if n >= 1000:
        for other in (round_keys(1, 0, 0), round_keys(0, 0, 1)):  # another seed, epoch
            assert (permute(np.arange(n), n, other) != images).mean() > 0.9
        assert abs(np.corrcoef(np.arange(n), images)[0, 1]) < 0.1  # shuffled, not shifted
    single = [int(permute(p, n, round_keys(0, 0, 0))) for p in range(min(n, 50))]
    assert single == images[:50].tolist()  # one index at a time gives the same images
    mixed = permute([0, 1, n - 1, 3], [n, 1000, n, 7], np.stack([round_keys(0, 0, 0)] * 4))
    assert mixed[[0, 2]].tolist() == images[[0, n - 1]].tolist()  # per-element n, one call


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [3.0, 1.0, 0.25]])
def test_schedule_proportions_and_one_visit_per_epoch(weights):
    schedule = Schedule(weights, seed=3, block=1000)
    source, j = schedule.locate(12345, 100_000)
    share = np.bincount(source, minlength=3) / source.size
    np.testing.assert_allclose(share, np.asarray(weights) / sum(weights), rtol=0.01)
    start_source, start_j = schedule.locate(0, 12345)
    for s in range(3):  # the j drawn from s count 0, 1, 2, ... along the global order
        js = np.concatenate([start_j[start_source == s], j[source == s]])
        np.testing.assert_array_equal(js, np.arange(js.size))


def test_each_epoch_visits_every_window_once_in_a_new_order(corpus):
    directory, _ = corpus
    ds = TokenDataset(config(directory))
    source, window = ds.locate(0, 20_000)
    for s, stream in enumerate(ds.streams):
        drawn = window[source == s]
        epochs = drawn[:drawn.size // stream.n_samples * stream.n_samples]
        epochs = epochs.reshape(-1, stream.n_samples)
        assert len(epochs) >= 2
        for order in epochs:
            np.testing.assert_array_equal(np.sort(order), np.arange(stream.n_samples))
        assert not np.array_equal(epochs[0], epochs[1])


def test_same_config_same_batches_other_seed_other_batches(corpus):
    directory, _ = corpus
    a = DataLoader(TokenDataset(config(directory)), global_batch=4)
    b = DataLoader(TokenDataset(config(directory)), global_batch=4)
    c = DataLoader(TokenDataset(config(directory, seed=1)), global_batch=4)
    same = other = True
    for _ in range(5):
        x, y, z = next(a), next(b), next(c)
        same &= all(bool((x[k] == y[k]).all()) for k in x)
        other &= bool((x["input_ids"] == z["input_ids"]).all())
    assert same and not other


def steps(loaders, n):
    """n global steps: per step, the ranks' batches concatenated in rank order."""
    out = []
    for _ in range(n):
        parts = [next(loader) for loader in loaders]
        out.append({k: np.concatenate([p[k].numpy() for p in parts]) for k in parts[0]})
    return out


def test_resume_on_another_number_of_ranks_continues_the_same_stream(corpus):
    directory, _ = corpus
    cfg, GB, k, m = config(directory), 8, 5, 6
    reference = steps([DataLoader(TokenDataset(cfg), GB)], k + m)
    two = [DataLoader(TokenDataset(cfg), GB, rank=r, world_size=2) for r in range(2)]
    first = steps(two, k)
    states = [json.loads(json.dumps(loader.state_dict())) for loader in two]
    assert states[0] == states[1] and states[0]["samples_consumed"] == k * GB
    for world in (1, 4):
        resumed = [DataLoader(TokenDataset(cfg), GB, rank=r, world_size=world)
                   for r in range(world)]
        for loader in resumed:
            loader.load_state_dict(states[0])
        for got, want in zip(first + steps(resumed, m), reference, strict=True):
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])


def test_resume_far_ahead_reads_the_right_windows(corpus):
    directory, streams = corpus
    ds = TokenDataset(config(directory))
    loader = DataLoader(ds, global_batch=4)
    loader.load_state_dict({**loader.state_dict(), "samples_consumed": 10**8})
    batch = next(loader)
    source, window = ds.locate(10**8, 4)
    names = ["web", "code", "books"]
    for row in range(4):
        want = reference_window(streams[names[source[row]]], int(window[row]), 8)
        np.testing.assert_array_equal(batch["input_ids"][row].numpy(), want[0])
    assert loader.state_dict()["samples_consumed"] == 10**8 + 4


def test_changed_data_is_refused_naming_the_change_unless_allowed(corpus, tmp_path):
    directory, _ = corpus
    state = DataLoader(TokenDataset(config(directory)), 4).state_dict()
    state["samples_consumed"] = 40
    moved = tmp_path / "moved"
    shutil.copytree(directory, moved)  # same tokens elsewhere: the same data
    DataLoader(TokenDataset(config(moved)), 4).load_state_dict(state)
    rng = np.random.default_rng(9)
    write_data(moved, {"web": [doc_lengths(rng, 300)], "code": [doc_lengths(rng, 300)],
                       "books": [doc_lengths(rng, 300)]}, seed=9)
    cases = [(config(directory, seq_len=16), "seq_len 8 -> 16"),
             (config(directory, seed=5), "seed 0 -> 5"),
             (config(directory, weights={"web": 0.2, "code": 0.3, "books": 0.5}),
              "sources.0.weight 0.5 -> 0.2"),
             (config(moved), f"the tokens of {moved}")]
    for cfg, change in cases:
        with pytest.raises(ConfigError) as err:
            DataLoader(TokenDataset(cfg), 4).load_state_dict(state)
        assert change in str(err.value) and "data.allow_changed_data" in str(err.value)
        assert "\n" not in str(err.value)
        cfg.allow_changed_data = True
        loader = DataLoader(TokenDataset(cfg), 4)
        loader.load_state_dict(state)
        assert loader.samples_consumed == 40


@pytest.mark.parametrize("damage, verify, problem", [
    ("truncate", True, "bytes, manifest says"), ("truncate", False, "bytes, manifest says"),
    ("flip", True, "checksum mismatch"), ("delete", False, "missing")])
def test_damaged_shard_is_named_on_open(corpus, damage, verify, problem):
    directory, _ = corpus
    path = directory / "code" / "shard-00001.tokens"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(data[:-2])
    elif damage == "flip":
        data[101] ^= 0x10
        path.write_bytes(data)
    else:
        path.unlink()
    with pytest.raises(ConfigError) as err:
        TokenDataset(config(directory, verify=verify))
    message = str(err.value)
    assert f"{path}: " in message and problem in message, message
    assert message.startswith("data.sources.1.path=") and "\n" not in message


def test_config_errors_are_one_line_naming_the_key(corpus, tmp_path):
    directory, _ = corpus
    other, wide = tmp_path / "other", tmp_path / "wide"
    rng = np.random.default_rng(4)
    write_data(other, {"web": [doc_lengths(rng, 100)]}, tokenizer=b"tokenizer-b")
    write_data(wide, {"web": [doc_lengths(rng, 100)]}, vocab=70000)
    tiny = tmp_path / "tiny"
    write_data(tiny, {"web": [[3, 2]]})
    d = str(directory)
    cases = [
        (config(directory, weights={"web": -1.0}), "data.sources.0.weight=-1.0"),
        (config(directory, weights={"web": float("nan")}), "data.sources.0.weight=nan"),
        (config(directory, weights={"news": 1.0}), "'news': no such source in that "
                                                    "directory (allowed: web, code, books"),
        (config(directory, seq_len=0), "data.seq_len=0"),
        (config(directory, weights={"web": 1.0, "code": 1e-4}), "data.sources.1.weight"),
        (LoaderConfig(seq_len=4, sources=[]), "data.sources=[]"),
        (LoaderConfig(seq_len=4, sources=[SourceWeight(d), SourceWeight(str(other))]),
         "tokenizer sha256"),
        (LoaderConfig(seq_len=4, sources=[SourceWeight(d), SourceWeight(str(wide))]),
         "dtype <u4 differs from <u2"),
        (LoaderConfig(seq_len=5, sources=[SourceWeight(str(tiny))]), "at least seq_len + 1"),
        (LoaderConfig(seq_len=4, sources=[SourceWeight(str(tmp_path / "none"))]),
         "data.sources.0.path="),
    ]
    for cfg, message in cases:
        with pytest.raises(ConfigError) as err:
            TokenDataset(cfg)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    ds = TokenDataset(config(directory))
    with pytest.raises(ConfigError, match=r"global_batch=6 .*multiple of the world size 4"):
        DataLoader(ds, global_batch=6, world_size=4)
    with pytest.raises(ConfigError, match="rank=2"):
        DataLoader(ds, global_batch=4, rank=2, world_size=2)


def test_loads_from_yaml_with_typed_sources(corpus, tmp_path):
    directory, _ = corpus
    path = tmp_path / "data.yaml"
    path.write_text(textwrap.dedent(f"""
        seq_len: 8
        sources:
          - {{path: {directory}, source: web, weight: 2}}
          - {{path: {directory}}}
    """))
    cfg = load_config(LoaderConfig, path, ["seed=7"])
    assert cfg.sources[0] == SourceWeight(str(directory), "web", 2.0)
    assert cfg.sources[1].source is None and cfg.seed == 7
    assert TokenDataset(cfg).schedule.counts.tolist() == [667, 333]
    path.write_text(path.read_text().replace("weight:", "wieght:"))
    with pytest.raises(ConfigError, match="wieght: unknown key"):
        load_config(LoaderConfig, path)
