"""The `dcp` kind of checkpoint states (train/checkpoint.py): model and optimizer as
torch.distributed.checkpoint directories, and the shape check every kind of load runs first.

Why DCP with `get_state_dict(full_state_dict=False)`: every rank writes only its own shards
(FSDP2) or DCP deduplicates replicas (DDP, single), nothing is gathered on one rank, and DCP
reshards on load, so a checkpoint saved on N ranks loads on M. The same call handles plain
modules, DDP and `fully_shard` models; keys are parameter names without wrapper prefixes.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
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

from stripes.core.log import log
from stripes.train.optim import canonical_name

_OPTIONS = StateDictOptions(full_state_dict=False)
_MAX_NAMED = 5  # tensors named per kind in a mismatch message; the rest are counted


class CheckpointMismatch(ValueError):
    """The checkpoint's tensors do not fit the model; `str(err)` is one line naming them."""


class DcpStates:
    """Model (and optimizer, unless None) as torch.distributed.checkpoint directories `model/`
    and `optim/`: plain modules, DDP and FSDP2 alike, loadable on any world size."""

    kind = "dcp"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.model, self.optimizer = model, optimizer

    def save(self, directory: Path) -> None:
        if self.optimizer is None:
            raise ValueError("saving a checkpoint needs the optimizer")
        fill_optimizer_state(self.optimizer)
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


@torch.no_grad()
def fill_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter that has not stepped yet (frozen, or outside a distill stage's
    mixers) the state a fresh optimizer would start it with: zero step and moments, shaped
    like a stepped parameter's. Every checkpoint then holds every parameter's state, which
    is what loading it into a fresh optimizer expects; and a zero state updates exactly as
    no state does once the parameter trains."""
    template = next(iter(optimizer.state.values()), None)
    if template is None:
        return  # nothing stepped: DCP initialises the whole state itself
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param not in optimizer.state or not optimizer.state[param]:
                optimizer.state[param] = {
                    key: (torch.zeros_like(value) if key == "step" or value.dim() == 0
                          else torch.zeros_like(param))
                    if isinstance(value, torch.Tensor) else value
                    for key, value in template.items()}


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


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every call without a process group that it assumes one process; that is
    exactly what we mean, so silence that one message (every other warning still shows)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
        yield
