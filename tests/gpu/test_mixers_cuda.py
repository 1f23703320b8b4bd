"""Every mixer kind on a CUDA device: meta build, bf16 autocast training step, decoding."""

from __future__ import annotations

import pytest
import torch

from stripes.arch import ArchFile, StripedLM
from stripes.core.config import load_config

from conftest import TINY
from numerics import rel_error

pytestmark = pytest.mark.gpu


def build(dtype=torch.float32) -> StripedLM:
    cfg = load_config(ArchFile, TINY).model
    with torch.device("meta"):
        model = StripedLM(cfg)
    model.to_empty(device="cuda")
    torch.manual_seed(0)
    model.init_weights()
    return model.to(dtype)


def test_bf16_autocast_forward_and_backward_near_float64():
    model = build()
    reference = build(torch.float64)
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, 256, (4, 128), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model.loss(ids[:, :-1], ids[:, 1:])
    ref_loss = reference.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < 1e-2
    ref_grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name
        assert rel_error(p.grad, ref_grads[name].grad) < 5e-2, name


def test_decoding_matches_forward():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = build()
    ids = torch.randint(0, 256, (2, 40), device="cuda")
    state = model.allocate_state(2, 40)
    out = [model.prefill(ids[:, :9], state)]
    out += [model.step(ids[:, t:t + 1], state) for t in range(9, 40)]
    assert rel_error(torch.cat(out, 1), model(ids)) < 1e-4


def test_packed_documents_on_cuda():
    model = build(torch.float64)
    a, b = (torch.randint(0, 256, (1, n), device="cuda") for n in (21, 30))
    doc_ids = torch.tensor([[0] * 21 + [1] * 30], device="cuda")
    packed = model(torch.cat((a, b), 1), doc_ids)
    assert rel_error(packed[:, :21], model(a)) < 1e-10
    assert rel_error(packed[:, 21:], model(b)) < 1e-10


def test_packed_documents_on_cuda_float32():
    """float32: the paths that only float32 runs (hyena_li's modal_conv restarting at each
    document instead of padded rows, the Triton conv and scan kernels)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = build()
    a, b = (torch.randint(0, 256, (1, n), device="cuda") for n in (21, 30))
    doc_ids = torch.tensor([[0] * 21 + [1] * 30], device="cuda")
    packed = model(torch.cat((a, b), 1), doc_ids)
    assert rel_error(packed[:, :21], model(a)) < 1e-4
    assert rel_error(packed[:, 21:], model(b)) < 1e-4
