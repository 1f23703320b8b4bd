"""Per-rank random-number-generator state: captured into a checkpoint, restored on resume.

Each rank draws its own random numbers (dropout, sampling, data-independent noise), so each
rank saves its own file `rng/rank-00000.pt` holding the states of python `random`, numpy's
global generator, torch's CPU generator and, where CUDA is available, the generator of this
rank's current CUDA device (not all devices: touching every GPU from every rank would create
a CUDA context on each of them).

The file holds only tensors, ints, floats, strings and None, so it loads with
`torch.load(weights_only=True)`: opening a checkpoint never runs pickled code.

Resuming on more ranks than saved the run: the new ranks have no state to restore and are
seeded from (seed, rank) instead, which is deterministic and differs per rank; this is said
once in the log. Resuming on fewer ranks leaves the extra files unused, also said once.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stripes.core.log import note_once
from stripes.data.format import write_atomic


def rng_file(directory: Path, rank: int) -> Path:
    return Path(directory) / f"rank-{rank:05d}.pt"


def capture_rng_state() -> dict[str, Any]:
    """The state of every generator this process draws from."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached_gaussian": cached},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put every generator back to `state` (as returned by `capture_rng_state`)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"], torch.cuda.current_device())
    elif "cuda" in state:
        note_once("checkpoint holds a CUDA RNG state but CUDA is not available here: "
                  "only the CPU generators were restored")
    elif torch.cuda.is_available():
        note_once("checkpoint holds no CUDA RNG state (saved without CUDA): the CUDA "
                  "generator keeps its current state")


def seed_for_rank(seed: int, rank: int) -> None:
    """Seed every generator from (seed, rank): the same pair always gives the same streams,
    and different ranks get independent ones (SeedSequence mixes both into the entropy)."""
    derived = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)  # also seeds every CUDA device


def save_rng(directory: Path, rank: int) -> None:
    """Write this rank's generator states to `directory/rank-XXXXX.pt`, atomically."""
    buffer = io.BytesIO()
    torch.save(capture_rng_state(), buffer)
    Path(directory).mkdir(parents=True, exist_ok=True)
    write_atomic(rng_file(directory, rank), buffer.getvalue())


def load_rng(directory: Path, rank: int, world_size: int, seed: int | None) -> None:
    """Restore this rank's generators from `directory`; a rank the checkpoint has no file for
    is seeded from (seed, rank). `seed` may be None only when every rank has a file."""
    saved = len(list(Path(directory).glob("rank-*.pt")))
    if saved != world_size and rank == 0:
        note_once(f"checkpoint {Path(directory).parent.name} holds RNG state for {saved} "
                  f"rank(s), this run has {world_size}: " + (
                      f"ranks {saved}..{world_size - 1} are seeded from (seed={seed}, rank)"
                      if world_size > saved else
                      f"the state of ranks {world_size}..{saved - 1} is not used"))
    path = rng_file(directory, rank)
    if path.is_file():
        restore_rng_state(torch.load(path, weights_only=True))
        return
    if seed is None:
        raise ValueError(f"{path}: no RNG state for rank {rank} and no seed to derive one "
                         "from (pass seed=, or keep `seed` in the checkpoint's config.yaml)")
    seed_for_rank(seed, rank)
