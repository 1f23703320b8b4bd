"""Launchers and the autograd Function for chunked scalar-decay linear attention (kernels in
kernel.py, with the equations).

Forward: the state scan (h_i for every chunk, and the final state), then the output kernel.
The per-chunk states are not kept for backward: [N_chunks, H, Dk, Dv] (Dk Dv / C values a
token and head, 256 at Dk = Dv = 128, C = 64) outweighs q, k and v together, so backward
runs the state scan again (one more pass over K and V), then the reverse scan for dh, then
dq/dk (with the decay's gradient when asked) and dv.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import triton

from stripes.kernels.scalar_decay import kernel

MIN_CHUNK, MAX_CHUNK = 16, 128  # tl.dot needs 16 rows; [128, 128] tiles need 8 warps already
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_chunk(chunk_size: int) -> int:
    """The chunk the kernels tile by: chunk_size rounded up to a power of two in [16, 128].
    Chunking changes only the order of a sum (every chunk size computes the same function),
    so the Triton path takes the nearest size its tiles allow."""
    return min(MAX_CHUNK, max(MIN_CHUNK, triton.next_power_of_2(chunk_size)))


def _blocks(dk: int, dv: int, widest: int = 64) -> tuple[int, int]:
    """(BK, BV): `widest`-wide tiles of the state, narrower when the head is (at least 16)."""
    return (min(widest, max(16, triton.next_power_of_2(dk))),
            min(widest, max(16, triton.next_power_of_2(dv))))


@dataclass(frozen=True)
class Launch:
    """Triton launch settings of one kernel."""
    warps: int = 4
    stages: int = 3


@dataclass(frozen=True)
class LaunchConfig:
    """How each kernel is launched; `for_chunk` gives the defaults, which
    bench/scalar_decay_sweep.py checks kernel by kernel. scan_block narrows the scans' state
    tiles only: at long sequences few sequences x heads remain, and narrower tiles give the
    scans more programs. head_split (rounded down to a divisor of the v-heads per q/k head)
    gives dq/dk more programs when many v-heads share a q/k head, at the cost of float32
    partial sums."""
    scan: Launch = field(default_factory=lambda: Launch(stages=2))
    output: Launch = field(default_factory=Launch)
    dq_dk: Launch = field(default_factory=Launch)
    dv: Launch = field(default_factory=Launch)
    scan_block: int = 64
    head_split: int = 1  # dq/dk: programs sharing one q/k head's v-heads (see the kernel)

    @staticmethod
    def for_chunk(chunk: int) -> LaunchConfig:
        """The defaults at a chunk of `chunk` rows. The output, dq/dk and dv kernels each hold
        [C, C] float32 tiles; at C = 128 one is 128 registers a thread over 4 warps, and the
        spills made dq/dk 1.8x slower than at 8 warps (BENCHMARKS.md, hybrid-1b's SSD). The
        scans hold no [C, C] tile and keep 4 warps. Below 128 they take 2 stages (the
        forward scan 1.4x faster than at 3 at chunk 64, the reverse no slower); at 128, 3
        (2 measured 7-12% slower there)."""
        if chunk < 128:
            return LaunchConfig()
        wide = Launch(warps=8)
        return LaunchConfig(scan=Launch(), output=wide, dq_dk=wide, dv=wide)


@torch.compiler.disable
def tables(bounds: tuple[tuple[int, int], ...], chunk: int, device: torch.device):
    """`build_tables`, cached, outside torch.compile's tracing (dynamo would trace through
    the cache on every call). Under CUDA graph capture only a cached layout can be used: a
    copy recorded into a graph would read a pinned buffer that is reused after capture."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        info = build_tables.cache_info()
        found = build_tables(bounds, chunk, device)
        if build_tables.cache_info().misses != info.misses:
            raise RuntimeError("chunk_scalar_decay: a new sequence layout during CUDA graph "
                               "capture; run the same shapes once before capturing")
        return found
    return build_tables(bounds, chunk, device)


@functools.lru_cache(maxsize=256)
def build_tables(bounds: tuple[tuple[int, int], ...], chunk: int, device: torch.device):
    """From ((first flat token, end), ...) per sequence: (seqs int32 [3, S]: first token,
    length, first chunk; chunks int32 [2, N_chunks]: first token, length), on device.

    Cached: unpacked batches repeat their bounds every step, and then no copy is made at
    all. A new layout is copied from pinned memory without blocking, so the host never
    waits for the GPU's queue here."""
    seqs, chunks = [], []
    for start, end in bounds:
        seqs.append((start, end - start, len(chunks)))
        chunks.extend((c, min(chunk, end - c)) for c in range(start, end, chunk))
    pin = device.type == "cuda"
    seq_table = torch.tensor(seqs, dtype=torch.int32).reshape(-1, 3).T.contiguous()
    chunk_table = torch.tensor(chunks, dtype=torch.int32).reshape(-1, 2).T.contiguous()
    return tuple((t.pin_memory() if pin else t).to(device, non_blocking=pin)
                 for t in (seq_table, chunk_table))


class _Problem:
    """Shapes and launch settings shared by the forward and backward launches."""

    def __init__(self, q, v, seqs, chunks, chunk, launch: LaunchConfig):
        self.n_tok, self.hk, self.dk = q.shape
        self.h, self.dv = v.shape[1:]
        self.seqs, self.chunks, self.chunk = seqs, chunks, chunk
        self.n_seqs, self.n_chunks = seqs.shape[1], chunks.shape[1]
        self.bk, self.bv = _blocks(self.dk, self.dv)
        self.k_blocks = triton.cdiv(self.dk, self.bk)
        self.v_blocks = triton.cdiv(self.dv, self.bv)
        self.ieee = q.dtype == torch.float32
        self.launch = launch

    def consts(self, launch: Launch, blocks: tuple[int, int] | None = None) -> dict:
        bk, bv = blocks or (self.bk, self.bv)
        return dict(H=self.h, HK=self.hk, DK=self.dk, DV=self.dv, C=self.chunk, BK=bk, BV=bv,
                    IEEE=self.ieee, num_warps=launch.warps, num_stages=launch.stages)

    def scan(self, a, y, g, first, store_last, reverse, like):
        """The per-chunk states [N_chunks, H, Dk, Dv] in `like`'s dtype, and the last one
        [S, H, Dk, Dv] float32 (or None): see kernel._scan_kernel."""
        states = torch.empty(self.n_chunks, self.h, self.dk, self.dv, dtype=like.dtype,
                             device=like.device)
        last = (torch.empty(self.n_seqs, self.h, self.dk, self.dv, dtype=torch.float32,
                            device=like.device) if store_last else None)
        bk, bv = _blocks(self.dk, self.dv, self.launch.scan_block)
        grid = (self.n_seqs * self.h * triton.cdiv(self.dk, bk) * triton.cdiv(self.dv, bv),)
        kernel._scan_kernel[grid](
            a, y, g, states, states if first is None else first,
            states if last is None else last, self.seqs, self.n_seqs,
            HAS_FIRST=first is not None, STORE_LAST=store_last, REVERSE=reverse,
            **self.consts(self.launch.scan, (bk, bv)))
        return states, last

    def output_kernel(self, q, k, v, g, h):
        """O [N_tok, H, Dv] from the entering states h: see kernel._output_kernel."""
        o = torch.empty_like(v)
        if self.n_chunks:
            kernel._output_kernel[(self.n_chunks * self.v_blocks, self.h)](
                q, k, v, g, h, o, self.chunks, self.n_chunks, **self.consts(self.launch.output))
        return o

    def dq_dk_kernel(self, q, k, v, g, do, h, dh, need_db):
        """dQ, dK in their dtype and dL/dg [N_tok, H] float32 (or None)."""
        split = math.gcd(self.launch.head_split, self.h // self.hk)
        parts = (split, *q.shape)
        dq, dk = ((torch.empty_like(q), torch.empty_like(k)) if split == 1 else
                  (torch.empty(parts, dtype=torch.float32, device=q.device) for _ in "qk"))
        db = (torch.zeros(self.k_blocks, self.n_tok, self.h, dtype=torch.float32,
                          device=q.device) if need_db else None)
        if self.n_chunks:
            kernel._dq_dk_kernel[(self.n_chunks * self.k_blocks, self.hk * split)](
                q, k, v, g, do, h, dh, dq, dk, dq if db is None else db, self.chunks,
                self.n_chunks, self.n_tok, SPLIT=split, STORE_DB=need_db,
                **self.consts(self.launch.dq_dk))
        if split > 1:
            dq, dk = dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype)
        return dq, dk, None if db is None else db.sum(0)

    def dv_kernel(self, q, k, g, do, dh):
        dv = torch.empty(self.n_tok, self.h, self.dv, dtype=q.dtype, device=q.device)
        if self.n_chunks:
            kernel._dv_kernel[(self.n_chunks * self.v_blocks, self.h)](
                q, k, g, do, dh, dv, self.chunks, self.n_chunks, **self.consts(self.launch.dv))
        return dv


def forward(q, k, v, g, initial_state, p: _Problem, return_state):
    """q, k [N_tok, HK, Dk], v [N_tok, H, Dv], g [N_tok, H] float32 -> o [N_tok, H, Dv],
    final state or None."""
    h, final = p.scan(k, v, g, initial_state, return_state, False, k)
    return p.output_kernel(q, k, v, g, h), final


def backward(q, k, v, g, do, d_final, initial_state, p: _Problem, need_d_init, need_db):
    """Gradients of q, k, v (their dtype), of the initial state (float32, or None) and of
    the log decays g [N_tok, H] (float32, or None)."""
    h, _ = p.scan(k, v, g, initial_state, False, False, k)
    dh, d_init = p.scan(q, do, g, d_final, need_d_init, True, k)
    dq, dk, db = p.dq_dk_kernel(q, k, v, g, do, h, dh, need_db)
    return dq, dk, p.dv_kernel(q, k, g, do, dh), d_init, db


class ChunkScalarDecayFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, bounds, chunk, return_state, launch):
        B, T = q.shape[:2]
        flat = [t.reshape(B * T, *t.shape[2:]).contiguous() for t in (q, k, v)]
        g_flat = g.reshape(B * T, -1).to(torch.float32).contiguous()
        init = None if initial_state is None else initial_state.to(torch.float32).contiguous()
        seqs, chunks = tables(tuple(bounds), chunk, q.device)
        p = _Problem(flat[0], flat[2], seqs, chunks, chunk, launch)
        o, final = forward(*flat, g_flat, init, p, return_state)
        ctx.save_for_backward(*flat, g_flat, init)
        ctx.p, ctx.shape = p, (B, T)
        ctx.init_dtype = None if initial_state is None else initial_state.dtype
        ctx.g_dtype = g.dtype
        return o.view(B, T, *o.shape[1:]), final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_o, d_final):
        q, k, v, g, init = ctx.saved_tensors
        B, T = ctx.shape
        do = d_o.reshape(B * T, *d_o.shape[2:]).to(q.dtype).contiguous()
        d_final = None if d_final is None else d_final.to(torch.float32).contiguous()
        need_d_init = init is not None and ctx.needs_input_grad[4]
        need_db = ctx.needs_input_grad[3]
        dq, dk, dv, d_init, db = backward(q, k, v, g, do, d_final, init, ctx.p, need_d_init,
                                          need_db)
        dg = None if db is None else db.view(B, T, -1).to(ctx.g_dtype)
        if d_init is not None:
            d_init = d_init.to(ctx.init_dtype)
        return (dq.view(B, T, *dq.shape[1:]), dk.view(B, T, *dk.shape[1:]),
                dv.view(B, T, *dv.shape[1:]), dg, d_init, None, None, None, None)


def chunk_scalar_decay(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                       bounds: list[tuple[int, int]], initial_state: torch.Tensor | None = None,
                       return_state: bool = False, chunk_size: int = 64,
                       launch: LaunchConfig | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton path shared by retention and SSD; its callers check shapes.

    q, k: [B, T, HK, Dk]; v: [B, T, H, Dv] with H a multiple of HK; g: [B, T, H] log decays
    (<= 0, unchecked: a positive one would exponentiate upwards); bounds: [(first flat
    token, end)] of each of the S sequences, in order and covering all of the B * T flat
    tokens; initial_state: [S, H, Dk, Dv] or None. Returns o [B, T, H, Dv] in q's dtype and
    the final states [S, H, Dk, Dv] float32 (or None). Gradients flow to q, k, v, g and the
    initial state, and from the final state. launch: how the kernels are launched (None:
    `LaunchConfig.for_chunk`, or what bench/scalar_decay_sweep.py tries)."""
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        raise ValueError(f"chunk_scalar_decay: q, k, v must share one of float32, bfloat16, "
                         f"float16, got {q.dtype}, {k.dtype}, {v.dtype}")
    chunk = triton_chunk(chunk_size)
    return ChunkScalarDecayFunction.apply(q, k, v, g, initial_state, bounds, chunk,
                                          return_state, launch or LaunchConfig.for_chunk(chunk))
