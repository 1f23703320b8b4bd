"""AdamW with two parameter groups: weight decay on matrices, none on what must not shrink.

Weight decay pulls every parameter towards zero. That is a useful prior for projection
matrices, but wrong for norm gains (they would drift towards zero scale), biases, embeddings
(rare tokens would be decayed far more often than they are updated) and the structured
parameters mixers declare in `no_decay_params` (Hyena poles and residues, Mamba's A_log: decay
would move a pole, not regularise a weight). `StripedLM.no_decay_parameter_names()` lists them.

Names are matched after stripping the segments that wrappers insert (`torch.compile`'s
`_orig_mod`, DDP's `module`, FSDP1's `_fsdp_wrapped_module`, activation checkpointing's
`_checkpoint_wrapped_module`). The optimizer is meant to be built on the bare model before any
wrapping, but a block wrapped early (say by activation checkpointing) would otherwise make its
declared 2-D parameters, such as Hyena's residues, silently decay.
"""

from __future__ import annotations

import torch
from torch import nn

from stripes.arch.model import StripedLM
from stripes.core.log import note_once
from stripes.train.config import OptimConfig

# Path segments that wrappers add between a module and its parameters; never model names.
WRAPPER_SEGMENTS = frozenset({"_orig_mod", "module", "_fsdp_wrapped_module",
                              "_checkpoint_wrapped_module"})


def canonical_name(name: str) -> str:
    """`name` with wrapper segments removed: `module.blocks.0._orig_mod.x` -> `blocks.0.x`."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)


def split_parameters(model: nn.Module, no_decay_names: list[str],
                     ) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(decay, no_decay) lists of (name, parameter), trainable parameters only.

    Every trainable parameter lands in exactly one list. A no-decay name that matches no
    parameter is a bug in a mixer's declaration, so it raises instead of being ignored; so
    does a model in which two parameters have the same canonical name.
    """
    named = list(model.named_parameters())
    canonical = [canonical_name(n) for n, _ in named]
    if len(set(canonical)) != len(canonical):
        clashes = sorted({c for c in canonical if canonical.count(c) > 1})
        raise ValueError(f"parameter names collide once wrapper segments are removed: {clashes}")
    wanted = {canonical_name(n) for n in no_decay_names}
    unknown = sorted(wanted - set(canonical))
    if unknown:
        raise ValueError(f"no-decay names match no parameter of the model: {unknown}")
    decay, no_decay = [], []
    for (name, param), key in zip(named, canonical, strict=True):
        if param.requires_grad:
            (no_decay if key in wanted else decay).append((name, param))
    return decay, no_decay


def build_optimizer(model: StripedLM, cfg: OptimConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW over `model`'s trainable parameters: group 0 decays, group 1 ("no_decay") not.

    Both groups always exist (even if one is empty), so optimizer state dicts keep the same
    layout across models and resumes. `cfg.fused=None` picks the fused kernel on CUDA and the
    multi-tensor (`foreach`) one elsewhere; an explicit value is obeyed as given. Each group
    carries a `name` key, kept in the optimizer's state dict, for logs and checks.
    """
    decay, no_decay = split_parameters(model, model.no_decay_parameter_names())
    fused = cfg.fused if cfg.fused is not None else device_type == "cuda"
    # fused and foreach are exclusive in torch; foreach beats the per-tensor loop off CUDA.
    kernel = {"fused": True} if fused else {"foreach": True}
    groups = [
        {"name": "decay", "params": [p for _, p in decay], "weight_decay": cfg.weight_decay},
        {"name": "no_decay", "params": [p for _, p in no_decay], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                  **kernel)
    note_once(
        f"optimizer: AdamW ({'fused' if fused else 'foreach'}), "
        f"decay group {len(decay)} tensors / {_count(decay):,} parameters "
        f"(weight_decay={cfg.weight_decay}), "
        f"no-decay group {len(no_decay)} tensors / {_count(no_decay):,} parameters"
    )
    return optimizer


def _count(named: list[tuple[str, nn.Parameter]]) -> int:
    return sum(p.numel() for _, p in named)
