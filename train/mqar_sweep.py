"""`stripes eval mqar CONFIG`: train small models of several stripe patterns and widths on
multi-query associative recall (train/mqar.py) and tabulate their accuracy.

    mqar:
      task: {vocab_size: 64, seq_len: 64, num_pairs: 8}
      train: {steps: 2000, batch_size: 64, lr: 3.0e-3, ...}
      widths: [32, 64, 128]                    # d_model of every model
      models:                                  # name -> model settings (configs/arch keys)
        attention: {stripes: [attn], mixers: {attn: {n_heads: 2}}}
        hyena: {arch: configs/arch/hyena-125m.yaml, n_layers: 2}   # a file, then changes
    output: runs/mqar

Each model is `model:` keys merged onto MODEL_DEFAULTS (or onto the `arch:` file's model),
with d_model set to each width and vocab_size / max_seq_len to the task's. Every run writes
OUTPUT/results.json when it ends, so a rerun of the same config skips the runs already done;
then OUTPUT/results.md (accuracy per model and width) and OUTPUT/accuracy.png (matplotlib).
Models are trained in float32 on one device, each from the same seed and on the same batches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import MISSING

from stripes.arch.config import ModelConfig
from stripes.arch.model import StripedLM
from stripes.core.config import ConfigError, read_yaml, require_positive, to_typed
from stripes.data.format import write_atomic
from stripes.train.mqar import MqarTask, mqar_accuracy, mqar_batch
from stripes.train.plot import new_figure, save_png

MODEL_DEFAULTS = {"n_layers": 2, "mlp": {"kind": "swiglu", "hidden_mult": 2.0,
                                         "multiple_of": 16}}


@dataclass
class MqarTraining:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-3  # peak; linear warmup over warmup_fraction, then cosine to 0
    warmup_fraction: float = 0.1
    weight_decay: float = 0.1
    eval_samples: int = 1024  # fresh samples scored at the end
    seed: int = 0

    def validate(self, key: str) -> None:
        for name in ("steps", "batch_size", "eval_samples"):
            require_positive(f"{key}.{name}", getattr(self, name), integer=True)
        require_positive(f"{key}.lr", self.lr)
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"{key}.warmup_fraction", self.warmup_fraction, "in [0, 1)")


@dataclass
class MqarSweep:
    task: MqarTask = field(default_factory=MqarTask)
    train: MqarTraining = field(default_factory=MqarTraining)
    widths: list[int] = field(default_factory=lambda: [64])
    models: dict[str, Any] = MISSING


@dataclass
class MqarFile:
    mqar: MqarSweep = MISSING
    output: str = "runs/mqar"
    device: str = "cpu"


def model_config(name: str, raw: Any, width: int, task: MqarTask) -> ModelConfig:
    """The model `name` at `width`, validated: MODEL_DEFAULTS or its `arch:` file, then its
    own keys, then d_model / vocab_size / max_seq_len from the sweep."""
    key = f"mqar.models.{name}"
    if not isinstance(raw, dict):
        raise ConfigError(key, raw, "a mapping of model settings (configs/arch keys), "
                          "optionally with `arch: FILE`")
    raw = dict(raw)
    base: Any = MODEL_DEFAULTS
    if "arch" in raw:
        base = read_yaml(Path(str(raw.pop("arch")))).get("model", {})
    fixed = {"d_model": width, "vocab_size": task.vocab_size, "max_seq_len": task.seq_len}
    cfg = to_typed(ModelConfig, base, raw, fixed, prefix=key)
    cfg.expand(key)
    return cfg


def train_one(cfg: ModelConfig, task: MqarTask, training: MqarTraining,
              device: torch.device) -> dict[str, Any]:
    """Train a fresh model on fresh batches; {"accuracy", "loss", "params", "seconds"}."""
    torch.manual_seed(training.seed)
    model = StripedLM(cfg).to(device)
    model.init_weights()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": training.weight_decay},
                                   {"params": other, "weight_decay": 0.0}], lr=training.lr)
    data = torch.Generator().manual_seed(training.seed + 1)
    start, loss = time.perf_counter(), torch.tensor(float("nan"))
    for step in range(training.steps):
        for group in optimizer.param_groups:
            group["lr"] = training.lr * _lr_factor(step, training)
        inputs, targets = mqar_batch(task, training.batch_size, data)
        loss = model.loss(inputs.to(device), targets.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    scored = torch.Generator().manual_seed(training.seed + 2)
    accuracy = mqar_accuracy(model, task, training.eval_samples, training.batch_size, scored,
                             device)
    return {"accuracy": accuracy, "loss": float(loss.detach()), "params": model.num_params(),
            "seconds": round(time.perf_counter() - start, 2)}


def _lr_factor(step: int, training: MqarTraining) -> float:
    warmup = math.ceil(training.warmup_fraction * training.steps)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, training.steps - warmup)))


def run_sweep(cfg: MqarFile, log=print) -> list[dict[str, Any]]:
    """Train every model at every width (skipping runs done by an earlier call with the same
    settings), write OUTPUT/results.json, results.md and accuracy.png; return the rows."""
    sweep, out = cfg.mqar, Path(cfg.output)
    sweep.task.validate("mqar.task")
    sweep.train.validate("mqar.train")
    for i, width in enumerate(sweep.widths):
        require_positive(f"mqar.widths[{i}]", width, integer=True)
    if not sweep.models:
        raise ConfigError("mqar.models", sweep.models, "at least one name: model settings")
    configs = {(name, width): model_config(name, raw, width, sweep.task)
               for name, raw in sweep.models.items() for width in sweep.widths}  # all checked
    settings = {"task": dataclasses.asdict(sweep.task), "train": dataclasses.asdict(sweep.train)}
    done = _earlier_rows(out / "results.json", settings)
    rows = []
    for (name, width), model_cfg in configs.items():
        model_raw = json.loads(json.dumps(dataclasses.asdict(model_cfg)))  # as saved
        row = next((r for r in done if r["name"] == name and r["model"] == model_raw), None)
        if row is None:
            row = {"name": name, "width": width, "model": model_raw,
                   **train_one(model_cfg, sweep.task, sweep.train, torch.device(cfg.device))}
        rows.append(row)
        log(f"mqar {name} d_model={width}: accuracy {row['accuracy']:.3f} "
            f"({row['params']:,} parameters, {row['seconds']} s)")
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "results.json", json.dumps({**settings, "runs": rows},
                                                      indent=1).encode())
    write_atomic(out / "results.md", results_table(rows, sweep.widths).encode())
    draw_accuracy(rows, out / "accuracy.png", sweep.task)  # last: needs matplotlib
    return rows


def _earlier_rows(path: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError("output", str(path.parent), "a directory whose results.json this "
                          "command wrote", f"results.json does not parse ({err.msg}); move "
                          "it away to start over") from None
    same = all(saved.get(k) == v for k, v in settings.items())
    return saved.get("runs", []) if same else []


def results_table(rows: list[dict[str, Any]], widths: list[int]) -> str:
    """Markdown: one row per model, one accuracy column per width."""
    names = list(dict.fromkeys(r["name"] for r in rows))
    acc = {(r["name"], r["width"]): r["accuracy"] for r in rows}
    lines = ["| model | " + " | ".join(f"d_model {w}" for w in widths) + " |",
             "|---|" + "---:|" * len(widths)]
    lines += [f"| {n} | " + " | ".join(f"{acc[n, w]:.3f}" if (n, w) in acc else "-"
                                       for w in widths) + " |" for n in names]
    return "\n".join(lines) + "\n"


def draw_accuracy(rows: list[dict[str, Any]], out: Path, task: MqarTask) -> Path:
    """Accuracy against d_model, one line per model (log-2 width axis)."""
    fig = new_figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for name in dict.fromkeys(r["name"] for r in rows):
        mine = sorted((r["width"], r["accuracy"]) for r in rows if r["name"] == name)
        ax.plot([w for w, _ in mine], [a for _, a in mine], marker="o", label=name)
    ax.set_xscale("log", base=2)
    widths = sorted({r["width"] for r in rows})
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.minorticks_off()
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("d_model")
    ax.set_ylabel("accuracy at the answers")
    ax.set_title(f"MQAR: {task.num_pairs} pairs, {task.seq_len} tokens, vocab "
                 f"{task.vocab_size}")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_png(fig, out)
