"""`stripes eval perplexity|passkey|mqar`: measure a trained model, or compare architectures.

    stripes eval perplexity MODEL [--data DIR[:SOURCE] ...]   held-out loss, overall, per
                                                               source and by context position
    stripes eval passkey MODEL [--seq-len N --depths ...]     retrieval accuracy by depth
    stripes eval mqar CONFIG [key=value ...]                  train small models on
                                                               associative recall, tabulate

MODEL is a checkpoint, run or export directory. Without --data, perplexity reads the held-out
tail of the run's own training data (data.heldout). Results print as lines and, with --out,
are written as JSON.
"""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity, passkey retrieval, associative recall",
                       description="Evaluate a trained model, or train small ones on MQAR.")
    tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)

    ppl = tasks.add_parser("perplexity", help="held-out loss and perplexity, by position too")
    _model_args(ppl)
    ppl.add_argument("--data", action="append", metavar="DIR[:SOURCE]",
                     help="prepared data to read (repeatable; default: the run's held-out "
                     "tail)")
    ppl.add_argument("--samples", type=int, default=64, help="windows per source")
    ppl.add_argument("--document-masking", action=argparse.BooleanOptionalAction,
                     help="mixers do not cross documents (default: as the run trained)")
    ppl.set_defaults(run=_perplexity)

    passkey = tasks.add_parser("passkey", help="passkey retrieval accuracy by depth")
    _model_args(passkey)
    passkey.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    passkey.add_argument("--samples", type=int, default=16)
    passkey.add_argument("--key-len", type=int, default=4)
    passkey.set_defaults(run=_passkey)

    mqar = tasks.add_parser("mqar", help="train small models on associative recall",
                            description="Train every model of CONFIG at every width on "
                            "multi-query associative recall; write OUTPUT/results.json, "
                            "results.md and accuracy.png (docs/evaluation.md).")
    mqar.add_argument("config", help="YAML with `mqar:` (e.g. configs/eval/mqar.yaml)")
    mqar.add_argument("overrides", nargs="*", help="key=value, e.g. mqar.train.steps=200")
    mqar.set_defaults(run=_mqar)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint, run or export directory")
    p.add_argument("--seq-len", type=int, help="default: the run's data.seq_len, else the "
                   "model's max_seq_len")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="also write the results here as JSON")


def _perplexity(args: argparse.Namespace) -> int:
    import math

    from stripes.core.config import ConfigError, require_positive
    from stripes.data.loader import LoaderConfig, SourceWeight, TokenDataset
    from stripes.train.evaluate import build_eval_set, evaluate, whole_sources

    require_positive("--samples", args.samples, integer=True)
    model, config, tokenizer, device, autocast = _setup(args)
    seq_len = _seq_len(args, model, config)
    data = config.get("data") or {}
    if args.data:
        sources = [_source(entry) for entry in args.data]
        dataset = TokenDataset(LoaderConfig(seq_len=seq_len, sources=sources), prefix="--data")
        _check_tokenizer(dataset, model, tokenizer)
        eval_set = whole_sources(dataset, args.samples)
    elif float(data.get("heldout") or 0) > 0:
        sources = [SourceWeight(**s) for s in data["sources"]]
        train_data = TokenDataset(LoaderConfig(seq_len=seq_len, sources=sources,
                                               heldout=float(data["heldout"])))
        eval_set = build_eval_set(train_data, None, args.samples)
    else:
        raise ConfigError("--data", None, "prepared data directories", "the model's run held "
                          "out no data (data.heldout), so say what to read")
    masking = (args.document_masking if args.document_masking is not None
               else bool(config.get("document_masking", False)))
    result = evaluate(model, eval_set, args.micro_batch, 0, 1, device, autocast, masking,
                      by_position=True)
    result = {"seq_len": seq_len, "windows": len(eval_set.windows), "document_masking": masking,
              **result, "perplexity": math.exp(result["loss"])}
    print(f"stripes eval: loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f} "
          f"over {len(eval_set.windows)} windows of {seq_len} tokens")
    for name in eval_set.names:
        print(f"  {name}: loss {result[name]:.4f}")
    for bucket, loss in result["by_position"].items():
        print(f"  positions {bucket}: loss {loss:.4f}")
    _write(args.out, result)
    return 0


def _passkey(args: argparse.Namespace) -> int:
    from stripes.core.config import ConfigError, require_positive
    from stripes.train.passkey import passkey_accuracy

    model, config, _, device, autocast = _setup(args)
    seq_len = _seq_len(args, model, config)
    require_positive("--samples", args.samples, integer=True)
    require_positive("--key-len", args.key_len, integer=True)
    if not all(0 <= depth <= 1 for depth in args.depths):
        raise ConfigError("--depths", args.depths, "fractions of the context in [0, 1]")
    result = passkey_accuracy(model, model.cfg.vocab_size, seq_len, args.depths, args.key_len,
                              args.samples, args.micro_batch, device, autocast)
    print(f"stripes eval: passkey of {args.key_len} tokens in {seq_len}: " +
          ", ".join(f"{depth} {acc:.2f}" for depth, acc in result.items()))
    _write(args.out, {"seq_len": seq_len, "key_len": args.key_len, **result})
    return 0


def _mqar(args: argparse.Namespace) -> int:
    from stripes.core.config import load_config
    from stripes.train.mqar_sweep import MqarFile, run_sweep

    cfg = load_config(MqarFile, args.config, args.overrides)
    run_sweep(cfg, log=lambda line: print(f"stripes eval: {line}", flush=True))
    print(f"stripes eval: wrote {cfg.output}/results.json, results.md, accuracy.png")
    return 0


def _setup(args: argparse.Namespace) -> tuple[Any, dict[str, Any], Path | None, Any, Any]:
    """(model on the device in eval mode, its run's training config or {}, its tokenizer or
    None, device, autocast: bf16 on a GPU, none on the CPU)."""
    import torch

    from stripes.core.config import require_positive
    from stripes.train.export import load_model

    require_positive("--micro-batch", args.micro_batch, integer=True)
    model, config, tokenizer = load_model(args.model)
    device = torch.device(args.device)
    autocast = (torch.autocast("cuda", torch.bfloat16) if device.type == "cuda"
                else nullcontext())
    return model.to(device).eval(), config, tokenizer, device, autocast


def _seq_len(args: argparse.Namespace, model, config: dict[str, Any]) -> int:
    from stripes.core.config import require_positive

    seq_len = args.seq_len or (config.get("data") or {}).get("seq_len") or model.cfg.max_seq_len
    require_positive("--seq-len", seq_len, integer=True)
    return int(seq_len)


def _source(entry: str):
    from stripes.data.loader import SourceWeight

    path, _, source = entry.partition(":")
    return SourceWeight(path=path, source=source or None)


def _check_tokenizer(dataset, model, tokenizer: Path | None) -> None:
    """The data must be the model's token ids: the same tokenizer when the model's is known,
    else at least no id past its vocabulary."""
    import hashlib

    from stripes.core.config import ConfigError

    where = str(dataset.cfg.sources[0].path)
    if tokenizer is not None:
        if hashlib.sha256(tokenizer.read_bytes()).hexdigest() != dataset.tokenizer.sha256:
            raise ConfigError("--data", where, f"data prepared with {tokenizer}",
                              "its tokenizer.model differs")
    elif dataset.tokenizer.vocab_size > model.cfg.vocab_size:
        raise ConfigError("--data", where, "data prepared with the model's tokenizer (vocab "
                          f"{model.cfg.vocab_size})", f"its tokenizer has "
                          f"{dataset.tokenizer.vocab_size} ids")


def _write(out: str | None, result: dict[str, Any]) -> None:
    from stripes.data.format import write_atomic

    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(out), (json.dumps(result, indent=1) + "\n").encode())
