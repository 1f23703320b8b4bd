"""Sampling with the decoding protocol: one prefill of the prompt, then one `step` per token.

Every mixer decodes from its recurrent state (KV cache, conv/modal/SSM/retention state), so
the cost per new token does not grow with the text for the recurrent kinds.

On a GPU a step is dozens of small kernels, and launching them from Python costs more than
they take (bench/decode_step.py: 0.4-1.2 ms eager against 0.17-0.21 ms as a graph replay for
one recurrent layer at batch 64). So there the steps run as one CUDA graph: the positions
move to a device tensor (StripedLM.track_position_on_device), every shape stays fixed, the
first step warms the kernels up and the second is captured; each later token is a copy of
the token ids and a replay. `fixed_shapes=True` runs that same code without a graph (how the
CPU tests check it).

    stats = GenerationStats()
    out = generate(model, prompt, 64, temperature=0.8, top_p=0.95, stats=stats)
    stats.decode_tokens_per_s, stats.state_bytes
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from stripes.arch.model import DecodeState, StripedLM


@dataclass
class GenerationStats:
    """Filled by `generate`: what the prompt and the new tokens cost."""

    batch_size: int = 0
    prompt_tokens: int = 0  # per row, prefilled (the shortest prompt)
    new_tokens: int = 0  # steps per row after the prefill, the stop token included
    prefill_s: float = 0.0
    decode_s: float = 0.0  # sampling and steps after the prefill
    state_bytes: int = 0  # the decoding state's tensors, allocated for prompt + max_new_tokens

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.batch_size * self.prompt_tokens / max(self.prefill_s, 1e-9)

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens a second over the whole batch."""
        return self.batch_size * self.new_tokens / max(self.decode_s, 1e-9)


@torch.no_grad()
def generate(model: StripedLM, prompt: torch.Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None, stop_token: int | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None,
             stats: GenerationStats | None = None, cuda_graph: bool | None = None,
             fixed_shapes: bool = False, prompt_lengths: list[int] | None = None
             ) -> torch.Tensor:
    """prompt: [B, T] token ids -> [B, T + n] with n <= max_new_tokens new tokens.

    temperature 0 is greedy decoding; otherwise the logits are divided by it, cut to the
    `top_k` most likely tokens, then to the smallest set whose probability reaches `top_p`
    (nucleus sampling), and sampled. Generation stops early when every row has produced
    `stop_token`; rows that stopped keep emitting it. `on_token` sees each [B] column decided
    after the prefill. cuda_graph: None = on a CUDA device when every mixer declares a
    fixed-shape step.

    Prompts of different lengths: `prompt` right-padded and `prompt_lengths` [B]. The
    shortest length is prefilled as a batch; then every row steps, reading its own prompt
    tokens where it has them (forced, not sampled) and its samples after. Row b of the
    result is its prompt, its max_new_tokens new tokens, then `stop_token` (else 0) up to
    the common width."""
    if cuda_graph is None:
        cuda_graph = prompt.device.type == "cuda" and not model.unfixed_step_layers()
    if cuda_graph and prompt.device.type != "cuda":
        raise ValueError(f"generate: cuda_graph needs a CUDA device, not {prompt.device}")
    # Streams, graphs and syncs follow the current device: make it the prompt's.
    with torch.cuda.device(prompt.device) if prompt.device.type == "cuda" else nullcontext():
        return _generate(model, prompt, max_new_tokens, temperature, top_k, top_p, generator,
                         stop_token, on_token, stats, cuda_graph, fixed_shapes,
                         prompt_lengths)


def _generate(model, prompt, max_new_tokens, temperature, top_k, top_p, generator, stop_token,
              on_token, stats, cuda_graph, fixed_shapes, prompt_lengths) -> torch.Tensor:
    B, T = prompt.shape
    device = prompt.device
    lengths = list(prompt_lengths) if prompt_lengths is not None else [T] * B
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens {max_new_tokens} must be >= 1")
    if len(lengths) != B or not all(1 <= n <= T for n in lengths):
        raise ValueError(f"generate: prompt_lengths {lengths} must give each of the {B} rows "
                         f"a length in [1, {T}]")
    first, last_prompt = min(lengths), max(lengths) - 1  # the longest prompt's last position
    width = last_prompt + 1 + max_new_tokens
    clock = _Clock(device)
    state = model.allocate_state(B, width)
    state_bytes = decode_state_bytes(state)
    logits = model.prefill(prompt[:, :first], state)[:, -1]  # [B, V]
    step = _stepper(model, state, fixed_shapes or cuda_graph, cuda_graph)
    prefill_s = clock.lap()
    pad = 0 if stop_token is None else stop_token
    out = torch.full((B, width), pad, dtype=prompt.dtype, device=device)
    out[:, :T] = prompt
    starts = torch.tensor(lengths, device=device)  # [B] where each row's new tokens begin
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for pos in range(first, width):  # the position whose token is decided now
        sampled = _pick(logits.float(), temperature, top_k, top_p, generator)  # [B]
        reading = pos < starts  # rows still inside their prompt
        new = ~reading & (pos < starts + max_new_tokens)
        token = torch.where(reading, out[:, pos], sampled)
        if stop_token is not None:
            token = torch.where(done & new, stop_token, token)
            done |= new & (token == stop_token)
        out[:, pos] = torch.where(reading | new, token, pad)
        if on_token is not None:
            on_token(token)
        finished = pos == width - 1 or (stop_token is not None and pos >= last_prompt
                                        and bool(done.all()))
        if finished:
            break
        logits = step(token)
    if stats is not None:
        stats.batch_size, stats.prompt_tokens = B, first
        stats.new_tokens = pos + 1 - first
        stats.prefill_s, stats.decode_s = prefill_s, clock.lap()
        stats.state_bytes = state_bytes
    return out[:, :pos + 1]


def _stepper(model: StripedLM, state: DecodeState, fixed_shapes: bool,
             cuda_graph: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """step(token ids [B]) -> logits [B, V] of the next position."""
    if fixed_shapes:
        model.track_position_on_device(state)
    if cuda_graph:
        return _GraphedStep(model, state)
    return lambda token: model.step(token[:, None], state)[:, -1]


class _GraphedStep:
    """model.step as one CUDA graph, on the current device. The first call runs the step
    eagerly on a side stream (kernels compile, the allocator and cuBLAS set up); the second
    captures the step (capturing runs nothing) and replays it; every later call copies its
    tokens into the captured input and replays. The logits returned by a replay are the
    graph's output buffer, valid until the next call."""

    def __init__(self, model: StripedLM, state: DecodeState) -> None:
        self.model, self.state = model, state
        self.tokens: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        if self.tokens is None:  # warm-up
            self.tokens = token[:, None].clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                logits = self.model.step(self.tokens, self.state)[:, -1]
            torch.cuda.current_stream().wait_stream(side)
            return logits
        if self.graph is None:
            length, self.graph = self.state.length, torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self.model.step(self.tokens, self.state)[:, -1]
            self.state.length = length  # capturing ran the Python, not the step
        self.tokens.copy_(token[:, None])
        self.graph.replay()
        self.state.length += 1  # the host's count; replays run no Python
        return self.logits


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
          generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]: argmax at temperature 0, else a sample."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        # a token stays while the likelier tokens hold less than top_p: the first always does
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.empty_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def decode_state_bytes(state: DecodeState) -> int:
    """Bytes of every tensor the decoding state holds (KV caches, conv/SSM/retention
    states), each storage counted once."""
    seen: set[int] = set()

    def walk(value) -> int:
        if isinstance(value, torch.Tensor):
            key = value.untyped_storage().data_ptr()
            if key in seen:
                return 0
            seen.add(key)
            return value.untyped_storage().nbytes()
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return sum(walk(getattr(value, f.name)) for f in dataclasses.fields(value))
        if isinstance(value, (list, tuple)):
            return sum(walk(v) for v in value)
        if isinstance(value, dict):
            return sum(walk(v) for v in value.values())
        return 0

    return walk(state.layers)


class _Clock:
    """Wall time between laps; on a GPU, after the queued work has finished."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.last = self._now()

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self) -> float:
        now = self._now()
        elapsed, self.last = now - self.last, now
        return elapsed
