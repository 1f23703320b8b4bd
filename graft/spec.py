"""The graft spec: which pretrained components go where in a new stripes architecture.

    target: configs/arch/hybrid-tiny.yaml       # a model YAML (an `arch` file), or
                                                # {model: {...}} inline
    sources:
      llama: {kind: hf_llama, path: runs/llama-src}   # a Hugging Face Llama/Mistral dir
      mine: {kind: stripes, path: runs/transformer-1b}  # a stripes checkpoint or run dir
    rules:                                       # each target tensor from one rule
      - {source: llama, component: attention, from: "0..3", to: "1..7:2"}
      - {source: llama, component: mlp, from: "0..3", to: "0..3"}
      - {source: llama, component: embeddings}
      - {source: llama, component: head}
      - {source: llama, component: final_norm}
    parity_tolerance: 1.0e-5                     # max relative error of a grafted component
    seed: 0                                      # the target's own init of what is not grafted

Components: `attention` (a layer's attention with its pre-norm), `mixer` (a layer's mixer
of any kind, into a layer of the same kind, e.g. Hyena from a stripes checkpoint), `mlp`
(its MLP with its pre-norm), `embeddings`, `head` (the output projection; a tied target
takes it through its embeddings) and `final_norm`. Layer lists: "a..b" (inclusive),
"a..b:step", "a,b,c", or a list of integers; negative indices count from the end. `from`
and `to` pair up in order and must be as long as each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf

from stripes.core.config import ConfigError, read_yaml, to_typed

COMPONENTS = ("attention", "mixer", "mlp", "embeddings", "head", "final_norm")
LAYERED = ("attention", "mixer", "mlp")
SOURCE_KINDS = ("hf_llama", "stripes")


@dataclass
class SourceSpec:
    kind: str = MISSING  # one of SOURCE_KINDS
    path: str = MISSING


@dataclass
class RuleSpec:
    source: str = MISSING
    component: str = MISSING  # one of COMPONENTS
    # omegaconf keys cannot be `from`; the YAML spelling is mapped in `parse_rules`
    from_layers: Any = None
    to_layers: Any = None


@dataclass
class GraftSpec:
    target: Any = MISSING  # a model YAML path, or {model: {...}}
    sources: dict[str, SourceSpec] = field(default_factory=dict)
    rules: list[RuleSpec] = field(default_factory=list)
    parity_tolerance: float = 1e-5
    seed: int = 0


def layer_list(value: Any, n_layers: int, key: str) -> list[int]:
    """Layer indices from "a..b", "a..b:step", "a,b,c", an int or a list of ints, each
    checked against n_layers and made non-negative."""
    if isinstance(value, int):
        raw = [value]
    elif isinstance(value, (list, tuple)):
        raw = list(value)
    elif isinstance(value, str):
        raw = []
        for part in value.replace(" ", "").split(","):
            span, _, step = part.partition(":")
            lo, dots, hi = span.partition("..")
            try:
                raw += (list(range(int(lo), int(hi) + 1, int(step or 1))) if dots
                        else [int(lo)])
            except ValueError:
                raise ConfigError(key, value, '"a..b", "a..b:step", "a,b,c" or a list of '
                                  "layer indices") from None
    else:
        raise ConfigError(key, value, '"a..b", "a..b:step", "a,b,c" or a list of layer indices')
    bad = [i for i in raw if not isinstance(i, int) or not -n_layers <= i < n_layers]
    if bad or not raw:
        raise ConfigError(key, value, f"layer indices in -{n_layers}..{n_layers - 1}",
                          f"out of range: {bad}" if bad else "no layer")
    return [i % n_layers for i in raw]


def parse_rules(raw_rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The YAML's rules with `from`/`to` renamed to the dataclass fields."""
    out = []
    for rule in raw_rules:
        rule = dict(rule)
        for yaml_key, field_name in (("from", "from_layers"), ("to", "to_layers")):
            if yaml_key in rule:
                rule[field_name] = rule.pop(yaml_key)
        out.append(rule)
    return out


def load_graft_spec(path: str | Path) -> GraftSpec:
    """A graft YAML (module docstring) as a typed spec; unknown keys are one-line errors."""
    data = OmegaConf.to_container(read_yaml(Path(path)))
    if isinstance(data.get("rules"), list):
        data["rules"] = parse_rules(data["rules"])
    return to_typed(GraftSpec, data, prefix="")
