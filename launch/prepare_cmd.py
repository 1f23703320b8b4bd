"""`stripes prepare CONFIG [key=value ...]`: tokenize corpora into shards (data/prepare.py).

A bad config is reported by the CLI as one line (exit 2); bad input that stops the run (any
in `strict` mode, or an unreadable file) is one line naming file and line, exit 2 as well.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stripes.data.prepare import PrepareResult


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenize corpora into shards with a manifest",
                       description="Read JSONL / JSONL.zst / Parquet sources, train or load a "
                       "sentencepiece tokenizer, and write token shards, document indexes and "
                       "a manifest to data.output. Re-running keeps the shards that are "
                       "still valid and finishes an interrupted run.")
    p.add_argument("config", help="data YAML, e.g. configs/data/demo.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. data.workers=4 data.output=runs/data/x")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from stripes.core.config import load_config
    from stripes.data.prepare import prepare
    from stripes.data.prepare_config import PrepareFile
    from stripes.data.sources import InputError

    cfg = load_config(PrepareFile, args.config, args.overrides).data
    try:
        result = prepare(cfg, show_progress=sys.stderr.isatty())
    except InputError as err:
        print(f"stripes prepare: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stripes prepare: interrupted; finished shards are kept, run the same command "
              f"again to finish {cfg.output}", file=sys.stderr)
        return 130
    print(summary(result))
    return 0


def summary(result: PrepareResult) -> str:
    lines = []
    for source in result.sources:
        entry = source.entry
        skipped = ", ".join(f"{k}={v:,}" for k, v in entry.skipped.items()) or "none"
        lines.append(f"{entry.name}: {entry.documents:,} documents, {entry.tokens:,} tokens, "
                     f"{entry.text_bytes:,} text bytes; {len(entry.shards)} shards "
                     f"({source.written} written, {source.reused} kept); skipped: {skipped}")
    total_bytes = sum(s.entry.text_bytes for s in result.sources)
    total_tokens = sum(s.entry.tokens for s in result.sources)
    lines.append(f"{result.output}: {total_tokens:,} tokens ({result.manifest.dtype}), "
                 f"{total_bytes / 1e6:.1f} MB of text in {result.seconds:.1f} s; "
                 f"fingerprint {result.manifest.fingerprint()[:12]}")
    return "\n".join(lines)
