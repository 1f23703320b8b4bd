"""The optimizer's parameter groups (also under wrappers) and the learning-rate schedule."""

from __future__ import annotations

import logging
from itertools import pairwise

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from stripes.arch import StripedLM
from stripes.core import log as core_log
from stripes.core.config import ConfigError
from stripes.train.config import SCHEDULES, OptimConfig, ScheduleConfig
from stripes.train.optim import WRAPPER_SEGMENTS, build_optimizer, canonical_name
from stripes.train.schedule import AFTER_WARMUP, apply_lr, lr_at


def bare(cfg) -> StripedLM:
    torch.manual_seed(0)
    model = StripedLM(cfg)
    model.init_weights()
    return model


def group_names(model, optimizer) -> dict[str, set[str]]:
    """Canonical parameter names of each optimizer group, by the group's name."""
    by_id = {id(p): canonical_name(n) for n, p in model.named_parameters()}
    return {g["name"]: {by_id[id(p)] for p in g["params"]} for g in optimizer.param_groups}


# -- optimizer ----------------------------------------------------------------------------------
def test_every_trainable_parameter_is_in_exactly_one_group(tiny_cfg):
    model = bare(tiny_cfg)
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.1), "cpu")
    decay, no_decay = (g["params"] for g in optimizer.param_groups)
    ids = [id(p) for p in decay + no_decay]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


def test_no_decay_group_is_what_the_model_declares(tiny_cfg):
    model = bare(tiny_cfg)
    groups = group_names(model, build_optimizer(model, OptimConfig(), "cpu"))
    assert groups["no_decay"] == set(model.no_decay_parameter_names())
    # Norms, biases, embeddings, and 2-D parameters only a mixer's declaration protects.
    for name in ("embed.weight", "norm.weight", "blocks.1.mixer.conv1d.bias",
                 "blocks.1.mixer.A_log", "blocks.5.mixer.residue_re"):
        assert name in groups["no_decay"]
    assert "blocks.0.mixer.in_proj.weight" in groups["decay"]
    assert "lm_head.weight" in groups["decay"]


def test_frozen_parameters_are_left_out(tiny_cfg):
    model = bare(tiny_cfg)
    model.embed.weight.requires_grad_(False)
    model.blocks[0].mixer.in_proj.weight.requires_grad_(False)
    groups = group_names(model, build_optimizer(model, OptimConfig(), "cpu"))
    everything = groups["decay"] | groups["no_decay"]
    assert "embed.weight" not in everything
    assert "blocks.0.mixer.in_proj.weight" not in everything
    assert len(everything) == sum(p.requires_grad for p in model.parameters())


def test_only_the_decay_group_decays(tiny_cfg):
    # With zero gradients Adam's update is 0/(0 + eps) = 0, so what changes is decay alone:
    # p <- p x (1 - lr x weight_decay) in the decay group, nothing in the other.
    model = bare(tiny_cfg)
    optimizer = build_optimizer(model, OptimConfig(lr=0.1, weight_decay=0.5), "cpu")
    before = [[p.detach().clone() for p in g["params"]] for g in optimizer.param_groups]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p, old in zip(optimizer.param_groups[0]["params"], before[0], strict=True):
        torch.testing.assert_close(p.detach(), old * (1 - 0.1 * 0.5))
    for p, old in zip(optimizer.param_groups[1]["params"], before[1], strict=True):
        assert torch.equal(p.detach(), old)


def test_canonical_name_strips_every_wrapper_segment():
    assert canonical_name("module._orig_mod.blocks.3._fsdp_wrapped_module."
                          "_checkpoint_wrapped_module.mixer.A_log") == "blocks.3.mixer.A_log"
    assert canonical_name("blocks.3.mixer.A_log") == "blocks.3.mixer.A_log"
    assert len(WRAPPER_SEGMENTS) == 4


class Wrapper(nn.Module):
    """Holds its module under a wrapper's attribute name and forwards attributes, like DDP's
    `module`, FSDP1's `_fsdp_wrapped_module` and the real wrappers do."""

    def __init__(self, inner: nn.Module, attr: str) -> None:
        super().__init__()
        self.attr = attr
        setattr(self, attr, inner)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__(self.attr), name)


@pytest.mark.parametrize("segment", sorted(WRAPPER_SEGMENTS))
def test_groups_are_the_same_when_a_block_is_wrapped(tiny_cfg, segment):
    ref = bare(tiny_cfg)
    reference = group_names(ref, build_optimizer(ref, OptimConfig(), "cpu"))
    model = bare(tiny_cfg)
    model.blocks[5] = Wrapper(model.blocks[5], segment)  # Hyena-LI: 2-D declared residues
    assert f"blocks.5.{segment}.mixer.residue_re" in dict(model.named_parameters())
    assert group_names(model, build_optimizer(model, OptimConfig(), "cpu")) == reference


# torch.compile imports inductor, whose own modules still use the deprecated script_method.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_groups_are_the_same_under_real_wrappers(tiny_cfg):
    ref = bare(tiny_cfg)
    reference = group_names(ref, build_optimizer(ref, OptimConfig(), "cpu"))
    model = bare(tiny_cfg)
    model.blocks[5] = checkpoint_wrapper(model.blocks[5])
    model.blocks[1] = torch.compile(model.blocks[1])  # lazy: nothing compiles until called
    wrapped = torch.compile(model)
    names = dict(wrapped.named_parameters())
    assert "_orig_mod.blocks.5._checkpoint_wrapped_module.mixer.residue_re" in names
    assert "_orig_mod.blocks.1._orig_mod.mixer.A_log" in names
    assert group_names(wrapped, build_optimizer(wrapped, OptimConfig(), "cpu")) == reference


def test_a_declared_name_matching_nothing_is_refused(tiny_cfg, monkeypatch):
    model = bare(tiny_cfg)
    declared = model.no_decay_parameter_names() + ["blocks.0.mixer.pole"]
    monkeypatch.setattr(model, "no_decay_parameter_names", lambda: declared)
    with pytest.raises(ValueError, match=r"blocks\.0\.mixer\.pole"):
        build_optimizer(model, OptimConfig(), "cpu")


@pytest.mark.parametrize(("fused", "device_type", "expect_fused"), [
    (None, "cuda", True), (None, "cpu", False), (True, "cpu", True), (False, "cuda", False),
])
def test_fused_or_foreach(tiny_cfg, fused, device_type, expect_fused):
    optimizer = build_optimizer(bare(tiny_cfg), OptimConfig(fused=fused), device_type)
    for group in optimizer.param_groups:
        assert bool(group["fused"]) is expect_fused
        assert bool(group["foreach"]) is not expect_fused


def test_group_sizes_are_logged_once(tiny_cfg, caplog, monkeypatch):
    monkeypatch.setattr(core_log, "_said", set())
    model = bare(tiny_cfg)
    with caplog.at_level(logging.INFO, logger="stripes"):
        build_optimizer(model, OptimConfig(), "cpu")
        build_optimizer(model, OptimConfig(), "cpu")
    lines = [r.getMessage() for r in caplog.records if "optimizer: AdamW" in r.getMessage()]
    n_no_decay = len(model.no_decay_parameter_names())
    assert len(lines) == 1
    assert f"no-decay group {n_no_decay} tensors" in lines[0]


# -- schedule -----------------------------------------------------------------------------------
def sched(kind, warmup=10, min_ratio=0.1, decay_fraction=0.2) -> ScheduleConfig:
    return ScheduleConfig(kind=kind, warmup_steps=warmup, min_lr_ratio=min_ratio,
                          decay_fraction=decay_fraction)


def curve(cfg, total, peak=2.0) -> list[float]:
    return [lr_at(s, cfg, peak, total) for s in range(total)]


def test_every_configurable_kind_has_a_shape():
    assert set(AFTER_WARMUP) == set(SCHEDULES)


@pytest.mark.parametrize("kind", SCHEDULES)
def test_warmup_is_linear_from_peak_over_warmup_to_peak(kind):
    lrs = curve(sched(kind, warmup=10), total=100)
    assert lrs[:10] == pytest.approx([2.0 * (s + 1) / 10 for s in range(10)])
    assert lrs[0] == pytest.approx(0.2)
    assert lrs[9] == pytest.approx(2.0)


def test_cosine_key_steps():
    lrs = curve(sched("cosine", warmup=10, min_ratio=0.1), total=101)
    assert lrs[10] == pytest.approx(2.0)  # the first step after warmup is at the peak
    assert lrs[55] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # half way: mean of peak and min
    assert lrs[100] == pytest.approx(0.2)
    assert lrs[40] == pytest.approx(2.0 * 0.775)  # a third of the way: cos(pi/3) = 1/2
    assert all(a >= b for a, b in pairwise(lrs[10:]))


def test_wsd_key_steps():
    lrs = curve(sched("wsd", warmup=10, min_ratio=0.1, decay_fraction=0.2), total=100)
    assert lrs[10:80] == pytest.approx([2.0] * 70)  # stable until the last 20 steps
    assert lrs[80] == pytest.approx(2.0 * (1 - 0.9 / 20))  # already one decrement down
    assert lrs[89] == pytest.approx(2.0 * (1 - 0.9 * 10 / 20))  # half way through the decay
    assert lrs[99] == pytest.approx(0.2)
    steps = [a - b for a, b in pairwise(lrs[79:])]
    assert steps == pytest.approx([2.0 * 0.9 / 20] * 20)  # linear: equal decrements


def test_wsd_decay_never_starts_inside_warmup():
    lrs = curve(sched("wsd", warmup=50, decay_fraction=0.5), total=60)
    assert lrs[49] == pytest.approx(2.0)
    assert lrs[50] == pytest.approx(2.0 * (1 - 0.9 / 10))  # decay spans the 10 steps left
    assert lrs[59] == pytest.approx(0.2)


def test_constant_key_steps():
    lrs = curve(sched("constant", warmup=10), total=100)
    assert lrs[10:] == pytest.approx([2.0] * 90)


@pytest.mark.parametrize("kind", ["cosine", "wsd"])
@pytest.mark.parametrize(("total", "warmup"), [(100, 0), (100, 10), (7, 3), (2, 1), (1, 0)])
def test_decaying_kinds_reach_min_at_the_last_step_and_never_rise(kind, total, warmup):
    lrs = curve(sched(kind, warmup=warmup, min_ratio=0.05), total=total)
    assert lrs[-1] == pytest.approx(2.0 * 0.05)
    assert min(lrs) == pytest.approx(2.0 * 0.05)
    assert all(a >= b for a, b in pairwise(lrs[warmup:]))
    assert max(lrs) == pytest.approx(2.0) or total == 1


@pytest.mark.parametrize("kind", SCHEDULES)
def test_no_warmup_starts_at_the_peak(kind):
    assert lr_at(0, sched(kind, warmup=0), 3e-4, 1000) == pytest.approx(3e-4)


def test_warmup_covering_every_step_ends_at_the_peak():
    lrs = curve(sched("cosine", warmup=5), total=5)
    assert lrs == pytest.approx([0.4, 0.8, 1.2, 1.6, 2.0])


@pytest.mark.parametrize("step", [-1, 100])
def test_steps_outside_the_run_are_refused(step):
    with pytest.raises(ValueError, match=f"step={step}"):
        lr_at(step, sched("cosine"), 1.0, 100)


def test_unknown_kind_lists_the_known_ones():
    with pytest.raises(ConfigError, match="schedule.kind='linear'.*cosine, wsd, constant"):
        lr_at(0, sched("linear"), 1.0, 100)


def test_warmup_longer_than_the_run_is_refused():
    with pytest.raises(ConfigError, match="schedule.warmup_steps=10"):
        lr_at(0, sched("cosine", warmup=10), 1.0, 5)


def test_apply_lr_sets_every_group(tiny_cfg):
    optimizer = build_optimizer(bare(tiny_cfg), OptimConfig(lr=1.0), "cpu")
    apply_lr(optimizer, lr_at(0, sched("cosine"), 1.0, 100))
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1, 0.1])


def test_apply_lr_fills_a_tensor_lr_in_place():
    lr = torch.tensor(1.0)
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=lr)
    apply_lr(optimizer, 0.25)
    assert optimizer.param_groups[0]["lr"] is lr
    assert lr.item() == 0.25
