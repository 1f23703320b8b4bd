"""Mixer kinds: name -> (module class, config dataclass).

Built-in kinds register when their modules are imported; `get_mixer` imports them lazily so
that importing the config schema does not pull in every mixer. User code adds kinds with

    @register_mixer("my_kind", MyConfig)
    class MyMixer(Mixer): ...

and names the defining module under `model.plugins` so the CLI imports it before validation.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, is_dataclass

from stripes.arch.mixer import Mixer, MixerConfig
from stripes.core.config import ConfigError

# Modules whose import registers the built-in kinds.
_BUILTIN_MODULES = ("stripes.arch.attention", "stripes.arch.mamba2", "stripes.arch.retention",
                    "stripes.arch.hyena")


@dataclass(frozen=True)
class MixerKind:
    name: str
    module: type[Mixer]
    config: type[MixerConfig]


_REGISTRY: dict[str, MixerKind] = {}
_builtins_loaded = False


def register_mixer(name: str, config: type[MixerConfig]):
    """Class decorator registering a `Mixer` subclass under `name` with its config class."""

    def decorate(module: type[Mixer]) -> type[Mixer]:
        if not (isinstance(module, type) and issubclass(module, Mixer)):
            raise TypeError(f"register_mixer({name!r}): {module!r} is not a Mixer subclass")
        if not (is_dataclass(config) and issubclass(config, MixerConfig)):
            raise TypeError(f"register_mixer({name!r}): {config!r} is not a MixerConfig dataclass")
        existing = _REGISTRY.get(name)
        if existing is not None and existing.module is not module:
            raise ValueError(f"mixer kind {name!r} is already registered by {existing.module}")
        _REGISTRY[name] = MixerKind(name, module, config)
        return module

    return decorate


def known_kinds() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get_mixer(name: str, key: str = "kind") -> MixerKind:
    """Look up `name`; an unknown one raises ConfigError naming `key` and the known kinds."""
    _load_builtins()
    kind = _REGISTRY.get(name)
    if kind is None:
        raise ConfigError(key, name, ", ".join(known_kinds()), "unknown mixer kind")
    return kind


def import_plugins(modules: list[str], key: str) -> None:
    """Import user modules that register extra kinds (`model.plugins`)."""
    for i, name in enumerate(modules):
        try:
            importlib.import_module(name)
        except Exception as err:  # any failure in user code: name the module, keep one line
            problem = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            raise ConfigError(f"{key}[{i}]", name, "an importable module", problem) from None


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for name in _BUILTIN_MODULES:
            importlib.import_module(name)
