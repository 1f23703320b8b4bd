"""Language-model head and cross-entropy in one: the loss of x @ W^T without its [N, V] logits.

An LM head's logits are the largest activation of a training step (N tokens x V vocabulary,
then as much again in float32 for F.cross_entropy and for its gradient). The fused path
walks the tokens in chunks; per chunk it forms the logits, turns them into the loss and,
in the same buffer, into their gradient, and folds that into the gradients of x and W before
the next chunk reuses the buffer.
"""

from __future__ import annotations

import torch

from stripes.kernels.dispatch import use_triton
from stripes.kernels.linear_ce.reference import (
    linear_cross_entropy as linear_cross_entropy_reference,
)

# The kernel computes in float32, so float64 inputs run the reference even on CUDA.
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean",
                         chunk_tokens: int | None = None, check_targets: bool = True
                         ) -> torch.Tensor:
    """Cross-entropy of the logits x @ weight^T against targets, as a float32 scalar.

    x: [N, D] hidden states after the final norm; weight: [V, D] (LM head or tied
    embedding), the same dtype as x (float32, bfloat16 or float16 on the Triton path);
    targets: [N] int64 in [0, V) or equal to ignore_index (those rows count for nothing).
    reduction "sum" adds the per-token losses; "mean" divides by the number of counted
    targets. When every target is ignored the loss is 0.0 and the gradients are zero, not
    NaN (the reference agrees). Gradients flow to x and weight.

    Autocast: under an active autocast for x's device, x and weight are first cast to the
    autocast dtype (as F.linear would be), and the loss runs with autocast off. Gradients
    come back in x's and weight's own dtypes (float32 parameters get float32 gradients; on
    the Triton path the float32 sum itself, never rounded to the autocast dtype).

    Errors: reduction other than "mean"/"sum", bad shapes or dtypes, or a target outside
    [0, V) that is not ignore_index raise ValueError. Checking the targets is one reduction
    read back to the host: one device sync per call (the host waits for the queued forward
    before launching the loss). `check_targets=False` skips it on the Triton path, for
    callers whose targets are checked upstream (the trainer checks its data's vocabulary
    against the model's): there a target outside [0, V) makes the loss and the gradients
    NaN, and nothing waits for the device. The reference path (CPU, float64) always checks.

    CUDA tensors run the Triton path (stripes.kernels.linear_ce.kernel); it never builds the
    [N, V] logits. It takes chunk_tokens rows at a time; by default as many as keep one
    chunk's logits within 128 MiB (e.g. 2,048 rows at V = 32,000 in bf16), see
    kernel.default_chunk_tokens. Per chunk: logits = x_c @ W^T by torch's matmul in x's
    dtype; a Triton kernel (one program per row, streaming the row in blocks) computes the
    log-sum-exp in float32 (the loss is lse - logit[target]) and overwrites the logits in
    place with softmax - onehot; then grad_x_c = dlogits @ W and
    grad_W += dlogits^T @ x_c, accumulated in float32. All of this happens in the forward;
    backward only multiplies the saved gradients by grad_output and the reduction's scale
    (1/count for "mean", counted on the device; grad_x in place, so one forward takes one
    backward: a second, through retain_graph, raises RuntimeError).
    Memory consequence: the forward's peak is x, W, grad_x ([N, D], x's dtype), grad_W
    ([V, D] float32) and one chunk of logits ([C, V], x's dtype); grad_x and grad_W stay
    alive until backward, whose peak adds grad_W in W's dtype instead of the logits (nothing
    for float32 weights: grad_W is scaled in place). Under autocast add the bf16 copies of x
    and W. Under torch.no_grad (evaluation) only
    the loss is computed. Numerics: the logits and their gradient are stored in x's dtype
    (bf16 on a bf16 model); the log-sum-exp, the loss and the weight-gradient accumulation
    are float32.

    Other devices (CPU, MPS) and float64 run the reference in
    stripes.kernels.linear_ce.reference, which builds the float32 logits and ignores
    chunk_tokens.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            x = x.to(dtype)
            if _triton_path(x, weight, targets):  # it casts W and returns dW in W's dtype
                return _triton(x, weight, targets, ignore_index, reduction, chunk_tokens,
                               check_targets)
            return linear_cross_entropy(x, weight.to(dtype), targets, ignore_index, reduction,
                                        chunk_tokens)
    if _triton_path(x, weight, targets) and x.dtype == weight.dtype:
        return _triton(x, weight, targets, ignore_index, reduction, chunk_tokens, check_targets)
    return linear_cross_entropy_reference(x, weight, targets, ignore_index, reduction,
                                          chunk_tokens)


def _triton_path(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> bool:
    return (use_triton(x, weight, targets) and x.dtype in TRITON_DTYPES
            and weight.dtype in TRITON_DTYPES)


def _triton(*args) -> torch.Tensor:
    from stripes.kernels.linear_ce.kernel import linear_cross_entropy_triton

    return linear_cross_entropy_triton(*args)
