"""Activation checkpointing: trade recomputation in backward for activation memory, per block.

    none        keep every activation autograd saves (fastest, most memory)
    block       keep only each block's input; the whole block runs again in backward
                (least memory, about one extra forward of compute)
    selective   keep the outputs of the expensive ops (matmuls, attention, FFTs) and recompute
                the cheap ones (norms, activations, gates, rotations, casts) in backward

`selective` is the usual middle point: elementwise ops are a small share of the FLOPs but, in
bf16 with float32 norms and gates, a large share of the saved bytes, so recomputing them saves
much of `block`'s memory at a few percent of its cost (Korthikanti et al., 2022, "Reducing
Activation Recomputation in Large Transformer Models"). The policy is by operator, so it
covers every mixer kind without per-mixer code: a new mixer's matmuls and FFTs are kept, its
elementwise work is recomputed.

Applied from outside (train/parallel.py) to an unmodified model, before compile and FSDP.
"""

from __future__ import annotations

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from stripes.arch.model import StripedLM
from stripes.kernels.dispatch import inside_self_recomputing
from stripes.train.config import ACTIVATION_CHECKPOINTING

_aten = torch.ops.aten
# Ops whose outputs `selective` keeps: their cost grows with a hidden size or the sequence
# length, not just the number of elements they touch.
SAVED_OPS = frozenset({
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten.baddbmm.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._fft_r2c.default,
    _aten._fft_c2r.default,
    _aten._fft_c2c.default,
})


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in SAVED_OPS and not inside_self_recomputing():
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_policy)


def apply_activation_checkpointing(model: StripedLM, mode: str) -> None:
    """Wrap each of `model.blocks` in place for `mode` (one of ACTIVATION_CHECKPOINTING)."""
    if mode not in ACTIVATION_CHECKPOINTING:
        raise ValueError(f"activation checkpointing {mode!r}: expected one of "
                         f"{ACTIVATION_CHECKPOINTING}")
    if mode == "none":
        return
    kwargs = {"context_fn": _selective_contexts} if mode == "selective" else {}
    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=True, **kwargs)
        if mode == "block":
            model.blocks[i].register_forward_pre_hook(_add_pending_first)


def _add_pending_first(module: torch.nn.Module, args: tuple) -> tuple | None:
    """Before a `block`-checkpointed block: add the previous block's unadded output into the
    stream, outside the recomputed region. A checkpoint keeps its inputs, and one float32
    stream is two thirds of the stream plus a bf16 `pending` (Block.forward); the add the
    block's first norm would have fused runs on its own instead."""
    if len(args) == 3 and args[2] is not None:
        x, doc_ids, pending = args
        return x + pending, doc_ids, None
    return None
