"""TorchEngine.step queues the update on a device-side verdict: a non-finite loss or gradient
leaves parameters and optimizer state as they were, with the fused AdamW (found_inf, no host
read) and with the foreach one (the host reads the verdict); a finite step applies."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from stripes.arch import projection
from stripes.arch.model import StripedLM
from stripes.train.config import load_train_config
from stripes.train.distributed import World
from stripes.train.engine import TorchEngine

ROOT = Path(__file__).resolve().parents[1]


def build(fused: bool) -> TorchEngine:
    cfg = load_train_config(ROOT / "configs" / "train" / "tiny.yaml",
                            [f"optim.fused={str(fused).lower()}", "grad_clip=1.0"])
    torch.manual_seed(0)
    model = StripedLM(cfg.model)
    model.init_weights()
    world = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    return TorchEngine(model, cfg, "single", world, accum=1, bf16=False)


def backward(engine: TorchEngine, poison: bool = False) -> torch.Tensor:
    ids = torch.randint(0, 4096, (2, 16))
    loss = engine.module(ids, None, ids.roll(-1, dims=1))
    engine.backward(loss)
    if poison:  # one non-finite gradient entry
        next(p for p in engine.model.parameters() if p.grad is not None).grad.view(-1)[0] = \
            float("nan")
    return loss.detach()


def snapshot(engine: TorchEngine) -> list[torch.Tensor]:
    state = [v for s in engine.optimizer.state.values() for v in s.values()]
    return [p.detach().clone() for p in engine.model.parameters()] + \
        [v.clone() for v in state if torch.is_tensor(v)]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("bad", ["loss", "gradient"])
def test_non_finite_step_changes_nothing(fused, bad):
    engine = build(fused)
    assert engine.fused is fused
    engine.step(1e-3, torch.isfinite(backward(engine)))  # a first step: optimizer state exists
    before = snapshot(engine)
    loss = backward(engine, poison=bad == "gradient")
    finite = torch.tensor(False) if bad == "loss" else torch.isfinite(loss)
    grad_norm, applied = engine.step(1e-3, finite)
    assert applied.dim() == 0 and not bool(applied)
    if bad == "gradient":
        assert not torch.isfinite(grad_norm)
    after = snapshot(engine)
    assert len(after) == len(before)
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert all(p.grad is None for p in engine.model.parameters())


@pytest.mark.parametrize("fused", [True, False])
def test_finite_step_applies(fused):
    engine = build(fused)
    before = [p.detach().clone() for p in engine.model.parameters()]
    grad_norm, applied = engine.step(1e-3, torch.isfinite(backward(engine)))
    assert bool(applied) and float(grad_norm) > 0
    moved = [not torch.equal(p, b) for p, b in zip(engine.model.parameters(), before,
                                                   strict=True)]
    assert sum(moved) > len(moved) // 2
    steps = [s["step"] for s in engine.optimizer.state.values()]
    assert steps and all(float(s) == 1 for s in steps)


@pytest.mark.parametrize("grad_clip", [1e-3, 1e3, None])
def test_fused_clipping_matches_foreach(grad_clip):
    """The fused AdamW clips by dividing inside its kernel (grad_scale); the foreach path clips
    the gradients first. Both steps must land on the same parameters and moments (Adam's first
    step moves by about lr whatever the gradients' scale; the moments show the clip)."""
    moved = []
    for fused in (True, False):
        engine = build(fused)
        engine.grad_clip = grad_clip
        torch.manual_seed(1)
        grad_norm, applied = engine.step(1e-2, torch.isfinite(backward(engine)))
        assert bool(applied)
        moved.append(snapshot(engine))
    if grad_clip == 1e-3:
        assert float(grad_norm) > 10 * grad_clip  # the clip was active
    for a, b in zip(*moved, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_single_process_adds_weight_gradients_in_place_across_micro_batches(monkeypatch):
    """The single backend's weight-gradient matmuls add into .grad from the second
    micro-batch on (arch/projection.py); the sums equal autograd's own accumulation."""
    engine = build(fused=False)
    assert engine.fusion is not None and engine.fusion.cache_casts
    adds, mm_into = [0], projection._mm_into

    def counting(a, b, out, accumulate=False):
        adds[0] += accumulate
        mm_into(a, b, out, accumulate)

    monkeypatch.setattr(projection, "_mm_into", counting)
    torch.manual_seed(2)
    batches = [torch.randint(0, 4096, (2, 16)) for _ in range(3)]

    def micro_batches(through_engine: bool) -> dict[str, torch.Tensor]:
        for i, ids in enumerate(batches):
            with engine.accumulating(last=i == 2) if through_engine else nullcontext():
                engine.backward(engine.module(ids, None, ids.roll(-1, dims=1)) / 3)
        grads = {n: p.grad.clone() for n, p in engine.model.named_parameters()}
        engine.model.zero_grad(set_to_none=True)
        return grads

    first = engine.model.blocks[0].mlp.down_proj.weight
    got = micro_batches(True)
    linears = sum(isinstance(m, projection.Linear) for m in engine.model.modules())
    assert adds[0] >= 2 * linears  # micro-batches 2 and 3, every Linear at least once
    adds[0] = 0
    want = micro_batches(False)
    assert adds[0] == 0 and got.keys() == want.keys()
    for name, grad in got.items():
        torch.testing.assert_close(grad, want[name], rtol=1e-6, atol=1e-9, msg=name)
    with engine.accumulating(last=True):  # a second micro-batch adds into the first's .grad
        engine.backward(engine.module(batches[0], None, batches[0]))
        grad = first.grad
        engine.backward(engine.module(batches[1], None, batches[1]))
    assert first.grad is grad


def test_compiled_blocks_keep_autograds_accumulation():
    cfg = load_train_config(ROOT / "configs" / "train" / "tiny.yaml", ["parallel.compile=true"])
    model = StripedLM(cfg.model)
    world = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert TorchEngine(model, cfg, "single", world, accum=2, bf16=False).fusion is None
    cfg = load_train_config(ROOT / "configs" / "train" / "tiny.yaml",
                            ["parallel.activation_checkpointing=block"])
    fusion = TorchEngine(StripedLM(cfg.model), cfg, "single", world, accum=2, bf16=False).fusion
    assert fusion is not None and not fusion.cache_casts  # checkpointed: no cast outlives it
