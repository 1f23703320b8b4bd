"""The training config: one typed tree, loaded by `core.config.load_config`.

    arch: configs/arch/tiny.yaml        # optional: a model YAML merged under `model` first
    model: {...}                        # or inline (overrides what `arch` gave)
    data: {seq_len: 256, sources: [{path: runs/data/demo}]}
    steps: 200
    global_batch_tokens: 16384          # per optimizer step, over all ranks
    micro_batch: 8                      # sequences per forward on one rank
    optim: {lr: 3e-3, weight_decay: 0.1}
    schedule: {kind: cosine, warmup_steps: 20, min_lr_ratio: 0.1}
    checkpoint: {every_steps: 100, keep_last: 2}
    eval: {every_steps: 100}            # on data.heldout's tail of each source (train/evaluate.py)
    output_dir: runs/demo
    stages: [...]                       # optional: a curriculum in one run (train/stages.py);
                                        # then `steps` is their sum and may be left out

Derived once (`TrainConfig.batch_plan`): sequences per global batch = global_batch_tokens /
seq_len, and gradient accumulation = that / (micro_batch x world size); each must divide
exactly, or the config is refused with the numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING

from stripes.arch.config import ModelConfig
from stripes.core.config import (
    ConfigError,
    parse_overrides,
    read_yaml,
    require_positive,
    to_typed,
)
from stripes.data.loader import LoaderConfig, SourceWeight
from stripes.train.freeze import FreezeConfig, validate_freeze
from stripes.train.passkey import min_length
from stripes.train.stages import StageConfig, validate_stages

SCHEDULES = ("cosine", "wsd", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
BACKENDS = ("auto", "single", "ddp", "fsdp", "deepspeed")
ACTIVATION_CHECKPOINTING = ("none", "block", "selective")  # train/recompute.py


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1  # not applied to norms, biases, embeddings, declared params
    fused: bool | None = None  # None: fused AdamW on CUDA, the foreach one elsewhere


@dataclass
class ScheduleConfig:
    kind: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    warmup_steps: int = 0  # linear from 0 to lr
    min_lr_ratio: float = 0.1  # final lr = lr x min_lr_ratio (cosine, wsd)
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    every_minutes: float | None = None  # also save when this much time passed since the last
    keep_last: int = 3  # older complete checkpoints are deleted
    resume: str = "auto"  # auto: from output_dir/checkpoints/latest if any; never; or a path


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0: never; also after the last step when > 0
    samples: int = 64  # windows per source: the same ones at every evaluation
    micro_batch: int | None = None  # None: the training micro_batch
    sources: list[SourceWeight] | None = None  # None: the held-out tail of data.sources
    # When a stage ends (train/stage_eval.py): held-out loss by context position, and
    # passkey retrieval (train/passkey.py) at these depths of the stage's length.
    at_stage_end: bool = True
    passkey_depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    passkey_samples: int = 16  # per depth; 0: no passkey
    passkey_key_len: int = 4


@dataclass
class DeepSpeedConfig:
    """`parallel.backend: deepspeed` (train/deepspeed_engine.py)."""

    zero_stage: int = 2  # 1: optimizer state sharded; 2: + gradients; 3: + parameters
    offload_optimizer: bool = False  # optimizer state and step in CPU memory
    config: str | None = None  # a DeepSpeed JSON merged over the generated config (wins)


@dataclass
class FsdpConfig:
    """`parallel.backend: fsdp` (train/parallel.py)."""

    # false: blocks compute under bf16 autocast over all-gathered float32 parameters, the same
    # numbers as single/ddp/deepspeed. true: all-gather bf16 copies (half the traffic), so the
    # residual stream and norms run in bf16; measured to learn hybrid-1b worse (BENCHMARKS.md).
    bf16_params: bool = False


@dataclass
class ParallelConfig:
    backend: str = "auto"  # auto | single | ddp | fsdp | deepspeed
    activation_checkpointing: str = "none"  # none | block | selective
    compile: bool = False
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    data: LoaderConfig = MISSING
    steps: int | None = None  # required without stages; with them, their sum
    global_batch_tokens: int = MISSING
    micro_batch: int = 1
    output_dir: str = MISSING
    arch: str | None = None  # model YAML merged under `model` before the rest of this file
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    document_masking: bool = True  # attention and mixers do not cross packed documents
    precision: str = "auto"  # bf16: autocast over float32 weights; fp32; auto: bf16 on CUDA
    grad_clip: float | None = 1.0  # max global grad norm; null: no clipping
    seed: int = 0
    log_every: int = 10
    max_bad_steps: int = 5  # halt after this many non-finite steps in a row
    device: str = "auto"  # auto: cuda when available, else cpu
    stages: list[StageConfig] | None = None  # train/stages.py
    freeze: list[FreezeConfig] = field(default_factory=list)  # train/freeze.py

    def validate(self) -> None:
        if self.stages is not None:
            validate_stages(self)  # each stage's resolved config goes through the rest
            self.steps = sum(stage.steps for stage in self.stages)
            return
        if self.steps is None:
            raise ConfigError("steps", None, "a positive integer", "required without stages")
        self.model.expand("model")
        self.data.validate("data")
        for name in ("steps", "global_batch_tokens", "micro_batch", "log_every",
                     "max_bad_steps"):
            require_positive(name, getattr(self, name), integer=True)
        require_positive("optim.lr", self.optim.lr)
        require_positive("optim.eps", self.optim.eps)
        if len(self.optim.betas) != 2 or not all(0 <= b < 1 for b in self.optim.betas):
            raise ConfigError("optim.betas", self.optim.betas, "two numbers in [0, 1)")
        if not 0 <= self.optim.weight_decay < 1e3:
            raise ConfigError("optim.weight_decay", self.optim.weight_decay, "a number >= 0")
        _choice("schedule.kind", self.schedule.kind, SCHEDULES)
        if not 0 <= self.schedule.warmup_steps <= self.steps:
            raise ConfigError("schedule.warmup_steps", self.schedule.warmup_steps,
                              f"0..steps={self.steps}")
        if not 0 <= self.schedule.min_lr_ratio <= 1:
            raise ConfigError("schedule.min_lr_ratio", self.schedule.min_lr_ratio, "0..1")
        if not 0 < self.schedule.decay_fraction <= 1:
            raise ConfigError("schedule.decay_fraction", self.schedule.decay_fraction,
                              "a number in (0, 1]")
        require_positive("checkpoint.every_steps", self.checkpoint.every_steps, integer=True)
        require_positive("checkpoint.keep_last", self.checkpoint.keep_last, integer=True)
        if self.checkpoint.every_minutes is not None:
            require_positive("checkpoint.every_minutes", self.checkpoint.every_minutes)
        _choice("parallel.backend", self.parallel.backend, BACKENDS)
        _choice("parallel.activation_checkpointing", self.parallel.activation_checkpointing,
                ACTIVATION_CHECKPOINTING)
        _choice("precision", self.precision, PRECISIONS)
        if self.parallel.deepspeed.zero_stage not in (1, 2, 3):
            raise ConfigError("parallel.deepspeed.zero_stage", self.parallel.deepspeed.zero_stage,
                              "1, 2 or 3")
        self._validate_eval()
        validate_freeze(self.freeze, self.parallel.backend)
        if self.grad_clip is not None:
            require_positive("grad_clip", self.grad_clip)

    def _validate_eval(self) -> None:
        if not isinstance(self.eval.every_steps, int) or self.eval.every_steps < 0:
            raise ConfigError("eval.every_steps", self.eval.every_steps, "an integer >= 0 "
                              "(0: never)")
        require_positive("eval.samples", self.eval.samples, integer=True)
        if self.eval.micro_batch is not None:
            require_positive("eval.micro_batch", self.eval.micro_batch, integer=True)
        if not all(0 <= d <= 1 for d in self.eval.passkey_depths):
            raise ConfigError("eval.passkey_depths", self.eval.passkey_depths,
                              "fractions of the context in [0, 1]")
        if not isinstance(self.eval.passkey_samples, int) or self.eval.passkey_samples < 0:
            raise ConfigError("eval.passkey_samples", self.eval.passkey_samples,
                              "an integer >= 0 (0: no passkey)")
        require_positive("eval.passkey_key_len", self.eval.passkey_key_len, integer=True)
        if self.eval.passkey_samples and self.data.seq_len < min_length(
                self.eval.passkey_key_len):
            raise ConfigError("eval.passkey_key_len", self.eval.passkey_key_len,
                              f"at most {(self.data.seq_len - 1) // 2} at data.seq_len="
                              f"{self.data.seq_len}", "the key must fit in twice")
        if self.eval.sources is not None:
            LoaderConfig(seq_len=self.data.seq_len, sources=self.eval.sources).validate("eval")
        elif self.eval.every_steps and not self.data.heldout:
            raise ConfigError("eval.sources", None, "a list of {path, source} to evaluate on, "
                              "or data.heldout > 0 to hold out the tail of data.sources",
                              "eval.every_steps is set but nothing is held out")

    def batch_plan(self, world_size: int) -> tuple[int, int]:
        """(sequences per global batch, gradient-accumulation steps) for `world_size` ranks."""
        seq_len = self.data.seq_len
        if self.global_batch_tokens % seq_len:
            raise ConfigError("global_batch_tokens", self.global_batch_tokens,
                              f"a multiple of data.seq_len={seq_len}")
        sequences = self.global_batch_tokens // seq_len
        per_step = self.micro_batch * world_size
        if sequences % per_step:
            raise ConfigError("global_batch_tokens", self.global_batch_tokens,
                              f"a multiple of seq_len x micro_batch x world size = "
                              f"{seq_len} x {self.micro_batch} x {world_size}",
                              f"{sequences} sequences do not split into micro-batches")
        return sequences, sequences // per_step


def load_train_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a training YAML: the file named by `arch` (from the file or the command line)
    is merged under `model` first, then the file itself, then the overrides."""
    file_cfg, cli_cfg = read_yaml(Path(path)), parse_overrides(overrides)
    arch = cli_cfg.get("arch", file_cfg.get("arch"))
    layers = [{"model": read_yaml(Path(arch)).get("model", {})}] if arch else []
    cfg = to_typed(TrainConfig, *layers, file_cfg, cli_cfg, prefix="")
    cfg.validate()
    return cfg


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, value, ", ".join(allowed))
