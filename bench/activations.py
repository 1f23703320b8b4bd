"""Activation memory: bytes each mixer layer saves for backward, per token (CPU or GPU).

Counts every tensor autograd saves during one forward of one mixer layer (d_model 2048, the
settings of bench/mixers.py), de-duplicated by identity, in float32 without autocast. This
is what a training step holds per layer until backward, before activation checkpointing.
The anchor is the `attn` layer of the same width, measured in the same run.

    python bench/activations.py [--seq 2048] [--batch 1] [--device cpu]
"""

from __future__ import annotations

import argparse

import torch
from bench_mixers_settings import mixers
from torch.autograd.graph import saved_tensors_hooks


def saved_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[id(t)] = t.numel() * t.element_size()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    tokens = args.batch * args.seq
    rows = {}
    for name, module in mixers(args.device).items():
        x = torch.randn(args.batch, args.seq, module.d_model, device=args.device,
                        requires_grad=True)
        rows[name] = saved_bytes(module, x) / tokens
    print(f"saved for backward per token, one layer, T={args.seq}, B={args.batch}, float32")
    print(f"{'kind':10} {'KiB/token':>10} {'vs attn':>8}")
    for name, per_token in rows.items():
        print(f"{name:10} {per_token / 1024:10.1f} {per_token / rows['attn']:8.2f}")


if __name__ == "__main__":
    main()
