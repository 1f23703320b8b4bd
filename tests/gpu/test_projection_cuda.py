"""arch/projection.py on CUDA: weight gradients stored in float32 by the bf16 matmul itself,
eager and under torch.compile, and added into .grad in place."""

from __future__ import annotations

import pytest
import torch

from stripes.arch.projection import Linear, StepFusion, project_split

from numerics import rel_error

pytestmark = pytest.mark.gpu


def layer_and_input(seed: int = 0) -> tuple[Linear, torch.Tensor]:
    torch.manual_seed(seed)
    layer = Linear(256, 384, bias=True, device="cuda")
    return layer, torch.randn(2, 512, 256, device="cuda", requires_grad=True)


@pytest.mark.parametrize("compiled", [False, True])
def test_bf16_weight_gradient_is_the_float32_sum_of_bf16_products(compiled):
    layer, x = layer_and_input()

    def forward(x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return layer(x)

    y = (torch.compile(forward) if compiled else forward)(x)
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


def test_split_pieces_and_in_place_accumulation_on_cuda():
    """project_split's pieces (one unused) over two micro-batches, the second adding into
    .grad inside the matmul (addmm with a float32 output), against float64."""
    layer, x = layer_and_input(1)
    reference = torch.nn.Linear(256, 384, device="cuda", dtype=torch.float64)
    reference.load_state_dict(layer.state_dict())
    xs = [x.detach(), torch.randn_like(x)]
    fusion = StepFusion()
    for x in xs:
        with fusion.micro_batch(), torch.autocast("cuda", dtype=torch.bfloat16):
            z, _, dt = project_split(x, layer, [128, 192, 64])
            (z.float().square().sum() + dt.float().sum()).backward()
        z, _, dt = reference(x.bfloat16().double()).split([128, 192, 64], dim=-1)
        (z.square().sum() + dt.sum()).backward()
    assert rel_error(layer.weight.grad.double(), reference.weight.grad) < 1e-2
    assert not layer.weight.grad[128:320].any()  # the unused piece's rows
    assert rel_error(layer.bias.grad.double(), reference.bias.grad) < 1e-2
