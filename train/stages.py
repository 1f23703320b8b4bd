"""Training in stages: a context-length curriculum (or any change of settings) in one run.

    stages:
      - {name: short, seq_len: 256, steps: 300}
      - name: long
        seq_len: 1024
        steps: 100
        rope: {scaling: yarn, factor: 4, original_max_len: 256}  # every attention layer
        lr: 1e-3                          # default: optim.lr
        schedule: {warmup_steps: 10}      # default: schedule (merged onto it)
        global_batch_tokens: 16384        # default: the run's, the same tokens per step
        micro_batch: 4                    # default: micro_batch
        sources: [...]                    # the stage's data mixture; default: data.sources
        activation_checkpointing: block   # default: parallel.activation_checkpointing
    # The first stage may also name `init_from`: a checkpoint (or run directory) whose model
    # weights it starts from, e.g. a model pretrained at short context; optimizer fresh.

A run with stages trains for the sum of their steps; step numbers are global (the second
stage above runs steps 300..399) and each stage's learning-rate schedule spans its own steps.

Each stage is a segment of the run built afresh for its settings: model (with the stage's
RoPE scaling), engine and data loader, started from the checkpoint saved at the previous
stage's last step, the way any resumed run starts. The uninterrupted run and one resumed
anywhere inside any stage therefore take the same path. Nothing in a checkpoint depends on
the sequence length (RoPE angles, masks and Hyena's filters are computed for the length at
hand), so there is no checkpoint surgery between stages. A stage's data stream is its own:
seeded with data.seed + the stage's index, starting at its beginning.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import MISSING

from stripes.arch.rope import RopeConfig
from stripes.core.config import ConfigError, require_positive, to_typed
from stripes.data.loader import SourceWeight

if TYPE_CHECKING:
    from stripes.train.config import TrainConfig


@dataclass
class StageConfig:
    name: str = MISSING
    seq_len: int = MISSING
    steps: int = MISSING
    rope: dict[str, Any] | None = None  # RopeConfig keys, merged onto every attention layer's
    lr: float | None = None
    schedule: dict[str, Any] | None = None  # ScheduleConfig keys, merged onto `schedule`
    global_batch_tokens: int | None = None
    micro_batch: int | None = None
    sources: list[SourceWeight] | None = None
    activation_checkpointing: str | None = None
    init_from: str | None = None  # first stage only: weights of this checkpoint (or run)


@dataclass(frozen=True)
class Segment:
    """Where a stage sits in the run: steps [start, end) and its place in the list."""

    name: str
    index: int
    start: int
    end: int
    init_from: str | None = None  # a checkpoint whose weights start the stage, if it is new


def attention_names(cfg: TrainConfig) -> list[str]:
    """The stripe names (kinds or variants) whose layers are attention."""
    return sorted({spec.name for spec in cfg.model.expand("model") if spec.kind == "attn"})


def stage_config(cfg: TrainConfig, index: int) -> tuple[TrainConfig, Segment]:
    """The run's config as stage `index` trains with it (steps = the stage's last step + 1,
    global), and the stage's segment."""
    stage = cfg.stages[index]
    start = sum(s.steps for s in cfg.stages[:index])
    out = copy.deepcopy(cfg)
    out.stages = None
    out.steps = start + stage.steps
    out.data.seq_len = stage.seq_len
    out.data.seed = cfg.data.seed + index
    out.model.max_seq_len = max(cfg.model.max_seq_len, stage.seq_len)
    if stage.sources is not None:
        out.data.sources = copy.deepcopy(stage.sources)
    for name in ("global_batch_tokens", "micro_batch"):
        if getattr(stage, name) is not None:
            setattr(out, name, getattr(stage, name))
    if stage.lr is not None:
        out.optim.lr = stage.lr
    if stage.schedule:
        out.schedule = to_typed(type(cfg.schedule), dataclasses.asdict(cfg.schedule),
                                dict(stage.schedule), prefix="schedule")
    if stage.activation_checkpointing is not None:
        out.parallel.activation_checkpointing = stage.activation_checkpointing
    if stage.rope:
        for name in attention_names(cfg):
            settings = dict(out.model.mixers.get(name) or {})
            settings["rope"] = {**dict(settings.get("rope") or {}), **dict(stage.rope)}
            out.model.mixers[name] = settings
    return out, Segment(stage.name, index, start, start + stage.steps, stage.init_from)


def validate_stages(cfg: TrainConfig) -> None:
    """Refuse a bad `stages` list in one line each: names, lengths that decrease, and every
    stage's resolved config (batch divisibility, RoPE keys) through TrainConfig.validate."""
    stages = cfg.stages
    if not stages:
        raise ConfigError("stages", stages, "a non-empty list of stages, or no `stages` key")
    names = [s.name for s in stages]
    for i, stage in enumerate(stages):
        key = f"stages[{i}]"
        if not stage.name or names.index(stage.name) != i:
            raise ConfigError(f"{key}.name", stage.name, "a name no other stage has")
        require_positive(f"{key}.seq_len", stage.seq_len, integer=True)
        require_positive(f"{key}.steps", stage.steps, integer=True)
        if stage.init_from is not None and not Path(stage.init_from).is_dir():
            raise ConfigError(f"{key}.init_from", stage.init_from, "a stripes checkpoint "
                              "directory, or a run directory with one", "no such directory")
        if i and stage.init_from is not None:
            raise ConfigError(f"{key}.init_from", stage.init_from, "null (only the first "
                              "stage starts from outside weights)", "a later stage continues "
                              "the one before it")
        if i and stage.seq_len < stages[i - 1].seq_len:
            raise ConfigError(f"{key}.seq_len", stage.seq_len,
                              f">= the previous stage's {stages[i - 1].seq_len}",
                              "stages extend the context, never shorten it")
        if stage.rope:
            unknown = set(stage.rope) - {f.name for f in dataclasses.fields(RopeConfig)}
            if unknown:
                raise ConfigError(f"{key}.rope", sorted(unknown),
                                  ", ".join(f.name for f in dataclasses.fields(RopeConfig)),
                                  "unknown RoPE keys")
            if not attention_names(cfg):
                warnings.warn(f"{key}.rope: the model has no attention layer, so the RoPE "
                              "scaling changes nothing", stacklevel=2)
    if cfg.steps is not None and cfg.steps != sum(s.steps for s in stages):
        raise ConfigError("steps", cfg.steps, f"the sum of the stages' steps, "
                          f"{sum(s.steps for s in stages)}, or left out")
    for i in range(len(stages)):
        resolved, _ = stage_config(cfg, i)
        try:
            resolved.validate()
            resolved.batch_plan(1)
        except ConfigError as err:
            raise ConfigError(f"stages[{i}] ({stages[i].name}): {err.key}", err.value,
                              err.allowed, err.reason) from None
