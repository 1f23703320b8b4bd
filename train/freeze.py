"""Freezing parameters for part of a run: grafted components kept as they came while the new
ones catch up, then trained with the rest.

    freeze:
      - {grafted: runs/sh2-1b-grafted, until_step: 500}   # what that graft copied in
      - {params: ["embed.weight", "blocks.*.mlp.*"]}      # glob patterns; the whole run

A frozen parameter's gradient is dropped before clipping and the update, so it neither
moves, decays nor counts in the gradient norm; AdamW keeps its moments as they were. From
`until_step` (a global step) on it trains again. Names are the model's own
(`blocks.3.mixer.q_proj.weight`), whatever wraps it. DeepSpeed updates its flat partitions
itself and is refused.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from stripes.core.config import ConfigError


@dataclass
class FreezeConfig:
    params: list[str] = field(default_factory=list)  # glob patterns of parameter names
    grafted: str | None = None  # a `stripes graft` output: the parameters it copied in
    until_step: int | None = None  # trains again from this step on; None: never


def grafted_names(directory: str | Path, key: str) -> set[str]:
    report = Path(directory) / "graft_report.json"
    if not report.is_file():
        raise ConfigError(key, str(directory), "a `stripes graft` output directory",
                          "no graft_report.json there")
    params = json.loads(report.read_text())["params"]
    return {name for name, row in params.items() if row["from"] != "fresh"}


def validate_freeze(rules: list[FreezeConfig], backend: str) -> None:
    for i, rule in enumerate(rules):
        key = f"freeze[{i}]"
        if not rule.params and rule.grafted is None:
            raise ConfigError(key, rule, "params (glob patterns), grafted (a graft output), "
                              "or both")
        if rule.until_step is not None and rule.until_step < 0:
            raise ConfigError(f"{key}.until_step", rule.until_step, "a step >= 0, or null")
        if rule.grafted is not None:
            grafted_names(rule.grafted, f"{key}.grafted")
    if rules and backend == "deepspeed":
        raise ConfigError("freeze", f"{len(rules)} rule(s)", "the single, ddp or fsdp "
                          "backend", "DeepSpeed updates its flat partitions itself")


class Freezer:
    """Which parameters are frozen at a step, resolved once against the model."""

    def __init__(self, model: nn.Module, rules: list[FreezeConfig]) -> None:
        from stripes.train.optim import canonical_name  # optim -> config -> this module

        named = {canonical_name(name): p for name, p in model.named_parameters()}
        self.groups: list[tuple[int | None, list[nn.Parameter]]] = []
        for i, rule in enumerate(rules):
            names = set()
            for pattern in rule.params:
                matched = fnmatch.filter(named, pattern)
                if not matched:
                    raise ConfigError(f"freeze[{i}].params", pattern, "a pattern matching "
                                      "some parameter, e.g. blocks.*.mixer.*",
                                      "it matches none")
                names.update(matched)
            if rule.grafted is not None:
                names |= grafted_names(rule.grafted, f"freeze[{i}].grafted")
            missing = sorted(names - set(named))
            if missing:
                raise ConfigError(f"freeze[{i}].grafted", rule.grafted, "a graft of this "
                                  "model", f"it names {missing[0]}, which the model lacks")
            self.groups.append((rule.until_step, [named[n] for n in sorted(names)]))

    def frozen(self, step: int) -> list[nn.Parameter]:
        return [p for until, params in self.groups if until is None or step < until
                for p in params]

    def count(self, step: int) -> int:
        return sum(p.numel() for p in self.frozen(step))

    def changes_at(self, step: int) -> bool:
        """Whether a group unfreezes at `step` (the frozen set differs from step - 1's)."""
        return any(until == step for until, _ in self.groups)
