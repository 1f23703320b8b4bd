"""The training data loader: deterministic, resumable on any number of ranks, mixing sources.

    data:
      seq_len: 4096
      seed: 0
      sources:                      # one entry per mixture component
        - {path: /data/rpj, source: arxiv, weight: 0.2}
        - {path: /data/rpj, source: c4, weight: 0.5}
        - {path: /data/code, weight: 0.3}       # no source: all of that directory's sources

Streams. A component's tokens are its shards concatenated in manifest order (with no `source`,
every source of the directory, in manifest order), read through np.memmap and never loaded
whole. Sample i of a stream is the window tokens[i*T : i*T + T + 1]: inputs are its first T
tokens, targets its last T; n_samples = (tokens - 1) // T, and windows may cross shard
boundaries. Documents are packed: a window holds the end of one document and the start of
the next, and the target of a document's last (EOS) token is the next document's first token
(standard packing; attention is still masked by `doc_ids`). `doc_ids[t]` numbers the document
of input token t within the window: 0 at the start, +1 wherever a document starts (from the
shards' `.index` files, memmapped too, so memory is O(shards) whatever the corpus size).

Order. Global sample g -> (stream s, j-th sample drawn from s) by the blocked schedule of
`mixture.py`; then epoch e = j // n_s, position p = j % n_s, and the window read is
perm_{seed,s,e}(p) from `permute.py`. Each step is amortised O(1) per sample: resuming at 10^8
replays nothing. A global batch at step t is samples [t*GB, (t+1)*GB) after the resume point;
rank r of W reads the contiguous slice [r*GB/W, (r+1)*GB/W). Every sample of a stream is seen
exactly once per epoch of that stream, whatever the number of ranks.

Held out. With `heldout: f`, the windows in the last ceil(f x tokens) tokens of each stream
are never sampled for training (n_samples counts the windows before them; the tail is cut in
tokens, so it is the same at every seq_len); train/evaluate.py reads them by index.

State. {samples_consumed (global), seed, fingerprint, components}: the same on every rank, so
a run saved on 2 ranks resumes on 1 or 4 with the same global order. The fingerprint covers
each directory's `Manifest.fingerprint()`, the sources, their slots per mixture block, the
block and seq_len; resuming against a different one is refused naming what changed, unless
`allow_changed_data`.

Integrity, paid on open by every rank: each shard's file sizes are checked against the
manifest (one stat per file); with `verify` (the default) every shard is also read whole and
hashed (`format.verify_shard`): about 1 GB/s per core (0.37 s for 400 MB in bench/data.py),
so a 1 TB corpus costs ~15 minutes per rank; use `verify: false` for large corpora verified
elsewhere.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import MISSING

from stripes.core.config import ConfigError, require_positive
from stripes.data import format as fmt
from stripes.data.mixture import Schedule
from stripes.data.permute import ROUNDS, permute, round_keys

log = logging.getLogger("stripes")
_OPEN_SHARDS = 256  # memmaps kept open (2 file descriptors each), least recently used closed


@dataclass
class SourceWeight:
    path: str = MISSING  # a prepared data directory (with manifest.json)
    source: str | None = None  # a source of that directory; None: all of them, concatenated
    weight: float = 1.0  # relative share of samples; normalised over all entries


@dataclass
class LoaderConfig:
    seq_len: int = MISSING
    sources: list[SourceWeight] = MISSING
    seed: int = 0
    mix_block: int = 1000  # samples per mixture block: shares are exact to 1/mix_block
    verify: bool = True  # hash every shard on open (sizes are always checked)
    allow_changed_data: bool = False  # resume even if data, mixture, seq_len or seed changed
    heldout: float = 0.0  # fraction of each source's tokens, at its end, never trained on

    def validate(self, prefix: str = "data") -> None:
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ConfigError(f"{prefix}.seq_len", self.seq_len, "an integer >= 1")
        if not isinstance(self.mix_block, int) or self.mix_block < 1:
            raise ConfigError(f"{prefix}.mix_block", self.mix_block, "an integer >= 1")
        if not isinstance(self.sources, list) or not self.sources:
            raise ConfigError(f"{prefix}.sources", self.sources,
                              "a non-empty list of {path, source, weight}")
        for i, entry in enumerate(self.sources):
            require_positive(f"{prefix}.sources.{i}.weight", entry.weight)
        if not isinstance(self.heldout, (int, float)) or not 0 <= self.heldout < 1:
            raise ConfigError(f"{prefix}.heldout", self.heldout, "a fraction in [0, 1)")


class _Stream:
    """One mixture component: shards read as one token sequence, plus its document starts."""

    def __init__(self, directory: Path, shards: list[fmt.ShardEntry], dtype: np.dtype,
                 seq_len: int, files: _OpenFiles, heldout: float) -> None:
        self.directory, self.dtype, self.files = directory, dtype, files
        self.shards = [s for s in shards if s.tokens > 0]  # an empty shard adds nothing
        self.offsets = np.cumsum([0] + [s.tokens for s in self.shards]).tolist()
        self.tokens = self.offsets[-1]
        self.n_windows = (self.tokens - 1) // seq_len
        # Training samples windows [0, n_samples); windows [first_heldout, n_windows) are held
        # out. The cut is made in tokens, the last ceil(heldout x tokens) of the stream, so
        # runs and stages of different seq_len hold out the same tokens (a longer stage never
        # evaluates on what a shorter one trained on); the window that straddles the cut is
        # in neither. At least one window is held out when any fraction is asked for.
        self.n_samples = self.first_heldout = self.n_windows
        if heldout > 0:
            boundary = self.tokens - math.ceil(heldout * (self.tokens - 1))  # first held out
            self.first_heldout = min(-(-boundary // seq_len), self.n_windows - 1)
            self.n_samples = min((boundary - 1) // seq_len, self.first_heldout)
        self.n_heldout = self.n_windows - self.first_heldout

    def read(self, start: int, seq_len: int, tokens_out: np.ndarray,
             starts_out: np.ndarray) -> None:
        """Copy tokens [start, start + seq_len + 1) into tokens_out; mark with 1 in starts_out
        ([seq_len], zeroed) each input position after the first where a document starts."""
        end, pos = start + seq_len + 1, start
        k = bisect.bisect_right(self.offsets, start) - 1
        while pos < end:
            offset, shard = self.offsets[k], self.shards[k]
            lo, hi = pos - offset, min(end - offset, shard.tokens)  # shard-local piece
            tokens, index = self.files.get(self.directory, shard, self.dtype)
            tokens_out[pos - start:hi + offset - start] = tokens[lo:hi]
            doc_hi = min(hi, start + seq_len - offset)  # doc_ids cover the inputs only
            if doc_hi > lo:
                first, last = index.searchsorted(lo), index.searchsorted(doc_hi)
                starts_out[index[first:last] + (offset - start)] = 1
            pos, k = hi + offset, k + 1
        starts_out[0] = 0  # a window always starts document 0, a document start or not


class _OpenFiles:
    """Least-recently-used memmaps of (tokens, document starts) per shard."""

    def __init__(self) -> None:
        self._open: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def get(self, directory: Path, shard: fmt.ShardEntry,
            dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        key = (directory, shard.tokens_file)
        if key not in self._open:
            tokens = np.memmap(directory / shard.tokens_file, dtype=dtype, mode="r")
            index = np.memmap(directory / shard.index_file, dtype=fmt.INDEX_DTYPE, mode="r")
            # Plain ndarray views of the maps (memmap's per-slice bookkeeping is slow); offsets
            # < 2^63 read as int64, which searchsorted compares with Python ints without casts.
            # The last index entry is the token count, not a document start.
            self._open[key] = (np.asarray(tokens), np.asarray(index).view(np.int64)[:-1])
            if len(self._open) > _OPEN_SHARDS:
                self._open.popitem(last=False)
        self._open.move_to_end(key)
        return self._open[key]


def _check_sizes(directory: Path, shard: fmt.ShardEntry, dtype: np.dtype) -> list[str]:
    """The cheap half of `fmt.verify_shard`: both files exist with the manifest's sizes."""
    problems = []
    for name, size in ((shard.tokens_file, shard.tokens * dtype.itemsize),
                       (shard.index_file, (shard.documents + 1) * fmt.INDEX_DTYPE.itemsize)):
        path = directory / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != size:
            problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {size}")
    return problems


class TokenDataset:
    """The global sample sequence of a `LoaderConfig`: `sample(g)` and `read(start, count)`."""

    def __init__(self, cfg: LoaderConfig, prefix: str = "data") -> None:
        cfg.validate(prefix)
        self.cfg, self.prefix, self.seq_len = cfg, prefix, cfg.seq_len
        self._files = _OpenFiles()
        manifests: dict[Path, fmt.Manifest] = {}
        verified: set[tuple[Path, str]] = set()
        self.streams: list[_Stream] = []
        streams_info = []
        for i, entry in enumerate(cfg.sources):
            key = f"{prefix}.sources.{i}"
            directory = Path(entry.path).expanduser().resolve()
            if directory not in manifests:
                manifests[directory] = self._open_manifest(key, entry.path, directory)
            manifest = manifests[directory]
            self._check_same_tokens(key, entry.path, manifest, manifests)
            dtype = np.dtype(manifest.dtype)
            chosen = self._choose(key, entry.source, manifest)
            shards = [shard for source in chosen for shard in source.shards]
            for shard in shards:
                if (directory, shard.tokens_file) not in verified:
                    self._check_shard(key, entry.path, directory, shard, dtype, cfg.verify)
                    verified.add((directory, shard.tokens_file))
            stream = _Stream(directory, shards, dtype, cfg.seq_len, self._files, cfg.heldout)
            if stream.n_samples < 1:
                held = f" once data.heldout={cfg.heldout} is set aside" if cfg.heldout else ""
                raise ConfigError(f"{key}.source", entry.source, f"a source with at least "
                                  f"seq_len + 1 = {cfg.seq_len + 1} tokens{held}",
                                  f"{entry.path} has {stream.tokens} tokens there")
            self.streams.append(stream)
            streams_info.append({"path": str(entry.path), "source": entry.source,
                                 "weight": float(entry.weight), "data": manifest.fingerprint()})
        self.tokenizer = next(iter(manifests.values())).tokenizer
        self.schedule = Schedule([e.weight for e in cfg.sources], cfg.seed, cfg.mix_block)
        for i, slots in enumerate(self.schedule.counts):
            if slots == 0:
                raise ConfigError(f"{prefix}.sources.{i}.weight", cfg.sources[i].weight,
                                  f"a share of at least 1/{cfg.mix_block} of the total, or a "
                                  "larger mix_block", "it gets no sample in a mixture block")
            streams_info[i]["slots"] = int(slots)
        self.components = {"seq_len": cfg.seq_len, "mix_block": cfg.mix_block,
                           "heldout": cfg.heldout, "streams": streams_info}
        self.fingerprint = fingerprint(self.components)
        self._n_samples = np.array([s.n_samples for s in self.streams], dtype=np.int64)
        self._keys: dict[tuple[int, int], np.ndarray] = {}

    @staticmethod
    def _open_manifest(key: str, path: str, directory: Path) -> fmt.Manifest:
        try:
            return fmt.read_manifest(directory)
        except ValueError as err:
            raise ConfigError(f"{key}.path", path, "a prepared data directory "
                              "(`stripes prepare` writes one)", str(err)) from None

    @staticmethod
    def _check_same_tokens(key: str, path: str, manifest: fmt.Manifest,
                           manifests: dict[Path, fmt.Manifest]) -> None:
        first_dir, first = next(iter(manifests.items()))
        for what, mine, theirs in (("dtype", manifest.dtype, first.dtype),
                                   ("tokenizer sha256", manifest.tokenizer.sha256,
                                    first.tokenizer.sha256)):
            if mine != theirs:
                raise ConfigError(f"{key}.path", path, f"directories prepared with the same "
                                  f"tokenizer and dtype as {first_dir}",
                                  f"{what} {mine} differs from {theirs}")

    @staticmethod
    def _choose(key: str, name: str | None, manifest: fmt.Manifest) -> list[fmt.SourceEntry]:
        if name is None:
            return manifest.sources
        known = [s.name for s in manifest.sources]
        if name not in known:
            raise ConfigError(f"{key}.source", name, ", ".join(known) + " (or null for all)",
                              "no such source in that directory")
        return [manifest.source(name)]

    @staticmethod
    def _check_shard(key: str, path: str, directory: Path, shard: fmt.ShardEntry,
                     dtype: np.dtype, verify: bool) -> None:
        problems = (fmt.verify_shard(directory, shard, dtype) if verify
                    else _check_sizes(directory, shard, dtype))
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ConfigError(f"{key}.path", path, "shards that match their manifest "
                              "(prepare the data again)", problems[0] + more)

    def _round_keys(self, stream: int, epoch: int) -> np.ndarray:
        if (stream, epoch) not in self._keys:
            if len(self._keys) > 64:  # old epochs are never revisited
                self._keys.clear()
            self._keys[stream, epoch] = round_keys("samples", self.cfg.seed, stream, epoch)
        return self._keys[stream, epoch]

    def locate(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(stream, window index) of global samples start .. start + count - 1, int64."""
        source, j = self.schedule.locate(start, count)
        n = self._n_samples[source]
        epoch, position = np.divmod(j, n)
        keys = np.empty((count, ROUNDS), dtype=np.uint64)
        for s, e in {(int(s), int(e)) for s, e in zip(source, epoch, strict=True)}:
            keys[(source == s) & (epoch == e)] = self._round_keys(s, e)
        return source, permute(position, n, keys)

    def read(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Global samples start .. start + count - 1 as int64 (tokens [count, T + 1],
        doc_ids [count, T]); inputs are tokens[:, :-1], targets tokens[:, 1:]."""
        return self.read_windows(*self.locate(start, count))

    def read_windows(self, streams: np.ndarray, windows: np.ndarray) -> tuple[np.ndarray,
                                                                               np.ndarray]:
        """Window windows[i] of stream streams[i], for each i: (tokens [n, T + 1], doc_ids
        [n, T]), int64. Held-out windows are those >= the stream's `first_heldout`."""
        T, count = self.seq_len, len(windows)
        tokens = np.empty((count, T + 1), dtype=np.int64)
        starts = np.zeros((count, T), dtype=np.int64)
        for row, (s, w) in enumerate(zip(streams, windows, strict=True)):
            self.streams[s].read(int(w) * T, T, tokens[row], starts[row])
        return tokens, np.cumsum(starts, axis=1, out=starts)

    def sample(self, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global sample g: (input_ids [T], targets [T], doc_ids [T]), int64."""
        tokens, doc_ids = self.read(g, 1)
        return tokens[0, :-1], tokens[0, 1:], doc_ids[0]

    def state(self, samples_consumed: int) -> dict[str, Any]:
        return {"samples_consumed": samples_consumed, "seed": self.cfg.seed,
                "fingerprint": self.fingerprint, "components": self.components}

    def resume_point(self, state: dict[str, Any]) -> int:
        """samples_consumed of a saved `state`, refused if it was saved for other data."""
        where = "loader state"
        if not isinstance(state, dict) or not {"samples_consumed", "seed", "fingerprint",
                                               "components"} <= set(state):
            raise ConfigError(where, type(state).__name__, "a dict from DataLoader.state_dict()")
        consumed = state["samples_consumed"]
        if not isinstance(consumed, int) or consumed < 0:
            raise ConfigError(f"{where}.samples_consumed", consumed, "an integer >= 0")
        changes = describe_changes(state, self.state(consumed))
        if changes:
            if not self.cfg.allow_changed_data:
                raise ConfigError(f"{self.prefix}.allow_changed_data", False, "the data, "
                                  "mixture, seq_len and seed the state was saved with, or true "
                                  "to resume anyway", f"the data changed: {changes}")
            log.warning("resuming at sample %d although the data changed: %s", consumed, changes)
        return consumed


def fingerprint(components: dict[str, Any]) -> str:
    """sha256 over what fixes the sample order: data, sources, slots, block and seq_len (not the
    directories' paths, nor weights whose rounding gives the same slots)."""
    # "heldout_cut": the tail has been cut in tokens since 2026-12-02 (in windows before), so
    # a state saved under the old rule is told apart instead of resuming another order.
    fixed = {"seq_len": components["seq_len"], "mix_block": components["mix_block"],
             **({"heldout": components["heldout"], "heldout_cut": "tokens"}
                if components.get("heldout") else {}),
             "streams": [{k: s[k] for k in ("data", "source", "slots")}
                         for s in components["streams"]]}
    return hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()


def describe_changes(saved: dict[str, Any], now: dict[str, Any]) -> str:
    """What differs between two states' data descriptions, in words; empty if nothing."""
    changes = []
    if saved["seed"] != now["seed"]:
        changes.append(f"seed {saved['seed']} -> {now['seed']}")
    if saved["fingerprint"] == now["fingerprint"]:
        return "; ".join(changes)
    old, new = saved["components"], now["components"]
    for key, default in (("seq_len", None), ("mix_block", None), ("heldout", 0.0)):
        if old.get(key, default) != new[key]:
            changes.append(f"{key} {old.get(key, default)} -> {new[key]}")
    old_streams, new_streams = old.get("streams", []), new["streams"]
    if len(old_streams) != len(new_streams):
        changes.append(f"{len(old_streams)} sources -> {len(new_streams)}")
    for i, (a, b) in enumerate(zip(old_streams, new_streams, strict=False)):
        if a.get("source") != b["source"]:
            changes.append(f"sources.{i}.source {a.get('source')} -> {b['source']}")
        if a.get("slots") != b["slots"]:
            changes.append(f"sources.{i}.weight {a.get('weight')} -> {b['weight']}")
        if a.get("data") != b["data"]:
            changes.append(f"the tokens of {b['path']} (manifest fingerprint "
                           f"{str(a.get('data'))[:12]} -> {b['data'][:12]})")
    if not changes and new.get("heldout"):
        changes.append("the held-out tail is cut in tokens now, in windows when this state "
                       "was saved")
    return "; ".join(changes or ["the fingerprint differs (state edited by hand?)"])


class DataLoader:
    """Endless iterator of this rank's share of each global batch, as torch int64 tensors
    {input_ids, targets, doc_ids} of shape [global_batch / world_size, seq_len]."""

    def __init__(self, dataset: TokenDataset, global_batch: int, rank: int = 0,
                 world_size: int = 1, device: str | torch.device | None = None) -> None:
        require_positive("global_batch", global_batch, integer=True)
        require_positive("world_size", world_size, integer=True)
        if global_batch % world_size:
            raise ConfigError("global_batch", global_batch,
                              f"a multiple of the world size {world_size}")
        if not 0 <= rank < world_size:
            raise ConfigError("rank", rank, f"0 <= rank < world_size = {world_size}")
        self.dataset, self.global_batch = dataset, global_batch
        self.local_batch = global_batch // world_size
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device) if device is not None else None
        self.samples_consumed = 0  # global samples handed out, over all ranks

    def __iter__(self) -> DataLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        start = self.samples_consumed + self.rank * self.local_batch
        tokens, doc_ids = self.dataset.read(start, self.local_batch)
        self.samples_consumed += self.global_batch
        batch = {"input_ids": np.ascontiguousarray(tokens[:, :-1]),
                 "targets": np.ascontiguousarray(tokens[:, 1:]), "doc_ids": doc_ids}
        return {name: self._to_device(torch.from_numpy(array)) for name, array in batch.items()}

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device is None or self.device.type == "cpu":
            return tensor
        if self.device.type == "cuda":  # pinned memory lets the copy overlap compute
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def state_dict(self) -> dict[str, Any]:
        """Rank-independent and JSON-serialisable: resume on any number of ranks."""
        return self.dataset.state(self.samples_consumed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.samples_consumed = self.dataset.resume_point(state)
