"""Model config schema and the stripe grammar.

    model:
      d_model: 2048
      n_layers: 32
      vocab_size: 32000
      stripes: [hyena_se, hyena_mr, hyena_li, attn]   # cycled to n_layers
      overrides: {31: attn}                          # per-layer replacement (negative ok)
      mixers:                                        # settings per kind, and variants:
        attn: {n_heads: 16, n_kv_heads: 4}
        attn_local: {kind: attn, window: 512}        # a named variant of a registered kind
      mlp: {kind: swiglu, hidden_mult: 2.667}        # default MLP; a kind may override
                                                     # it: mixers: {hyena_se: {mlp: none}}

`ModelConfig.expand()` turns this into one `LayerSpec` per layer and is the single place the
grammar is validated: every problem raises a one-line `ConfigError` naming the key path.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from stripes.arch.layers import MLP_CLASSES
from stripes.arch.mixer import MixerConfig
from stripes.arch.registry import get_mixer, import_plugins, known_kinds
from stripes.core.config import ConfigError, require_positive, to_typed

MLP_KINDS = tuple(MLP_CLASSES)


@dataclass
class MLPConfig:
    kind: str = "swiglu"  # one of MLP_KINDS; "none" leaves the block without an MLP
    hidden_mult: float = 8 / 3  # hidden = hidden_mult * d_model, rounded up to multiple_of
    multiple_of: int = 256
    hidden: int | None = None  # explicit hidden width; wins over hidden_mult

    def hidden_size(self, d_model: int) -> int:
        if self.hidden is not None:
            return self.hidden
        raw = self.hidden_mult * d_model
        return int(math.ceil(round(raw, 6) / self.multiple_of) * self.multiple_of)

    def validate(self, key: str) -> None:
        if self.kind not in MLP_KINDS:
            raise ConfigError(f"{key}.kind", self.kind, ", ".join(MLP_KINDS), "unknown MLP kind")
        if self.hidden is not None:
            require_positive(f"{key}.hidden", self.hidden, integer=True)
        require_positive(f"{key}.hidden_mult", self.hidden_mult)
        if self.hidden_mult > 1e4:
            raise ConfigError(f"{key}.hidden_mult", self.hidden_mult, "at most 1e4")
        require_positive(f"{key}.multiple_of", self.multiple_of, integer=True)


@dataclass(frozen=True)
class LayerSpec:
    """What sits at one layer, after the stripe pattern and overrides are applied."""

    index: int
    name: str  # as written in the stripes: a registered kind or a variant of one
    kind: str  # the registered kind that builds the mixer
    mixer: MixerConfig
    mlp: MLPConfig


@dataclass
class ModelConfig:
    d_model: int = MISSING
    n_layers: int = MISSING
    vocab_size: int = MISSING
    stripes: list[str] = MISSING
    overrides: dict[int, str] = field(default_factory=dict)
    mixers: dict[str, Any] = field(default_factory=dict)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    max_seq_len: int = 2048  # the context the model is built for: inspect's FLOPs, decode cache
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    plugins: list[str] = field(default_factory=list)  # modules that register extra kinds

    def expand(self, key: str = "model") -> list[LayerSpec]:
        """Validate the whole config and return one LayerSpec per layer."""
        import_plugins(self.plugins, f"{key}.plugins")
        for name in ("d_model", "n_layers", "vocab_size", "max_seq_len"):
            require_positive(f"{key}.{name}", getattr(self, name), integer=True)
        for name in ("norm_eps", "init_std"):
            require_positive(f"{key}.{name}", getattr(self, name))
        if not self.stripes:
            raise ConfigError(f"{key}.stripes", [], "a non-empty list of mixer kinds: "
                              + ", ".join(known_kinds()))
        self.mlp.validate(f"{key}.mlp")

        names = [self.stripes[i % len(self.stripes)] for i in range(self.n_layers)]
        for i, name in enumerate(self.stripes):
            self._base_kind(name, f"{key}.stripes[{i}]", key)
        overridden: dict[int, int] = {}  # layer -> the index as written
        for index, name in self.overrides.items():
            where = f"{key}.overrides.{index}"
            if not -self.n_layers <= index < self.n_layers:
                allowed = f"layer indices -{self.n_layers}..{self.n_layers - 1}"
                raise ConfigError(where, name, allowed, "override index out of range")
            layer = index % self.n_layers
            if layer in overridden:
                raise ConfigError(where, name, "one override per layer",
                                  f"layer {layer} is also overridden as {overridden[layer]}")
            overridden[layer] = index
            self._base_kind(name, where, key)
            names[layer] = name

        # Settings of every name are checked, also of names no layer uses (yet).
        settings = {name: self._settings(name, key)
                    for name in sorted(set(names) | {str(n) for n in self.mixers})}
        return [LayerSpec(i, name, *settings[name]) for i, name in enumerate(names)]

    def _base_kind(self, name: str, where: str, key: str) -> str:
        """The registered kind behind a stripe name: itself, or a variant's `kind:`."""
        raw = self.mixers.get(name)
        if isinstance(raw, dict) and "kind" in raw:
            return get_mixer(str(raw["kind"]), f"{key}.mixers.{name}.kind").name
        try:
            return get_mixer(name, where).name
        except ConfigError as err:
            raise ConfigError(where, name, f"{err.allowed}, or a variant defined under "
                              f"{key}.mixers with a `kind:` key", err.reason) from None

    def _settings(self, name: str, key: str) -> tuple[str, MixerConfig, MLPConfig]:
        """(kind, typed mixer settings, MLP merged onto the model-wide MLP) for one name."""
        where = f"{key}.mixers.{name}"
        raw = self.mixers.get(name) or {}
        if not isinstance(raw, dict):
            raise ConfigError(where, raw, "a mapping of settings for this mixer kind")
        raw = dict(raw)
        kind = self._base_kind(name, where, key)
        raw.pop("kind", None)
        mlp_raw = raw.pop("mlp", None) or {}
        if isinstance(mlp_raw, str):  # shorthand: `mlp: none` or `mlp: gelu`
            mlp_raw = {"kind": mlp_raw}
        if not isinstance(mlp_raw, dict):
            raise ConfigError(f"{where}.mlp", mlp_raw, "a mapping of MLP settings or a kind: "
                              + ", ".join(MLP_KINDS))
        mixer_cfg = to_typed(get_mixer(kind).config, raw, prefix=where)
        mixer_cfg.validate(self.d_model, where)
        mlp = to_typed(MLPConfig, dataclasses.asdict(self.mlp), mlp_raw, prefix=f"{where}.mlp")
        mlp.validate(f"{where}.mlp")
        return kind, mixer_cfg, mlp


@dataclass
class ArchFile:
    """Schema of a `configs/arch/*.yaml` file."""

    model: ModelConfig = MISSING
