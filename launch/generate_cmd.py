"""`stripes generate MODEL --prompt TEXT`: sample a continuation with recurrent decoding.

MODEL is an export directory (model.yaml + model.safetensors), a checkpoint directory, or a
run directory (its latest checkpoint). The tokenizer is the export's tokenizer.model, else
the training data's (`data.sources[0].path/tokenizer.model` in the checkpoint's config).
Text goes to stdout (streamed as it is decoded for one sample); the cost line to stderr.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample text from a trained model",
                       description="Continue a prompt with the model's recurrent decoding "
                       "(prefill once, then one step per token), and report tokens/s and "
                       "the decoding state's memory.")
    p.add_argument("model", help="export, checkpoint or run directory")
    p.add_argument("--prompt", required=True, action="append",
                   help="repeatable: prompts of any lengths decode as one batch")
    p.add_argument("--tokenizer", help="sentencepiece .model (default: the export's or the "
                   "training data's)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--num-samples", type=int, default=1, help="continuations decoded as one "
                   "batch")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=50, help="0: no cut")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus: keep the likeliest "
                   "tokens holding this probability (1: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction,
                   help="decode as CUDA graph replays (default: on a CUDA device)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import sentencepiece as spm
    import torch

    from stripes.arch.generate import GenerationStats, generate
    from stripes.core.config import ConfigError
    from stripes.train.export import load_model

    _check_numbers(args)
    model, _, found_tokenizer = load_model(args.model)
    tokenizer = args.tokenizer or found_tokenizer
    if tokenizer is None or not Path(tokenizer).is_file():
        raise ConfigError("--tokenizer", tokenizer, "a sentencepiece .model file",
                          "not found (and none in the export or the checkpoint's config)")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    rows = [ids for text in args.prompt for ids in [sp.encode(text)] * args.num_samples]
    for text, ids in zip(args.prompt, rows[::args.num_samples], strict=True):
        if not ids:
            raise ConfigError("--prompt", text, "text that encodes to at least one token")
    device = torch.device(args.device)
    model = model.to(device).eval()
    lengths = [len(ids) for ids in rows]
    prompt = torch.tensor([ids + [sp.eos_id()] * (max(lengths) - len(ids)) for ids in rows],
                          device=device)  # right-padded; generate reads each row's length
    stream = _Stream(sp, rows[0]) if len(rows) == 1 else None
    stats = GenerationStats()
    out = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k or None,
                   args.top_p, torch.Generator(device).manual_seed(args.seed),
                   stop_token=sp.eos_id(), on_token=stream, stats=stats,
                   cuda_graph=args.cuda_graph, prompt_lengths=lengths)
    if stream is None:
        for i, row in enumerate(out.tolist()):
            print(f"--- sample {i}\n{sp.decode([t for t in row if t != sp.eos_id()])}")
    else:
        stream.finish()
    print(f"stripes generate: {stats.batch_size} x {stats.prompt_tokens} prompt tokens in "
          f"{stats.prefill_s:.3f} s, {stats.batch_size} x {stats.new_tokens} steps in "
          f"{stats.decode_s:.3f} s ({stats.decode_tokens_per_s:,.1f} tokens/s); decoding "
          f"state {stats.state_bytes / 2**20:.2f} MiB", file=sys.stderr)
    return 0


def _check_numbers(args: argparse.Namespace) -> None:
    from stripes.core.config import ConfigError

    for flag, value, ok, allowed in (
            ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, ">= 1"),
            ("--num-samples", args.num_samples, args.num_samples >= 1, ">= 1"),
            ("--temperature", args.temperature, args.temperature >= 0, ">= 0"),
            ("--top-k", args.top_k, args.top_k >= 0, ">= 0"),
            ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]")):
        if not ok:
            raise ConfigError(flag, value, allowed)


class _Stream:
    """Prints the text of one sample as its tokens arrive. sentencepiece joins pieces with
    context (a leading-space marker, bytes of one character split over pieces), so the whole
    text is decoded each time, and what grew is printed once it no longer ends in a
    half-decoded character."""

    def __init__(self, sp, prompt: list[int]) -> None:
        self.sp, self.ids, self.shown = sp, list(prompt), ""
        self._show(sp.decode(self.ids).rstrip("\ufffd"))

    def __call__(self, token) -> None:
        if int(token[0]) != self.sp.eos_id():
            self.ids.append(int(token[0]))
            self._show(self.sp.decode(self.ids).rstrip("\ufffd"))

    def finish(self) -> None:
        self._show(self.sp.decode(self.ids))
        print(flush=True)

    def _show(self, text: str) -> None:
        if text.startswith(self.shown):
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text
