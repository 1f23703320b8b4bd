"""Training curves from `run_dir/metrics.jsonl`: read it as MetricsLogger writes it, draw a PNG.

The file is append-only across resumes, so one step can be logged twice: steps logged after
the last checkpoint and before a crash are logged again after the resume. The later record
is the one the run continued from, so the last record of each step wins, for step and eval
records alike. A crash mid-write leaves a last line without its newline; that torn line is
unreadable by construction and is ignored (the next MetricsLogger cuts it off anyway), but
a malformed line anywhere else means the file is not what stripes wrote and is an error.

Drawing uses matplotlib's object API on a bare `Figure` (Agg canvas): no pyplot, so no
display is ever opened and no global figure state is kept. matplotlib is an optional extra
(`pip install 'stripes[plot]'`); it is imported only when a plot is drawn.
"""

from __future__ import annotations

import importlib
import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from stripes.core.config import ConfigError, missing_key

# Float fields of a step record; MetricsLogger writes non-finite ones as "nan", "inf", "-inf".
STEP_FLOATS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time_s", "memory_gib")
_FORMAT = "JSON lines as MetricsLogger writes them"
# Per-source eval lines: any colour but the train line's blue and the eval line's black.
_SOURCE_COLORS = ("tab:orange", "tab:green", "tab:purple", "tab:pink", "tab:olive", "tab:cyan",
                  "tab:brown", "tab:gray")


@dataclass
class Metrics:
    """What a metrics.jsonl holds, last record per step, each list sorted by step."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    torn_tail_bytes: int = 0  # size of an ignored torn last line; 0 when the file ends cleanly


def read_metrics(path: str | Path) -> Metrics:
    """Parse `path` (a metrics.jsonl): step records and eval records, the last of each step.

    Float fields come back as floats, NaN and infinities included; None stays None. Events
    other than evals (checkpoint, bad_step, ...) are not returned.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    complete, _, torn = text.rpartition("\n")  # `torn`: "" when the file ends in a newline
    steps: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(complete.split("\n") if complete else [], start=1):
        record = _parse_line(line, f"{path}:{number}")
        if record.get("event") == "eval":
            evals[record["step"]] = record
        elif "event" not in record:
            steps[record["step"]] = record
    return Metrics(steps=[steps[s] for s in sorted(steps)], evals=[evals[s] for s in sorted(evals)],
                   torn_tail_bytes=len(torn.encode("utf-8")))


def _parse_line(line: str, where: str) -> dict[str, Any]:
    """One record with its floats decoded, or a ConfigError naming file and line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ConfigError("metrics", where, _FORMAT, f"not JSON ({err.msg})") from None
    if not isinstance(record, dict):
        raise ConfigError("metrics", where, _FORMAT, "not a JSON object")
    if "event" in record and record["event"] != "eval":
        return record
    required = ("step", "loss") if "event" in record else ("step", "loss", "lr")
    missing = [key for key in required if key not in record]
    if missing or not isinstance(record["step"], int):
        reason = f"missing {', '.join(missing)}" if missing else "step is not an integer"
        raise ConfigError("metrics", where, _FORMAT, reason)
    if "event" in record:  # an eval: its loss, and one loss per data source
        if not isinstance(record.get("per_source", {}), dict):
            raise ConfigError("metrics", where, _FORMAT, "per_source is not an object")
        return {**record, "loss": _number(record["loss"], where),
                "per_source": {name: _number(value, where)
                               for name, value in record.get("per_source", {}).items()}}
    return {**record, **{key: _number(record[key], where) for key in STEP_FLOATS
                         if key in record}}


def _number(value: Any, where: str) -> float | None:
    """A JSON float field: a number, None, or one of the strings "nan", "inf", "-inf"."""
    if value is None:
        return None
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ConfigError("metrics", where, _FORMAT, f"{value!r} is not a number")


def _import_matplotlib_figure() -> ModuleType:
    """`matplotlib.figure`, or a one-line error saying which extra to install."""
    try:
        return importlib.import_module("matplotlib.figure")
    except ImportError:
        raise missing_key("matplotlib", "pip install 'stripes[plot]'") from None


def draw_curves(metrics: Metrics, out: str | Path, title: str) -> Path:
    """Draw loss, learning rate, throughput (and gradient norm) against step into PNG `out`.

    Written atomically: a temporary file beside `out`, then renamed over it, so a viewer
    that reloads the PNG while training runs never sees half an image. OSError (an
    unwritable place) propagates for the caller to word.
    """
    if not metrics.steps:
        raise ValueError("draw_curves needs at least one step record")
    steps = metrics.steps
    has_grad_norm = any(_finite(r.get("grad_norm")) for r in steps)
    panels = 4 if has_grad_norm else 3
    fig = new_figure(figsize=(10, 2.6 * panels), layout="constrained")
    axes = fig.subplots(panels, 1, sharex=True)
    fig.suptitle(title)

    _draw_loss(axes[0], metrics)
    _line(axes[1], steps, "lr", "learning rate", "tab:purple")
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    _draw_throughput(axes[2], steps)
    if has_grad_norm:
        _line(axes[3], steps, "grad_norm", "gradient norm", "tab:brown")
        axes[3].set_yscale("log")  # spikes span orders of magnitude
    axes[-1].set_xlabel("step")
    for ax in axes:
        ax.grid(alpha=0.3)

    return save_png(fig, out)


def new_figure(**kwargs: Any) -> Any:
    """A bare matplotlib Figure (no pyplot), or the one-line error naming the extra."""
    return _import_matplotlib_figure().Figure(**kwargs)


def save_png(fig: Any, out: str | Path) -> Path:
    """Write `fig` to PNG `out` through a temporary file renamed over it: a viewer never sees
    half an image."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, leaving out None and non-finite values."""
    points = [(r["step"], r[key]) for r in records if _finite(r.get(key))]
    return [s for s, _ in points], [v for _, v in points]


def _line(ax: Any, records: list[dict[str, Any]], key: str, label: str, color: str) -> None:
    xs, ys = _series(records, key)
    ax.plot(xs, ys, color=color, linewidth=1.2)
    ax.set_ylabel(label)


def _draw_loss(ax: Any, metrics: Metrics) -> None:
    """Train loss as a line; eval loss and each source's eval loss as points joined by lines.

    Non-finite train losses are left out of the line (they would wreck the y range) and
    shown as red ticks along the bottom instead, so a skipped step stays visible.
    """
    xs, ys = _series(metrics.steps, "loss")
    ax.plot(xs, ys, color="tab:blue", linewidth=1.2, label="train")
    bad = [r["step"] for r in metrics.steps if not math.isfinite(r["loss"])]
    if bad:
        ax.plot(bad, [0.0] * len(bad), "|", color="tab:red", markersize=12,
                transform=ax.get_xaxis_transform(), label=f"non-finite loss ({len(bad)})")
    if metrics.evals:
        xs, ys = _series(metrics.evals, "loss")
        ax.plot(xs, ys, "o-", color="black", markersize=4, linewidth=1.2, label="eval")
        sources = sorted({name for r in metrics.evals for name in r["per_source"]})
        for name, color in zip(sources, itertools.cycle(_SOURCE_COLORS)):
            points = [(r["step"], r["per_source"][name]) for r in metrics.evals
                      if _finite(r["per_source"].get(name))]
            ax.plot([s for s, _ in points], [v for _, v in points], ".--", color=color,
                    linewidth=0.9, label=f"eval: {name}")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right", fontsize="small")


def _draw_throughput(ax: Any, steps: list[dict[str, Any]]) -> None:
    """Tokens/s on the left axis and, when the GPU's peak is known, MFU on the right."""
    _line(ax, steps, "tokens_per_s", "tokens/s", "tab:green")
    if not any(_finite(r.get("tokens_per_s")) for r in steps):
        # The first step of every (re)start is warm-up and is not timed.
        ax.text(0.5, 0.5, "not measured yet (warm-up)", transform=ax.transAxes,
                ha="center", va="center", color="gray")
    xs, ys = _series(steps, "mfu")
    if xs:
        twin = ax.twinx()
        twin.plot(xs, [100 * y for y in ys], color="tab:orange", linewidth=1.0)
        twin.set_ylabel("MFU %", color="tab:orange")
        twin.tick_params(axis="y", colors="tab:orange")
