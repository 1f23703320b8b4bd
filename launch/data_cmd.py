"""`stripes data verify DIR` and `stripes data stats DIR`: look at a prepared directory.

verify exits 0 when every file matches the manifest and 1 when any does not (each bad file
named on stderr); a directory without a readable manifest is a usage error (exit 2).
"""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="verify or count a prepared data directory",
                       description="Inspect a directory written by `stripes prepare`.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    verify = actions.add_parser("verify", help="check every shard against the manifest",
                                description="Check sizes, sha256 checksums and index offsets "
                                "of every file the manifest names; exit 1 if any is bad.")
    verify.add_argument("directory", help="a prepared data directory, e.g. runs/data/demo")
    verify.set_defaults(run=run_verify)
    stats = actions.add_parser("stats", help="documents, tokens and text bytes per source",
                               description="Print documents, tokens, text bytes, shards and "
                               "skipped inputs per source, and totals (from the manifest).")
    stats.add_argument("directory", help="a prepared data directory, e.g. runs/data/demo")
    stats.set_defaults(run=run_stats)


def run_verify(args: argparse.Namespace) -> int:
    from stripes.data.inspect_data import verify

    try:
        verdict = verify(args.directory)
    except ValueError as err:
        return _usage_error(args, err)
    for problem in verdict.problems:
        print(f"bad: {problem}", file=sys.stderr)
    shards = sum(len(s.shards) for s in verdict.manifest.sources)
    state = f"{len(verdict.problems)} problem(s)" if verdict.problems else "ok"
    print(f"{args.directory}: {state}; {shards} shards, {verdict.files_checked} files checked")
    return 1 if verdict.problems else 0


def run_stats(args: argparse.Namespace) -> int:
    from stripes.data.inspect_data import format_stats, stats

    try:
        manifest, rows = stats(args.directory)
    except ValueError as err:
        return _usage_error(args, err)
    print(f"{args.directory}: dtype {manifest.dtype}, vocab {manifest.tokenizer.vocab_size}, "
          f"tokenizer sha256 {manifest.tokenizer.sha256[:12]}, fingerprint "
          f"{manifest.fingerprint()[:12]}")
    print(format_stats(rows))
    return 0


def _usage_error(args: argparse.Namespace, err: ValueError) -> int:
    print(f"stripes data {args.action}: error: {err}", file=sys.stderr)
    return 2
