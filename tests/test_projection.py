"""arch/projection.py: one matmul for several projections of one input, with a backward that
reads each piece's gradient where it lies, against separate nn.Linear layers."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from stripes.arch import ArchFile, StripedLM, projection
from stripes.arch.projection import (
    Linear,
    StepFusion,
    fused_linear,
    linear,
    project_all,
    project_split,
)
from stripes.core.config import load_config

from conftest import TINY
from numerics import rel_error


def linears(sizes, bias: bool, dtype=torch.float64, seed=0) -> list[nn.Linear]:
    torch.manual_seed(seed)
    return [nn.Linear(8, n, bias=bias, dtype=dtype) for n in sizes]


def grads(tensors) -> list[torch.Tensor | None]:
    return [None if t.grad is None else t.grad.clone() for t in tensors]


def clear(tensors) -> None:
    for t in tensors:
        t.grad = None


def count_in_place_adds(monkeypatch) -> list[int]:
    """A one-element counter of weight-gradient matmuls that add into an existing .grad."""
    count, mm_into = [0], projection._mm_into

    def counting(a, b, out, accumulate=False):
        count[0] += accumulate
        mm_into(a, b, out, accumulate)

    monkeypatch.setattr(projection, "_mm_into", counting)
    return count


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("used", [(0, 1, 2), (0, 2), (1,)])
def test_project_all_matches_separate_linears(bias, used):
    layers = linears((8, 3, 6), bias)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    params = [x, *(p for m in layers for p in m.parameters())]
    weights = [torch.randn(2, 5, m.out_features, dtype=torch.float64) for m in layers]

    fused = project_all(x, *layers)
    assert [t.shape for t in fused] == [(2, 5, 8), (2, 5, 3), (2, 5, 6)]
    for out, m in zip(fused, layers, strict=True):
        assert rel_error(out, m(x)) < 1e-14
    sum((fused[i] * weights[i]).sum() for i in used).backward()
    got = grads(params)
    clear(params)
    sum((layers[i](x) * weights[i]).sum() for i in used).backward()
    for name, a, b in zip(["x", *(n for m in layers for n, _ in m.named_parameters())], got,
                          grads(params), strict=True):
        if b is None:  # a layer whose output went unused: its rows get zeros
            assert a is not None and not a.any(), name
        else:
            assert rel_error(a, b) < 1e-13, name


def test_project_split_matches_a_split_linear():
    (layer,) = linears((17,), bias=True)
    x = torch.randn(3, 4, 8, dtype=torch.float64, requires_grad=True)
    params = [x, layer.weight, layer.bias]
    pieces = project_split(x, layer, [9, 1, 7])
    reference = layer(x).split([9, 1, 7], dim=-1)
    assert all(rel_error(a, b) < 1e-14 for a, b in zip(pieces, reference, strict=True))
    sum(p.square().sum() * (i + 1) for i, p in enumerate(pieces)).backward()
    got = grads(params)
    clear(params)
    sum(p.square().sum() * (i + 1) for i, p in enumerate(reference)).backward()
    assert all(rel_error(a, b) < 1e-13 for a, b in zip(got, grads(params), strict=True))


def test_frozen_weights_get_no_gradient_and_x_still_does():
    layers = linears((4, 4), bias=False)
    for m in layers:
        m.weight.requires_grad_(False)
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    a, b = project_all(x, *layers)
    (a * b).sum().backward()
    got = x.grad.clone()
    x.grad = None
    (layers[0](x) * layers[1](x)).sum().backward()
    assert rel_error(got, x.grad) < 1e-13
    assert all(m.weight.grad is None for m in layers)


def test_bf16_autocast_computes_in_bf16_and_returns_float32_weight_gradients():
    layers = linears((8, 5), bias=True, dtype=torch.float32)
    x = torch.randn(4, 7, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = project_all(x, *layers)
        reference = [m(x) for m in layers]
    for a, b in zip(fused, reference, strict=True):
        assert a.dtype == torch.bfloat16
        assert rel_error(a, b) < 1e-2
    sum(t.float().square().sum() for t in fused).backward()
    assert x.grad.dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 for m in layers for p in m.parameters())
    got = grads([x, *(p for m in layers for p in m.parameters())])
    clear([x, *(p for m in layers for p in m.parameters())])
    sum(m(x).square().sum() for m in layers).backward()
    exact = grads([x, *(p for m in layers for p in m.parameters())])
    assert all(rel_error(a, b) < 2e-2 for a, b in zip(got, exact, strict=True))


def test_without_grad_each_layer_runs_alone():
    layers = linears((3, 2), bias=False)
    x = torch.randn(5, 8, dtype=torch.float64)
    with torch.no_grad():
        outs = project_all(x, *layers)
    assert outs[0].grad_fn is None and outs[0].is_contiguous()


def test_bad_arguments_are_one_clear_error():
    x = torch.randn(2, 8, dtype=torch.float64)
    (layer,) = linears((6,), bias=False)
    with pytest.raises(ValueError, match=r"sizes \[4, 3\] add up to 7, not to the weight's 6"):
        fused_linear(x, [layer.weight], None, [4, 3])
    with pytest.raises(ValueError, match=r"one weight a piece, got weights of \[6, 6\] rows"):
        fused_linear(x, [layer.weight, layer.weight], None, [4, 8])
    with pytest.raises(ValueError, match="all have a bias or none"):
        project_all(x, layer, nn.Linear(8, 2, dtype=torch.float64))


def test_uncast_weights_are_saved_as_themselves_and_gradients_own_their_storage():
    # No cast (float64, no autocast): backward stacks the weights again rather than keeping
    # a copy alive from forward (FSDP frees unsharded parameters after forward).
    layers = linears((4, 4), bias=False)
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    a, b = project_all(x, *layers)
    saved = a.grad_fn.saved_tensors
    weight_ptrs = {m.weight.data_ptr() for m in layers}
    assert {t.data_ptr() for t in saved[1:]} == weight_ptrs
    (a * b).sum().backward()
    storages = {m.weight.grad.untyped_storage().data_ptr() for m in layers}
    assert len(storages) == 2


def test_meta_tensors_and_float64_under_autocast_behave_as_linear():
    with torch.device("meta"):
        layers = linears((4, 2), bias=False, dtype=torch.float32)
        x = torch.empty(3, 8, requires_grad=True)
        assert [t.shape for t in project_all(x, *layers)] == [(3, 4), (3, 2)]
    layers = linears((4, 2), bias=False)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast leaves float64 alone
        outs = project_all(x, *layers)
    assert all(o.dtype == torch.float64 for o in outs)
    assert rel_error(outs[1], layers[1](x)) < 1e-14


@pytest.mark.parametrize("bias", [False, True])
def test_linear_trains_as_nn_linear_and_runs_plain_without_grad(bias):
    torch.manual_seed(0)
    ours = Linear(8, 5, bias=bias, dtype=torch.float64)
    plain = nn.Linear(8, 5, bias=bias, dtype=torch.float64)
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(3, 4, 8, dtype=torch.float64, requires_grad=True)
    y = ours(x)
    assert type(y.grad_fn).__name__ == "_FusedLinearBackward"
    assert rel_error(y, plain(x)) < 1e-14
    y.square().sum().backward()
    got = grads([x, *ours.parameters()])
    x.grad = None
    plain(x).square().sum().backward()
    assert all(rel_error(a, b) < 1e-13 for a, b in
               zip(got, grads([x, *plain.parameters()]), strict=True))
    with torch.no_grad():
        assert ours(x).grad_fn is None


def test_weight_gradients_are_in_each_parameters_dtype_under_autocast():
    # On a CPU the product is bf16 and cast (no bf16 -> float32 matmul there); on CUDA the
    # matmul stores float32 (tests/gpu/test_projection_cuda.py).
    torch.manual_seed(0)
    w, b = torch.randn(6, 8, requires_grad=True), torch.randn(6, requires_grad=True)
    x = torch.randn(10, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear(x, w, b)
    assert y.dtype == torch.bfloat16
    (y.float() * torch.arange(6.0)).sum().backward()
    assert w.grad.dtype == b.grad.dtype == x.grad.dtype == torch.float32
    g = torch.arange(6.0).expand(10, 6).to(torch.bfloat16)
    assert rel_error(w.grad, (g.t() @ x.to(torch.bfloat16)).float()) == 0
    assert rel_error(b.grad, g.float().sum(0)) == 0


def test_every_projection_of_the_model_is_a_stripes_linear():
    model = StripedLM(load_config(ArchFile, TINY).model)
    found = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert found and all(isinstance(model.get_submodule(n), Linear) for n in found), found


@pytest.mark.parametrize("used", [(0, 1, 2), (0, 2)])
@pytest.mark.parametrize("frozen", [False, True])
def test_in_place_accumulation_adds_into_grad_as_autograd_would(used, frozen, monkeypatch):
    """Three micro-batches: the first creates .grad, the next two add into that very tensor
    inside the matmul; the sums equal autograd's own accumulation (also where a piece goes
    unused, whose rows must keep what they hold, and beside a frozen weight)."""
    adds = count_in_place_adds(monkeypatch)
    layers = linears((8, 3, 6), bias=True)
    layers[1].weight.requires_grad_(not frozen)
    params = [p for m in layers for p in m.parameters() if p.requires_grad]
    xs = [torch.randn(2, 5, 8, dtype=torch.float64) for _ in range(3)]

    def micro_batches(in_place: bool) -> list[torch.Tensor | None]:
        for x in xs:
            with StepFusion().micro_batch() if in_place else contextlib.nullcontext():
                outs = project_all(x, *layers)
                sum((outs[i] * (i + 1)).square().sum() for i in used).backward()
        return grads(params)

    want = micro_batches(False)
    assert adds[0] == 0
    clear(params)
    first = None
    for n, x in enumerate(xs):
        with StepFusion().micro_batch():
            outs = project_all(x, *layers)
            sum((outs[i] * (i + 1)).square().sum() for i in used).backward()
        if n == 0:
            first = layers[0].weight.grad.data_ptr()
    assert layers[0].weight.grad.data_ptr() == first  # added into, not replaced
    # micro-batches 2 and 3 add each used piece's rows into .grad inside its matmul
    assert adds[0] == 2 * sum(1 for i in used if not (frozen and i == 1))
    got = grads(params)
    assert all(rel_error(a, b) < 1e-13 for a, b in zip(got, want, strict=True))
    assert layers[1].weight.grad is None if frozen else layers[1].weight.grad is not None


def test_in_place_accumulation_is_decided_at_forward(monkeypatch):
    adds = count_in_place_adds(monkeypatch)
    torch.manual_seed(0)
    layer = Linear(8, 4, bias=False, dtype=torch.float64)
    x = torch.randn(3, 8, dtype=torch.float64)
    layer(x).sum().backward()
    once = layer.weight.grad.clone()
    y = layer(x)  # forward outside the context: backward inside it changes nothing
    assert y.grad_fn.grad_owners is None
    with StepFusion().micro_batch():
        y.sum().backward()
    assert rel_error(layer.weight.grad, 2 * once) < 1e-14 and adds[0] == 0
    with StepFusion().micro_batch():
        y = layer(x)
    grad = layer.weight.grad
    y.sum().backward()  # forward inside: added in place, though backward runs outside
    assert layer.weight.grad is grad and rel_error(grad, 3 * once) < 1e-14 and adds[0] == 1


def test_step_fusion_casts_each_weight_once_until_it_changes():
    """Under autocast the float32 weights are cast and stacked once a step: later forwards
    save the very same bf16 tensor, until a weight changes in place or the step clears."""
    layers = linears((8, 3), bias=False, dtype=torch.float32)
    x = torch.randn(4, 8)
    fusion = StepFusion()

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        with fusion.micro_batch(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = project_all(x, *layers)[1]
        return out, out.grad_fn.saved_tensors[1]  # (x, the cast stack)

    (a, cast_a), (b, cast_b) = forward(), forward()
    assert cast_a is cast_b and cast_a.dtype == torch.bfloat16 and torch.equal(a, b)
    with torch.no_grad():
        layers[1].weight.add_(1.0)  # an update in place: its version moves
    c, cast_c = forward()
    assert cast_c is not cast_a
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(c, layers[1](x))
    fusion.clear()
    assert forward()[1] is not cast_c


def test_step_fusion_without_cast_caching_casts_in_every_forward(monkeypatch):
    """Under activation checkpointing the engine keeps the in-place accumulation but not the
    casts, which would otherwise outlive the forward that freed them."""
    adds = count_in_place_adds(monkeypatch)
    layer = Linear(8, 4, bias=False)
    x = torch.randn(3, 8)
    fusion = StepFusion(cache_casts=False)
    saved = []
    for _ in range(2):
        with fusion.micro_batch(), torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
            saved.append(y.grad_fn.saved_tensors[1])
            y.float().sum().backward()
    assert saved[0] is not saved[1] and saved[0].dtype == torch.bfloat16
    assert adds[0] == 1
