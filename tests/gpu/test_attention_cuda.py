"""`attn` on a CUDA device: every SDPA backend in bf16 against a float64 reference."""

from __future__ import annotations

import pytest
import torch

from stripes.arch import ArchFile, StripedLM
from stripes.arch.attention import Attention, AttnConfig
from stripes.core.config import load_config

from conftest import TINY
from numerics import rel_error

pytestmark = pytest.mark.gpu
D, H, KV = 512, 4, 2  # head size 128, as in the 1B configs


def pair(backend: str, **kw) -> tuple[Attention, Attention]:
    """The same float32 weights as a module on `backend` and a float64 math reference."""
    torch.manual_seed(0)
    cfg = AttnConfig(n_heads=H, n_kv_heads=KV, backend=backend, **kw)
    cfg.validate(D, "attn")
    fast = Attention(D, cfg).cuda()
    fast.init_weights(0.05, 0.05)
    ref = Attention(D, AttnConfig(n_heads=H, n_kv_heads=KV, backend="math", **kw)).cuda()
    ref.load_state_dict(fast.state_dict())
    return fast, ref.double()


def run(module: Attention, x: torch.Tensor, doc_ids=None, low_precision=False):
    """Output, input gradient and a weight gradient; bf16 autocast as in training."""
    x = x.detach().to(next(module.parameters()).dtype).requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=low_precision):
        y = module(x, doc_ids)
    y.float().pow(2).sum().backward()
    return y, x.grad, module.q_proj.weight.grad


@pytest.mark.parametrize("backend", ["auto", "cudnn", "flash", "efficient", "math"])
def test_backend_matches_float64(backend):
    fast, ref = pair(backend)
    x = torch.randn(2, 1024, D, device="cuda", dtype=torch.float64)
    got, want = run(fast, x, low_precision=True), run(ref, x)
    assert rel_error(got[0], want[0]) < 1e-2  # output: bf16 operands
    for g, w in zip(got[1:], want[1:], strict=True):
        assert rel_error(g, w) < 2e-2  # gradients: one more bf16 matmul chain


@pytest.mark.parametrize("backend", ["auto", "efficient", "math"])
def test_window_and_packed_documents(backend):
    fast, ref = pair(backend, window=100)
    x = torch.randn(2, 512, D, device="cuda", dtype=torch.float64)
    doc_ids = (torch.arange(512, device="cuda") >= 200).long().expand(2, 512)
    got, want = run(fast, x, doc_ids, low_precision=True), run(ref, x, doc_ids)
    assert rel_error(got[0], want[0]) < 1e-2
    for g, w in zip(got[1:], want[1:], strict=True):
        assert rel_error(g, w) < 2e-2


def test_decoding_matches_forward_on_cuda():
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = load_config(ArchFile, TINY).model
    torch.manual_seed(0)
    model = StripedLM(cfg).cuda()
    model.init_weights()
    ids = torch.randint(0, cfg.vocab_size, (2, 48), device="cuda")
    state = model.allocate_state(2, 48)
    out = [model.prefill(ids[:, :10], state)]
    out += [model.step(ids[:, t:t + 1], state) for t in range(10, 48)]
    assert rel_error(torch.cat(out, 1), model(ids)) < 1e-5


@pytest.mark.parametrize("backend", ["auto", "cudnn", "flash", "efficient", "math"])
def test_every_backend_masks_and_decodes(backend):
    """Explicit kernels that take no mask (cuDNN, flash) hand masked and decoding calls to
    `auto`; every backend must still window, pack and decode correctly."""
    torch.manual_seed(0)
    cfg = AttnConfig(n_heads=H, n_kv_heads=KV, backend=backend, window=64)
    cfg.validate(D, "attn")
    attn = Attention(D, cfg).cuda()
    attn.init_weights(0.05, 0.05)
    x = torch.randn(2, 200, D, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        full = attn(x)
        doc_ids = (torch.arange(200, device="cuda") >= 90).long().expand(2, 200)
        packed = attn(x, doc_ids)
        state = attn.allocate_state(2, 200, torch.device("cuda"), torch.bfloat16)
        out = [attn.prefill(x[:, :100], state)]
        out += [attn.step(x[:, t:t + 1], state) for t in range(100, 200)]
    assert rel_error(torch.cat(out, 1), full) < 2e-2
    with torch.autocast("cuda", dtype=torch.bfloat16):
        alone = attn(x[:, 90:])
    assert rel_error(packed[:, 90:], alone) < 2e-2
