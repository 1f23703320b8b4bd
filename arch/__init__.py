"""Model definition: config schema, stripe grammar, mixers, blocks, the model, decoding."""

from stripes.arch.config import ArchFile, LayerSpec, MLPConfig, ModelConfig
from stripes.arch.mixer import Mixer, MixerConfig
from stripes.arch.model import DecodeState, StripedLM
from stripes.arch.registry import get_mixer, known_kinds, register_mixer

__all__ = [
    "ArchFile", "DecodeState", "LayerSpec", "MLPConfig", "Mixer", "MixerConfig", "ModelConfig",
    "StripedLM", "get_mixer", "known_kinds", "register_mixer",
]
