"""Triton gated norms (Mamba-2's RMS with the gate first and the D skip, RetNet's GroupNorm
with the gate after) under the interpreter on CPU, against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from stripes.kernels.gated_norm import gated_norm, reference
from stripes.kernels.gated_norm.kernel import gated_norm_triton

from numerics import poison_empty, rel_error

EPS = 1e-5


def make_inputs(lead, C, skip: bool, dtype=torch.float32, strided=False, seed=0):
    """y, z, weight, x, skip; with strided, z and x are column slices of wider tensors, the
    way Mamba-2 slices them out of its projections."""
    gen = torch.Generator().manual_seed(seed)

    def leaf(*shape, scale=1.0, offset=0.0):
        return (offset + scale * torch.randn(*shape, generator=gen)).to(dtype).requires_grad_()

    y = leaf(*lead, C)
    if strided:
        wide_z, wide_x = leaf(*lead, C + 5), leaf(*lead, 2 * C + 3)
        z, x = wide_z[..., 2:2 + C], wide_x[..., C:2 * C]
    else:
        z, x = leaf(*lead, C), leaf(*lead, C)
    weight = leaf(C, scale=0.5, offset=1.0)
    s = leaf(C, scale=0.5, offset=1.0)
    inputs = (y, z, weight, x, s) if skip else (y, z, weight, None, None)
    leaves = (y, wide_z, weight, wide_x, s) if strided else inputs
    return inputs, tuple(t for t in leaves if t is not None)


MAMBA = dict(centered=False, gate_first=True)
RETNET = dict(centered=True, gate_first=False)
VARIANTS = [MAMBA, RETNET, dict(centered=True, gate_first=True),
            dict(centered=False, gate_first=False)]


def grads(fn, inputs, leaves, group_size, grad_out, variant):
    y, z, weight, x, skip = inputs
    out = fn(y, z, weight, group_size, EPS, x, skip, **variant)
    return out, torch.autograd.grad(out, leaves, grad_out)


def float64_twin(inputs, leaves):
    """The same inputs as float64 leaves, slices taken again from the wide tensors."""
    twins = {id(t): t.detach().double().requires_grad_() for t in leaves}
    out = []
    for t in inputs:
        if t is None or id(t) in twins:
            out.append(None if t is None else twins[id(t)])
            continue
        base = next(b for b in leaves if b.shape[:-1] == t.shape[:-1] and b.shape != t.shape
                    and t.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())
        start = t.storage_offset() - base.storage_offset()
        out.append(twins[id(base)][..., start:start + t.shape[-1]])
    return out, [twins[id(t)] for t in leaves]


def check(lead, C, group_size, skip, dtype=torch.float32, strided=False, tol=1e-5,
          variant=MAMBA):
    inputs, leaves = make_inputs(lead, C, skip, dtype, strided)
    grad_out = torch.randn(*lead, C, generator=torch.Generator().manual_seed(1)).to(dtype)
    out, got = grads(gated_norm_triton, inputs, leaves, group_size, grad_out, variant)
    ref_inputs, ref_leaves = float64_twin(inputs, leaves)
    ref_out, want = grads(reference.gated_norm, ref_inputs, ref_leaves, group_size,
                          grad_out.double(), variant)
    assert out.dtype == inputs[1].dtype and out.shape == ref_out.shape
    assert rel_error(out, ref_out) < tol, rel_error(out, ref_out)
    for i, (a, b, leaf) in enumerate(zip(got, want, leaves, strict=True)):
        assert a.dtype == leaf.dtype, i
        assert rel_error(a, b) < tol, (i, rel_error(a, b))


@pytest.mark.parametrize("lead, C, group_size", [((7,), 16, 16), ((2, 5), 24, 8),
                                                 ((3,), 33, 11), ((1, 1), 8, 4)])
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("variant", VARIANTS, ids=["mamba", "retnet", "centered-gate-first",
                                                   "rms-gate-after"])
def test_float32_matches_float64_reference(lead, C, group_size, skip, variant):
    check(lead, C, group_size, skip, variant=variant)


@pytest.mark.parametrize("variant", [MAMBA, RETNET], ids=["mamba", "retnet"])
def test_strided_slices_read_in_place_and_every_output_written(monkeypatch, variant):
    poison_empty(monkeypatch)  # an element the kernels leave unwritten shows up as NaN
    check((3, 9), 32, 16, skip=True, strided=True, variant=variant)


@pytest.mark.parametrize("variant", [MAMBA, RETNET], ids=["mamba", "retnet"])
def test_bfloat16_inputs_float32_math(variant):
    # Inputs rounded to bfloat16 are exact float64 values: only the output's rounding and
    # the gradients' (each a bfloat16 store) separate the kernel from the float64 reference.
    check((4, 6), 64, 32, skip=True, dtype=torch.bfloat16, tol=8e-3, variant=variant)


def test_retnet_variant_is_group_norm_then_swish_gate():
    """The reference's centered, gate-after form is what RetNet's output wrote before
    (F.group_norm with one group per head, then silu(g) times it)."""
    g = torch.Generator().manual_seed(5)
    o, gate = torch.randn(6, 24, generator=g), torch.randn(6, 24, generator=g)
    w = torch.rand(24, generator=g) + 0.5
    want = torch.nn.functional.silu(gate) * torch.nn.functional.group_norm(o, 3, w, None, EPS)
    got = reference.gated_norm(o, gate, w, 8, EPS, centered=True, gate_first=False)
    assert rel_error(got, want) < 1e-6


def test_public_function_runs_the_reference_off_cuda_with_the_same_values():
    inputs, _ = make_inputs((2, 3), 16, skip=True)
    y, z, weight, x, s = inputs
    a = gated_norm(y, z, weight, 8, EPS, x, s)
    b = gated_norm_triton(y, z, weight, 8, EPS, x, s)
    assert rel_error(a, b) < 1e-6


@pytest.mark.parametrize("change, message", [
    (dict(z=torch.zeros(2, 9)), "z must have y's shape"),
    (dict(weight=torch.ones(7)), "weight must be"),
    (dict(group_size=5), "group_size 5 must divide"),
    (dict(skip=None), "x and skip go together"),
])
def test_bad_shapes_are_one_clear_error(change, message):
    args = dict(y=torch.zeros(2, 8), z=torch.zeros(2, 8), weight=torch.ones(8), group_size=4,
                eps=EPS, x=torch.zeros(2, 8), skip=torch.ones(8))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        gated_norm(**args)
