"""Training in stages: a context-length curriculum (or any change of settings) in one run.

    stages:
      - {name: short, seq_len: 256, steps: 300}
      - name: long
        seq_len: 1024
        steps: 100
        rope: {scaling: yarn, factor: 4, original_max_len: 256}  # every attention layer;
                                          # later stages keep it unless they say otherwise
        lr: 1e-3                          # default: optim.lr
        schedule: {warmup_steps: 10}      # default: schedule (merged onto it)
        global_batch_tokens: 16384        # default: the run's, the same tokens per step
        micro_batch: 4                    # default: micro_batch
        sources: [...]                    # the stage's data mixture; default: data.sources
        activation_checkpointing: block   # default: parallel.activation_checkpointing
    # The first stage may also name `init_from`: a checkpoint (or run directory) whose model
    # weights it starts from, e.g. a model pretrained at short context; optimizer fresh.
    # `kind: distill` with `distill: {...}` trains new mixers to imitate a source model's
    # attention (train/distill.py) instead of predicting tokens.

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
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import MISSING

from stripes.arch.rope import RopeConfig
from stripes.core.config import ConfigError, require_positive, to_typed
from stripes.data.loader import SourceWeight
from stripes.train.distill import DistillConfig, check_distill

if TYPE_CHECKING:
    from stripes.train.config import TrainConfig

NAME = re.compile(r"[A-Za-z0-9._-]+")
KINDS = ("train", "distill")


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
    kind: str = "train"  # one of KINDS; distill: train/distill.py
    distill: DistillConfig | None = None  # kind: distill


@dataclass(frozen=True)
class Segment:
    """Where a stage sits in the run: steps [start, end) and its place in the list."""

    name: str
    index: int
    start: int
    end: int
    init_from: str | None = None  # a checkpoint whose weights start the stage, if it is new
    kind: str = "train"
    distill: DistillConfig | None = None


def resume_step(checkpoint: Path | None, segments: list[Segment]) -> int:
    """The step a staged run resumes at (0: none), after checking that the checkpoint is one
    this list of stages wrote: the stage it names must be the one whose steps it ends
    (start < step <= end). A renamed stage, changed step counts or another run's checkpoint
    are refused in one line rather than resumed into the wrong stage."""
    from stripes.train.checkpoint import saved_record  # checkpoint -> config -> stages

    if checkpoint is None:
        return 0
    record = saved_record(checkpoint)
    step, stage = record["step"], record.get("stage", "")
    owner = next((s for s in segments if s.start < step <= s.end), None)
    if owner is None or owner.name != stage:
        where = (f"stage {owner.name!r} there" if owner else
                 f"{segments[-1].end} steps in all")
        raise ConfigError("checkpoint.resume", str(checkpoint), "a checkpoint written by "
                          "this list of stages, or checkpoint.resume=never",
                          f"it was saved at step {step} by stage {stage!r}; the stages "
                          f"have {where}")
    return step


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
    rope = carried_rope(cfg, index)
    if rope:
        for name in attention_names(cfg):
            settings = dict(out.model.mixers.get(name) or {})
            settings["rope"] = {**dict(settings.get("rope") or {}), **rope}
            out.model.mixers[name] = settings
    return out, Segment(stage.name, index, start, start + stage.steps, stage.init_from,
                        stage.kind, stage.distill)


def carried_rope(cfg: TrainConfig, index: int) -> dict[str, Any]:
    """The RoPE keys in force at stage `index`: every earlier stage's, each later one
    overriding, so a stage that names none keeps the scaling it was extended with."""
    rope: dict[str, Any] = {}
    for stage in cfg.stages[:index + 1]:
        rope.update(dict(stage.rope or {}))
    return rope


def validate_stages(cfg: TrainConfig) -> None:
    """Refuse a bad `stages` list in one line each: names, lengths that decrease, and every
    stage's resolved config (batch divisibility, RoPE keys) through TrainConfig.validate."""
    stages = cfg.stages
    if not stages:
        raise ConfigError("stages", stages, "a non-empty list of stages, or no `stages` key")
    names = [s.name for s in stages]
    for i, stage in enumerate(stages):
        key = f"stages[{i}]"
        if not NAME.fullmatch(stage.name or "") or names.index(stage.name) != i:
            raise ConfigError(f"{key}.name", stage.name, "letters, digits, '.', '_' or '-', "
                              "a name no other stage has", "it names files and log records")
        require_positive(f"{key}.seq_len", stage.seq_len, integer=True)
        require_positive(f"{key}.steps", stage.steps, integer=True)
        if stage.kind not in KINDS:
            raise ConfigError(f"{key}.kind", stage.kind, ", ".join(KINDS))
        if (stage.kind == "distill") != (stage.distill is not None):
            raise ConfigError(f"{key}.distill", stage.distill, "{source, source_layers, "
                              "target_layers} with kind: distill, else nothing")
        if stage.distill is not None:
            check_distill(stage.distill, cfg.model, cfg.parallel.backend, f"{key}.distill")
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
        rope = carried_rope(cfg, i)
        if rope.get("scaling") == "yarn" and "original_max_len" not in rope:
            raise ConfigError(f"{key}.rope.original_max_len", None, "the length the model "
                              "was trained at before its context was extended",
                              "yarn needs it")
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
    for i, stage in enumerate(stages):
        try:
            resolved, _ = stage_config(cfg, i)
            resolved.validate()
            resolved.batch_plan(1)  # the world size is checked when the run starts
        except ConfigError as err:
            raise ConfigError(f"stages[{i}] ({stage.name}): {err.key}", err.value,
                              err.allowed, err.reason) from None
        if resolved.schedule.warmup_steps > stage.steps:
            raise ConfigError(f"stages[{i}] ({stage.name}): schedule.warmup_steps",
                              resolved.schedule.warmup_steps, f"0..{stage.steps}, the "
                              "stage's steps", "each stage's schedule spans its own steps")
