"""Checkpoints: one directory per saved step, published by rename, loadable on any world size.

    OUT/checkpoints/
      latest                 text: the name of the newest complete checkpoint (atomic rewrite)
      step-000100/
        trainer.json         {format, step, world_size, saved_at, trainer: <caller's dict>}
        config.yaml          the resolved training config
        model/               torch.distributed.checkpoint (DCP) of the model state dict
        optim/               DCP of the optimizer state dict (parameter names as keys)
        rng/rank-00000.pt    one per rank (train/rng.py)

Why DCP with `get_state_dict(full_state_dict=False)`: every rank writes only its own shards
(FSDP2) or DCP deduplicates replicas (DDP, single), nothing is gathered on one rank, and DCP
reshards on load, so a checkpoint saved on N ranks loads on M. The same call handles plain
modules, DDP and `fully_shard` models; keys are parameter names without wrapper prefixes.

Atomicity: everything is written into `step-000100.tmp/`; after a barrier rank 0 renames it
to `step-000100/`, then rewrites `latest`, then deletes checkpoints older than the newest
`keep_last`. A process killed at any moment therefore leaves `latest` naming a complete
checkpoint: a directory without `.tmp` is complete by construction. Deletion renames to
`*.tmp` first, so a kill mid-delete leaves nothing that looks complete; the next save sweeps
every `*.tmp` left behind, and loading never looks at one. All ranks must see one shared
filesystem (true on one node; on several, OUT must be on shared storage).

    states = DcpStates(model, optimizer)   # or the DeepSpeed engine's (train/deepspeed.py)
    path = save_checkpoint(out, step, states, trainer_state, config_yaml, keep_last)
    found = find_checkpoint(out, cfg.checkpoint.resume)   # None: start from scratch
    trainer_state = load_checkpoint(found, states)        # also restores this rank's RNG

`states` writes and reads the model and optimizer part: `DcpStates` below for single, DDP
and FSDP; DeepSpeed's own format for its engine. trainer.json records which (`states`), so a
checkpoint is never read by the wrong reader.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from stripes.core.config import ConfigError, require_positive
from stripes.core.log import log
from stripes.data.format import write_atomic
from stripes.train.optim import canonical_name
from stripes.train.rng import load_rng, save_rng

FORMAT = "stripes-checkpoint/1"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
TMP = ".tmp"
_STEP_DIR = re.compile(r"step-(\d+)")
_OPTIONS = StateDictOptions(full_state_dict=False)
_MAX_NAMED = 5  # tensors named per kind in a mismatch message; the rest are counted


class States(Protocol):
    """The model and optimizer part of a checkpoint, written into / read from a directory by
    every rank (collective). `kind` names the format in trainer.json."""

    kind: str

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path, saved_kind: str) -> None: ...


class CheckpointMismatch(ValueError):
    """The checkpoint's tensors do not fit the model; `str(err)` is one line naming them."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(run_dir: str | Path, step: int, states: States,
                    trainer_state: Mapping[str, Any], config_yaml: str | Mapping[str, Any],
                    keep_last: int) -> Path:
    """Save on every rank (collective when a process group exists); returns the published
    directory. `trainer_state`: JSON-serialisable caller state (tokens seen, data-loader
    state, counters...); `config_yaml`: the resolved config as YAML text or a mapping."""
    require_positive("keep_last", keep_last, integer=True)
    rank, world_size = _rank_world()
    # Serialised on every rank before anything is written or any barrier is entered, so bad
    # input fails the same way everywhere instead of leaving the other ranks waiting.
    trainer_json = _trainer_json(step, trainer_state, world_size, states.kind)
    config_text = _config_text(config_yaml)
    root = Path(run_dir) / CHECKPOINTS
    name = checkpoint_name(step)
    tmp, final = root / f"{name}{TMP}", root / name
    started = time.perf_counter()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _sweep_stale(root)
        tmp.mkdir()
        write_atomic(tmp / "trainer.json", trainer_json.encode())
        write_atomic(tmp / "config.yaml", config_text.encode())
    _barrier()
    states.save(tmp)
    save_rng(tmp / "rng", rank)
    _barrier()
    if rank == 0:
        _publish(tmp, final)
        _write_latest(root, name)
        _prune(root, keep_last)
        log.info("saved checkpoint %s (%.1f s)", final, time.perf_counter() - started)
    _barrier()
    return final


def find_checkpoint(run_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint to resume from: resume="auto" (what `latest` names, None when there is
    none), "never" (None) or the path of a checkpoint directory, which must exist."""
    policies: dict[str, Callable[[Path], Path | None]] = {"auto": _latest, "never": _no_resume}
    if resume in policies:
        return policies[resume](Path(run_dir))
    path = Path(resume)
    problem = _incomplete(path)
    if problem:
        raise ConfigError("checkpoint.resume", resume,
                          "auto, never, or a checkpoint directory such as "
                          f"{Path(run_dir) / CHECKPOINTS / checkpoint_name(100)}", problem)
    return path


def load_checkpoint(path: str | Path, states: States, seed: int | None = None) -> dict[str, Any]:
    """Load the model (and optimizer) state through `states` on every rank, restore this
    rank's RNG, and return the caller's trainer state with `step` added.

    `seed`: for ranks the checkpoint has no RNG state for (resuming on more ranks); None
    takes `seed` from the checkpoint's config.yaml. A checkpoint whose tensors do not fit the
    model raises `CheckpointMismatch` (one line) before anything is loaded."""
    path = Path(path)
    problem = _incomplete(path)
    if problem:
        raise ValueError(f"{path}: {problem}")
    saved = json.loads((path / "trainer.json").read_text())
    if saved.get("format") != FORMAT:
        raise ValueError(f"{path / 'trainer.json'}: format {saved.get('format')!r}, "
                         f"expected {FORMAT!r}")
    rank, world_size = _rank_world()
    states.load(path, saved.get("states", DcpStates.kind))
    if seed is None:
        config = yaml.safe_load((path / "config.yaml").read_text())
        seed = config.get("seed") if isinstance(config, dict) else None
    load_rng(path / "rng", rank, world_size, seed)
    _barrier()
    return {**saved["trainer"], "step": saved["step"]}


# -- saving -----------------------------------------------------------------------------------
def _trainer_json(step: int, trainer_state: Mapping[str, Any], world_size: int,
                  kind: str) -> str:
    if trainer_state.get("step", step) != step:
        raise ValueError(f"trainer_state step={trainer_state['step']} differs from the "
                         f"checkpoint's step={step}")
    record = {"format": FORMAT, "step": step, "world_size": world_size, "states": kind,
              "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "trainer": dict(trainer_state)}
    try:
        return json.dumps(record, indent=1)
    except (TypeError, ValueError) as err:
        raise ValueError(f"trainer_state is not JSON-serialisable: {err}") from None


def _config_text(config: str | Mapping[str, Any]) -> str:
    if isinstance(config, Mapping):
        return yaml.safe_dump(dict(config), sort_keys=False)
    try:
        yaml.safe_load(config)
    except yaml.YAMLError as err:
        raise ValueError(f"config_yaml is not valid YAML: {str(err).splitlines()[0]}") from None
    return config


def _sweep_stale(root: Path) -> None:
    """Remove what a killed save or prune left: `*.tmp` directories and `latest` temporaries
    (write_atomic names them `.latest.tmp-PID`)."""
    for entry in root.iterdir():
        if entry.is_dir() and entry.name.endswith(TMP):
            log.info("removing %s (left by an interrupted save)", entry)
            shutil.rmtree(entry)
        elif entry.name.startswith(f".{LATEST}.tmp-"):
            entry.unlink()


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished `tmp` to `final`. A checkpoint of the same step already there
    (a run resumed from an older one, or a step saved twice) is replaced: moved to a `.tmp`
    name, then deleted. This is the one case not proof against a kill: between the two
    renames `latest` may name a directory that is momentarily absent (find_checkpoint then
    says so in one line); a directory rename cannot be swapped atomically portably."""
    if final.exists():
        log.info("replacing %s with a new save of the same step", final)
        old = final.with_name(f"{final.name}.old{TMP}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def _write_latest(root: Path, name: str) -> None:
    write_atomic(root / LATEST, f"{name}\n".encode())
    _fsync_dir(root)


def _prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (never what `latest` names).
    Each goes to a `.tmp` name first, so a kill mid-delete leaves nothing that looks whole."""
    complete = sorted(_complete_steps(root), key=lambda item: item[0])
    keep = {name for _, name in complete[-keep_last:]} | {_read_latest(root)}
    for _, name in complete:
        if name not in keep:
            doomed = root / f"{name}.old{TMP}"
            os.replace(root / name, doomed)
            shutil.rmtree(doomed)


def _complete_steps(root: Path) -> list[tuple[int, str]]:
    return [(int(match.group(1)), entry.name) for entry in root.iterdir()
            if entry.is_dir() and (match := _STEP_DIR.fullmatch(entry.name))]


def _fsync_dir(directory: Path) -> None:
    """Make renames inside `directory` durable (a process kill does not need it; a power loss
    does)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- finding and loading ----------------------------------------------------------------------
def _no_resume(run_dir: Path) -> None:
    return None


def _latest(run_dir: Path) -> Path | None:
    root = run_dir / CHECKPOINTS
    if not (root / LATEST).is_file():
        return None
    path = root / _read_latest(root)
    problem = _incomplete(path)
    if problem:
        raise ValueError(f"{root / LATEST} names {path.name}, but {problem}")
    return path


def _read_latest(root: Path) -> str:
    return (root / LATEST).read_text().strip() if (root / LATEST).is_file() else ""


def _incomplete(path: Path) -> str:
    """Why `path` is not a complete checkpoint ("" when it is)."""
    if not path.is_dir():
        return "no such directory"
    if path.name.endswith(TMP):
        return "an unfinished save (*.tmp)"
    needed = ["trainer.json", "config.yaml", "rng"]
    if (path / "trainer.json").is_file():
        kind = json.loads((path / "trainer.json").read_text()).get("states", DcpStates.kind)
        needed += _STATE_PARTS.get(kind, [])
    missing = [part for part in needed if not (path / part).exists()]
    return f"not a complete checkpoint (missing {', '.join(missing)})" if missing else ""


# What each kind of States writes, by the `states` key of trainer.json.
_STATE_PARTS = {"dcp": ["model/.metadata", "optim/.metadata"], "deepspeed": ["deepspeed"]}


class DcpStates:
    """Model (and optimizer, unless None) as torch.distributed.checkpoint directories `model/`
    and `optim/`: plain modules, DDP and FSDP2 alike, loadable on any world size."""

    kind = "dcp"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.model, self.optimizer = model, optimizer

    def save(self, directory: Path) -> None:
        if self.optimizer is None:
            raise ValueError("saving a checkpoint needs the optimizer")
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=_OPTIONS)
        with _single_process_quiet():
            no_dist = not dist.is_initialized()
            dcp.save(model_state, checkpoint_id=directory / "model", no_dist=no_dist)
            dcp.save(optim_state, checkpoint_id=directory / "optim", no_dist=no_dist)

    def load(self, directory: Path, saved_kind: str) -> None:
        """Check that the saved tensors fit, then load them in place (DCP reshards). From a
        DeepSpeed checkpoint: its consolidated weights, and a fresh optimizer."""
        model, optimizer = self.model, self.optimizer
        if saved_kind == "deepspeed":
            _load_full_weights(model, _deepspeed_weights(directory), directory)
            if optimizer is not None:
                log.info("%s: a deepspeed checkpoint: weights loaded, the optimizer starts "
                         "fresh", directory)
            return
        if saved_kind != self.kind:
            raise CheckpointMismatch(f"{directory}: a {saved_kind!r} checkpoint, which this "
                                     "backend cannot read")
        with _single_process_quiet():
            no_dist = not dist.is_initialized()
            if optimizer is None:
                model_state = get_model_state_dict(model, options=_OPTIONS)
                _check_fits(directory, "model", model_state)
                dcp.load(model_state, checkpoint_id=directory / "model", no_dist=no_dist)
                set_model_state_dict(model, model_state, options=_OPTIONS)
                return
            model_state, optim_state = get_state_dict(model, optimizer, options=_OPTIONS)
            _check_fits(directory, "model", model_state)
            _check_fits(directory, "optim", _optimizer_tensors(optim_state))
            dcp.load(model_state, checkpoint_id=directory / "model", no_dist=no_dist)
            # Partial: a hyperparameter key that this torch version adds to param_groups but
            # the saving version lacked keeps its default; every state tensor was checked.
            dcp.load(optim_state, checkpoint_id=directory / "optim", no_dist=no_dist,
                     planner=DefaultLoadPlanner(allow_partial_load=True))
            set_state_dict(model, optimizer, model_state_dict=model_state,
                           optim_state_dict=optim_state, options=_OPTIONS)


def read_dcp_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The full model tensors of a DCP checkpoint, by name, on the CPU of every rank."""
    metadata = dcp.FileSystemReader(str(directory / "model")).read_metadata()
    weights = {key: torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
               for key, entry in metadata.state_dict_metadata.items()
               if isinstance(entry, TensorStorageMetadata)}
    with _single_process_quiet():
        dcp.load(weights, checkpoint_id=directory / "model", no_dist=not dist.is_initialized())
    return weights


def _deepspeed_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The consolidated float32 weights of a DeepSpeed checkpoint (any ZeRO stage)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # It prints a line per file and a progress bar; errors still raise.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        weights = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag="deepspeed")
    return {canonical_name(name): tensor for name, tensor in weights.items()}


def _load_full_weights(model: nn.Module, weights: dict[str, torch.Tensor],
                       directory: Path) -> None:
    """Full tensors into `model` (plain, DDP or FSDP2-sharded), refusing a misfit by name."""
    expected = get_model_state_dict(model, options=_OPTIONS)
    check_shapes(directory, "model", {k: tuple(v.shape) for k, v in weights.items()},
                 {k: tuple(v.shape) for k, v in expected.items()})
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))


def _optimizer_tensors(optim_state: dict[str, Any]) -> dict[str, Any]:
    """The optimizer's state tensors under the flat keys DCP stores them by
    (`state.<parameter>.<name>`); param_groups hold hyperparameters, not shapes."""
    return {f"state.{param}.{key}": value for param, entries in optim_state["state"].items()
            for key, value in entries.items() if isinstance(value, torch.Tensor)}


def _check_fits(path: Path, part: str, expected: Mapping[str, Any]) -> None:
    """Compare the saved tensors of `path/part` with `expected` (name -> tensor) by name and
    global shape; raise CheckpointMismatch naming the differences."""
    metadata = dcp.FileSystemReader(str(path / part)).read_metadata().state_dict_metadata
    saved = {key: tuple(entry.size) for key, entry in metadata.items()
             if isinstance(entry, TensorStorageMetadata)
             and (part == "model" or key.startswith("state."))}
    wanted = {key: tuple(value.shape) for key, value in expected.items()
              if isinstance(value, torch.Tensor)}
    check_shapes(path / part, "model" if part == "model" else "optimizer", saved, wanted)


def check_shapes(where: Path, what: str, saved: Mapping[str, tuple[int, ...]],
                 wanted: Mapping[str, tuple[int, ...]]) -> None:
    """Raise CheckpointMismatch naming the tensors missing, unexpected or shaped otherwise."""
    shapes = [f"{key} saved {list(saved[key])} vs {list(wanted[key])}"
              for key in sorted(saved.keys() & wanted.keys()) if saved[key] != wanted[key]]
    problems = [f"{label} {len(names)} ({_capped(names)})" for label, names in
                (("missing", sorted(wanted.keys() - saved.keys())),
                 ("unexpected", sorted(saved.keys() - wanted.keys())),
                 ("shape-mismatched", shapes)) if names]
    if problems:
        raise CheckpointMismatch(f"{where}: checkpoint does not fit this {what}: "
                                 + "; ".join(problems))


def _capped(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_NAMED])
    return shown + (f", ... and {len(items) - _MAX_NAMED} more" if len(items) > _MAX_NAMED
                    else "")


# -- process group ----------------------------------------------------------------------------
def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every call without a process group that it assumes one process; that is
    exactly what we mean, so silence that one message (every other warning still shows)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
        yield


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
