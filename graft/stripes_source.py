"""A stripes checkpoint as a graft source (`kind: stripes`): a checkpoint directory, or a run
directory (its latest checkpoint), of any backend and world size.

Its model config comes from the checkpoint's config.yaml, the tensor shapes from the model
part's metadata (nothing read), and the weights through the same loader as resuming a run
(DCP reshards; a DeepSpeed checkpoint's consolidated weights). Names are stripes' own.
"""

from __future__ import annotations

from pathlib import Path

import torch

from stripes.arch import StripedLM
from stripes.arch.config import ModelConfig
from stripes.core.config import to_typed


class StripesCheckpoint:
    def __init__(self, path: str | Path, key: str = "source") -> None:
        from stripes.train.export import read_trained

        self.key = key
        self.checkpoint, saved = read_trained(path, key)
        self._model_raw = saved["model"]

    def model_config(self) -> ModelConfig:
        cfg = to_typed(ModelConfig, self._model_raw, prefix=f"{self.key}.model")
        cfg.expand(f"{self.key}.model")
        return cfg

    def shapes(self) -> dict[str, tuple[int, ...]]:
        with torch.device("meta"):
            model = StripedLM(self.model_config())
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def load(self, dtype: torch.dtype = torch.float32) -> StripedLM:
        from stripes.train.export import load_trained

        return load_trained(self.checkpoint, self.key)[0].to(dtype)
