"""Activation checkpointing changes memory, never results: every mode gives the same loss and
gradients on the tiny hybrid (all mixer kinds), and saves fewer bytes in the expected order."""

from __future__ import annotations

import gc

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from stripes.arch import StripedLM
from stripes.train.recompute import apply_activation_checkpointing

MODES = ("none", "selective", "block")


class OpOutputs(TorchDispatchMode):
    """Weak references to the storage of every op output: after the forward, those still
    alive are what autograd (or the selective-checkpoint cache) keeps for the backward."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.storages[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        return out

    def alive_bytes(self) -> int:
        gc.collect()
        return sum(n for ref, n in self.storages.values() if not ref.expired())


def run(tiny_cfg, mode: str) -> tuple[float, dict[str, torch.Tensor], int]:
    """(loss, gradients, bytes autograd kept after the forward) for one mode."""
    torch.manual_seed(0)
    model = StripedLM(tiny_cfg)
    model.init_weights()
    apply_activation_checkpointing(model, mode)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, tiny_cfg.vocab_size, (2, 33), generator=gen)
    doc_ids = torch.zeros(2, 32, dtype=torch.long)
    doc_ids[:, 20:] = 1  # a packed second document: the masked paths too
    outputs = OpOutputs()
    with outputs:
        loss = model.loss(ids[:, :-1], ids[:, 1:], doc_ids)
    kept = outputs.alive_bytes()
    loss.backward()
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad
             for n, p in model.named_parameters()}
    return loss.item(), grads, kept


@pytest.fixture(scope="module")
def results(request):
    from stripes.arch import ArchFile
    from stripes.core.config import load_config

    from conftest import TINY

    cfg = load_config(ArchFile, TINY).model
    return {mode: run(cfg, mode) for mode in MODES}


def test_every_mode_gives_the_same_loss_and_gradients(results):
    loss, grads, _ = results["none"]
    for mode in ("selective", "block"):
        other_loss, other_grads, _ = results[mode]
        assert other_loss == pytest.approx(loss, rel=1e-6), mode
        assert other_grads.keys() == grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(other_grads[name], g, rtol=1e-5, atol=1e-7,
                                       msg=lambda m, n=name, md=mode: f"{md} {n}: {m}")


def test_selective_keeps_less_than_none_and_more_than_block(results):
    none, selective, block = (results[m][2] for m in MODES)
    assert none > selective > block, (none, selective, block)
    assert selective < 0.8 * none  # the elementwise work is a real share of the bytes



def test_selective_keeps_no_intermediate_of_a_self_recomputing_function():
    """The FFT conv's backward recomputes its spectra from q, k, v and h: under `selective`
    its FFT outputs are not kept (and may be worked on in place), other FFTs are."""
    from stripes.kernels.dispatch import recomputes_in_backward
    from stripes.train.recompute import _policy

    fft = torch.ops.aten._fft_r2c.default
    assert _policy(None, fft).name == "MUST_SAVE"
    with recomputes_in_backward():
        assert _policy(None, fft).name == "PREFER_RECOMPUTE"
    assert _policy(None, fft).name == "MUST_SAVE"


def test_block_mode_checkpoints_one_summed_stream_per_block(tiny_cfg):
    """A checkpoint keeps its inputs: under `block` the previous block's unadded output is
    added into the stream before each checkpointed block, which then gets no `pending`."""
    model = StripedLM(tiny_cfg)
    model.init_weights()
    apply_activation_checkpointing(model, "block")
    seen = []  # hooks run in order: this one sees what the checkpointed block is called with
    for block in model.blocks:
        block.register_forward_pre_hook(lambda module, args: seen.append(args[2]))
    ids = torch.randint(0, tiny_cfg.vocab_size, (2, 17))
    model.loss(ids[:, :-1], ids[:, 1:])
    assert len(seen) == len(model.blocks) and all(p is None for p in seen)
