"""The anchor of the training benchmark: Hugging Face LlamaForCausalLM trained like stripes.

The HF model is built from the stripes training config (configs/train/bench-1b.yaml), so its
shapes are the stripes model's by construction, and the two parameter counts are compared:
a mismatch stops the run. The step is the trainer's (train/loop.py): bf16 autocast over
float32 weights, logits -> float32 cross-entropy through stripes' own `lm_loss` (HF's
`labels=` path is not used), global-norm clipping, fused AdamW; no host read inside the step
(as Hugging Face's Trainer; stripes reads each step's loss a step late) and no skipping of
non-finite steps. Token ids are random (seeded):
throughput does not depend on their values. MFU has the trainer's numerator,
3 x StripedLM.flops_per_token(seq_len) x tokens/s / the GPU's peak, so the two are comparable.

    python bench/hf_llama_train.py [--compile] [--steps 20] [--warmup 5] [--json OUT.json]
    python bench/hf_llama_train.py --tiny          # tiny shapes, runs on a CPU: a smoke test
    python bench/hf_llama_train.py --summary OUT NAME...   # OUT/summary.md (train_vs_hf.sh)
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import re
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stripes.arch.config import ModelConfig
from stripes.arch.model import StripedLM, lm_loss
from stripes.train.config import TrainConfig, load_train_config
from stripes.train.metrics import mfu, peak_flops

CONFIG = "configs/train/bench-1b.yaml"
# --tiny: the same family at toy size, a few seconds of training on a CPU.
TINY = ["model.d_model=64", "model.n_layers=2", "model.vocab_size=256", "model.max_seq_len=64",
        "model.mixers.attn.n_heads=4", "model.mixers.attn.n_kv_heads=2", "model.mlp.hidden=160",
        "data.seq_len=64", "micro_batch=2", "global_batch_tokens=128"]
PARAM_TOLERANCE = 1e-3  # relative: the two models must be the same size
# One earlier H100 measurement of this anchor (the trainer issue), printed for orientation.
REFERENCE = "56,100 tokens/s eager and 63,700 compiled (H100, seq 4096, micro-batch 4)"
# In a failed run's log: an exception line (maybe behind torchrun's "[rank0]: "), a stripes CLI
# error or halt, or this script's exit message; torchrun's own lines only say a child failed.
_ERROR_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)?((?:[\w.]*(?:Error|Exception)\b"
                         r"|stripes \w+: (?:error|halted)|hf_llama_train:).*)")
_LAUNCHER_ERRORS = ("ChildFailedError", "SignalException")


def llama_config(cfg: ModelConfig) -> Any:
    """The LlamaConfig of a stripes config that is a Llama network (train/export_hf.py)."""
    from transformers import LlamaConfig

    from stripes.core.config import ConfigError
    from stripes.train.export_hf import llama_config as llama_settings

    try:
        settings = llama_settings(cfg)
    except ConfigError as err:
        raise SystemExit(f"hf_llama_train: {err}") from None
    config = LlamaConfig(**settings, use_cache=False, attn_implementation="sdpa")
    theta = settings["rope_theta"]
    if rope_theta(config) != theta:  # a transformers version that ignored the kwarg
        raise SystemExit(f"hf_llama_train: LlamaConfig has rope theta {rope_theta(config)}, "
                         f"stripes {theta}")
    return config


def rope_theta(config: Any) -> float:
    """RoPE base as the installed transformers stores it (v4: rope_theta; v5: rope_parameters)."""
    theta = getattr(config, "rope_theta", None)
    return float(theta if theta is not None else config.rope_parameters["rope_theta"])


def build_models(cfg: TrainConfig, device: torch.device) -> tuple[nn.Module, int, float]:
    """(HF model in float32 on `device`, stripes parameter count, stripes forward FLOPs/token)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        stripes_model = StripedLM(cfg.model)
    stripes_params = stripes_model.num_params()
    flops = stripes_model.flops_per_token(cfg.data.seq_len)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(cfg.model)).to(torch.float32)
    hf_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: stripes {stripes_params:,}  HF {hf_params:,}  "
          f"(attention: {model.config._attn_implementation})", flush=True)
    if abs(hf_params - stripes_params) > PARAM_TOLERANCE * stripes_params:
        raise SystemExit(f"hf_llama_train: parameter counts differ by more than "
                         f"{PARAM_TOLERANCE:.1%}: stripes {stripes_params:,}, HF {hf_params:,}")
    return model, stripes_params, flops


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor,
               autocast: Any, grad_clip: float | None) -> torch.Tensor:
    """One optimizer step on tokens [B, T + 1] (forward, backward, clip, AdamW) as Hugging
    Face's Trainer takes it: no host read of the loss or the norm in the step, so the device
    never waits for the host (stripes' loop reads its step a step late; train/outcomes.py).
    Returns the loss, on the device."""
    with autocast:
        logits = model(input_ids=tokens[:, :-1]).logits
        loss = lm_loss(logits, tokens[:, 1:])
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def run(cfg: TrainConfig, compile_model: bool, steps: int, warmup: int) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    model, stripes_params, flops = build_models(cfg, device)
    hf_params = sum(p.numel() for p in model.parameters())
    o = cfg.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  weight_decay=o.weight_decay, fused=True)
    step_model = torch.compile(model) if compile_model else model
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision != "fp32"
                else nullcontext())
    seq, batch = cfg.data.seq_len, cfg.micro_batch
    generator = torch.Generator(device).manual_seed(cfg.seed)
    batches = torch.randint(0, cfg.model.vocab_size, (warmup + steps, batch, seq + 1),
                            generator=generator, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    started = time.perf_counter()
    losses = [train_step(step_model, optimizer, batches[i], autocast, cfg.grad_clip)
              for i in range(warmup)]
    sync()
    print(f"warm-up: {warmup} steps in {time.perf_counter() - started:.1f} s", flush=True)
    started = time.perf_counter()
    for i in range(warmup, warmup + steps):
        losses.append(train_step(step_model, optimizer, batches[i], autocast, cfg.grad_clip))
    sync()
    seconds = time.perf_counter() - started
    tokens_per_s = steps * batch * seq / seconds
    peak = peak_flops(device)
    return {
        "model": "hf-llama", "compile": compile_model, "device": _device_name(device),
        "torch": torch.__version__, "transformers": _transformers_version(),
        "attn_implementation": model.config._attn_implementation,
        "params": hf_params, "stripes_params": stripes_params, "seq_len": seq,
        "micro_batch": batch, "warmup": warmup, "steps": steps, "seconds": seconds,
        "step_time_s": seconds / steps, "tokens_per_s": tokens_per_s,
        "flops_per_token": flops, "mfu": mfu(tokens_per_s, flops, peak),
        "memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                       if device.type == "cuda" else None),
        "first_loss": float(losses[0]), "last_loss": float(losses[-1]),
    }


def write_summary(out: Path, names: list[str], anchor: str) -> str:
    """OUT/summary.md: one row per run name, from OUT/NAME.metrics.jsonl (a stripes run: its
    last step record) or OUT/NAME.json (an HF run). A run whose log ends in the script's
    "FAILED:" line is marked failed, with its error, and keeps whatever figures it left."""
    results = {name: _result(out, name) for name in names}
    base = (results.get(anchor) or {}).get("tokens_per_s")
    lines = [f"# Training throughput: stripes vs HF LlamaForCausalLM ({CONFIG})", "",
             f"- Device: {_device_name(None)}, torch {torch.__version__}, transformers "
             f"{_transformers_version()}. Date: {datetime.date.today().isoformat()}.",
             "- stripes: the trainer's last step record (mean over its last <= 20 steps, the "
             "first step excluded); HF: timed steps after warm-up (see OUT/NAME.json).",
             f"- Ratio: tokens/s over {anchor}'s (above 1.00: faster). Reference, one earlier "
             f"run of the anchor: {REFERENCE}.", "",
             f"| run | tokens/s | MFU | peak mem GiB | ratio to {anchor} |",
             "|---|---:|---:|---:|---:|"]
    failures = []
    for name, result in results.items():
        failure = _failure(out / f"{name}.log")
        if result is None:
            failure = failure or "no results"
        result = result or {}
        tps, util, mem = (result.get(k) for k in ("tokens_per_s", "mfu", "memory_gib"))
        lines.append("| " + " | ".join([
            name + (" (FAILED)" if failure else ""), _fmt(tps, "{:,.0f}"),
            _fmt(util and 100 * util, "{:.1f}%"), _fmt(mem, "{:.1f}"),
            _fmt(tps and base and tps / base, "{:.2f}")]) + " |")
        if failure:
            failures.append(f"- {name}: {failure}")
    if failures:
        lines += ["", "Failed runs (details in OUT/NAME.log):", *failures]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text, encoding="utf-8")
    return text


def _result(out: Path, name: str) -> dict[str, Any] | None:
    stripes_file, hf_file = out / f"{name}.metrics.jsonl", out / f"{name}.json"
    if hf_file.exists():
        return json.loads(hf_file.read_text(encoding="utf-8"))
    if not stripes_file.exists():
        return None
    records = [json.loads(line) for line in stripes_file.read_text(encoding="utf-8").splitlines()]
    steps = [r for r in records if "step" in r and "event" not in r]
    return steps[-1] if steps else None


def _failure(log_file: Path) -> str | None:
    """None if the run succeeded, else its last error line and the script's FAILED reason."""
    if not log_file.exists():
        return "not started (no log)"
    lines = log_file.read_text(encoding="utf-8", errors="replace").splitlines()
    reasons = [ln.removeprefix("FAILED: ") for ln in lines if ln.startswith("FAILED: ")]
    if not reasons:
        return None
    errors = [m.group(1) for m in map(_ERROR_LINE.match, lines)
              if m and not any(word in m.group(1) for word in _LAUNCHER_ERRORS)]
    return (f"{errors[-1][:300]} ({reasons[-1]})" if errors else reasons[-1])


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def _device_name(device: torch.device | None) -> str:
    if (device is None or device.type == "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return "cpu"


def _transformers_version() -> str:
    return importlib.metadata.version("transformers")  # without the seconds an import takes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides of --config (or, with --summary, the run names)")
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--compile", action="store_true", help="torch.compile(model)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU smoke test)")
    parser.add_argument("--summary", type=Path, metavar="OUT",
                        help="write OUT/summary.md for the run names given instead of training")
    parser.add_argument("--anchor", default="hf-eager", help="the run ratios are taken against")
    args = parser.parse_args()
    if args.summary is not None:
        print(write_summary(args.summary, args.overrides, args.anchor), flush=True)
        return
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1 (the first step compiles)")
    cfg = load_train_config(args.config, (TINY if args.tiny else []) + args.overrides)
    result = run(cfg, args.compile, args.steps, args.warmup)
    util = "-" if result["mfu"] is None else f"{100 * result['mfu']:.1f}%"
    memory = "-" if result["memory_gib"] is None else f"{result['memory_gib']:.1f} GiB"
    print(f"HF Llama {'compiled' if args.compile else 'eager'} on {result['device']}: "
          f"{result['tokens_per_s']:,.0f} tokens/s, MFU {util}, peak {memory}, loss "
          f"{result['first_loss']:.3f} -> {result['last_loss']:.3f}", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
