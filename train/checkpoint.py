"""Checkpoints: one directory per saved step, published by rename, loadable on any world size.

    OUT/checkpoints/
      latest                 text: the name of the newest complete checkpoint (atomic rewrite)
      step-000100/
        trainer.json         {format, step, world_size, saved_at, trainer: <caller's dict>}
        config.yaml          the resolved training config
        model/               torch.distributed.checkpoint (DCP) of the model state dict
        optim/               DCP of the optimizer state dict (parameter names as keys)
        rng/rank-00000.pt    one per rank (train/rng.py)

DCP (train/dcp_states.py) reshards on load, so a checkpoint saved on N ranks loads on M.

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

`states` writes and reads the model and optimizer part: `DcpStates` (train/dcp_states.py)
for single, DDP and FSDP; DeepSpeed's own format for its engine. trainer.json records
which (`states`), so a checkpoint is never read by the wrong reader.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch.distributed as dist
import yaml

from stripes.core.config import ConfigError, require_positive
from stripes.core.log import log
from stripes.data.format import write_atomic
from stripes.train.dcp_states import CheckpointMismatch, DcpStates
from stripes.train.rng import load_rng, save_rng

__all__ = ["CheckpointMismatch", "DcpStates", "States", "find_checkpoint", "load_checkpoint",
           "load_weights", "resolve_checkpoint", "save_checkpoint", "saved_record"]

FORMAT = "stripes-checkpoint/1"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
TMP = ".tmp"
_STEP_DIR = re.compile(r"step-(\d+)")


class States(Protocol):
    """The model and optimizer part of a checkpoint, written into / read from a directory by
    every rank (collective). `kind` names the format in trainer.json."""

    kind: str

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path, saved_kind: str) -> None: ...


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


def resolve_checkpoint(path: str | Path, key: str) -> Path:
    """A complete checkpoint directory from what a user names: the directory itself, or a
    run directory (the checkpoint its `latest` names). Anything else is a ConfigError."""
    path = Path(path)
    try:
        found = (_latest(path) if (path / CHECKPOINTS).is_dir()
                 else find_checkpoint(path.parent, str(path)))
    except (ConfigError, ValueError) as err:
        reason = err.reason if isinstance(err, ConfigError) else str(err)
        raise ConfigError(key, str(path), "a checkpoint directory, or a run directory with "
                          "checkpoints/latest", reason) from None
    if found is None:
        raise ConfigError(key, str(path), "a run directory with checkpoints/latest",
                          "it has no checkpoint yet")
    return found


def load_weights(path: str | Path, model, key: str = "init_from") -> Path:
    """The model weights of a checkpoint (a checkpoint directory, or a run directory's
    latest) into an unwrapped `model`, nothing else: no optimizer, step, data or RNG.
    Returns the checkpoint read. Tensors that do not fit raise `CheckpointMismatch`."""
    path = Path(path)
    found = path if (path / "trainer.json").exists() else _latest(path)
    problem = "no checkpoint in it" if found is None else _incomplete(found)
    if problem:
        raise ConfigError(key, str(path), "a stripes checkpoint directory, or a run "
                          "directory with one", problem)
    saved = json.loads((found / "trainer.json").read_text())
    DcpStates(model, None).load(found, saved.get("states", DcpStates.kind))
    return found


def saved_record(path: str | Path) -> dict[str, Any]:
    """The caller's trainer state of a complete checkpoint with `step` added, without
    loading anything else."""
    saved = json.loads((Path(path) / "trainer.json").read_text())
    return {**saved["trainer"], "step": int(saved["step"])}


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


# -- process group ----------------------------------------------------------------------------
def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
