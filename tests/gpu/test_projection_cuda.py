"""arch/projection.py on CUDA: weight gradients stored in float32 by the bf16 matmul itself,
eager and under torch.compile."""

from __future__ import annotations

import pytest
import torch

from stripes.arch.projection import Linear, project_split

from numerics import rel_error

pytestmark = pytest.mark.gpu


def layer_and_input(seed: int = 0) -> tuple[Linear, torch.Tensor]:
    torch.manual_seed(seed)
    layer = Linear(256, 384, bias=True, device="cuda")
    return layer, torch.randn(2, 512, 256, device="cuda", requires_grad=True)


def test_bf16_weight_gradient_is_the_float32_sum_of_bf16_products():
    layer, x = layer_and_input()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert layer.weight.grad.dtype == torch.float32
    g, xb = dy.reshape(-1, 384).double(), x.detach().reshape(-1, 256).bfloat16().double()
    exact = g.t() @ xb  # the bf16 operands' products summed exactly
    rounded = exact.bfloat16().double()  # what a bf16 matmul output would hold
    err = rel_error(layer.weight.grad.double(), exact)
    assert err < 1e-5, err
    assert err < rel_error(rounded, exact) / 10
    assert rel_error(layer.bias.grad.double(), g.sum(0)) < 1e-5


def test_compiled_backward_matches_eager():
    layer, x = layer_and_input(1)

    def loss(x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            z, xbc, dt = project_split(x, layer, [128, 192, 64])
            return (z.float() * xbc[..., :128].float()).sum() + layer(dt.float()[..., :1]
                                                                     .expand(-1, -1, 256)).sum()

    loss(x).backward()
    eager = [t.grad.clone() for t in (x, layer.weight, layer.bias)]
    for t in (x, layer.weight, layer.bias):
        t.grad = None
    torch.compile(loss)(x).backward()
    for a, b in zip((x.grad, layer.weight.grad, layer.bias.grad), eager, strict=True):
        assert a.dtype == b.dtype and rel_error(a, b) < 1e-2
