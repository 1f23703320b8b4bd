"""A stripes checkpoint as a graft source (`kind: stripes`): a checkpoint directory, or a run
directory (its latest checkpoint), of any backend and world size.

Its model config comes from the checkpoint's config.yaml, the tensor shapes from the model
part's metadata (nothing read), and the weights through the same loader as resuming a run
(DCP reshards; a DeepSpeed checkpoint's consolidated weights). Names are stripes' own.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from stripes.arch import StripedLM
from stripes.arch.config import ModelConfig
from stripes.core.config import ConfigError, to_typed


class StripesCheckpoint:
    def __init__(self, path: str | Path, key: str = "source") -> None:
        from stripes.train.checkpoint import resolve_checkpoint

        self.key = key
        found = resolve_checkpoint(path, key)
        self.checkpoint = found
        saved = yaml.safe_load((found / "config.yaml").read_text())
        raw = saved.get("model") if isinstance(saved, dict) else None
        if not isinstance(raw, dict):
            raise ConfigError(key, str(found), "a checkpoint whose config.yaml has `model`")
        self._model_raw = raw

    def model_config(self) -> ModelConfig:
        cfg = to_typed(ModelConfig, self._model_raw, prefix=f"{self.key}.model")
        cfg.expand(f"{self.key}.model")
        return cfg

    def shapes(self) -> dict[str, tuple[int, ...]]:
        with torch.device("meta"):
            model = StripedLM(self.model_config())
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def load(self, dtype: torch.dtype = torch.float32) -> StripedLM:
        from stripes.train.checkpoint import load_weights

        with torch.device("meta"):
            model = StripedLM(self.model_config())
        model.to_empty(device="cpu")
        load_weights(self.checkpoint, model, self.key)
        return model.to(dtype)
