"""`stripes`: the command line. Each subcommand lives in its own module; this file dispatches.

Errors the user can fix (a bad config, a missing file) are printed as one line on stderr with
exit status 2; a traceback means a bug in stripes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from stripes.core.config import ConfigError
from stripes.launch import (
    data_cmd,
    eval_cmd,
    export_cmd,
    generate_cmd,
    graft_cmd,
    inspect_model,
    launch_cmd,
    plot_cmd,
    prepare_cmd,
    train_cmd,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stripes",
        description="Pretraining framework for hybrid LLMs (attention, Hyena, Mamba, retention).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    inspect_model.add_parser(sub)
    prepare_cmd.add_parser(sub)
    data_cmd.add_parser(sub)
    train_cmd.add_parser(sub)
    export_cmd.add_parser(sub)
    generate_cmd.add_parser(sub)
    eval_cmd.add_parser(sub)
    plot_cmd.add_parser(sub)
    graft_cmd.add_parser(sub)
    launch_cmd.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if "TORCHELASTIC_ERROR_FILE" in os.environ:
        # A torchrun worker: a crash is written where torchrun reports it as the root cause,
        # first, above the other ranks' errors that it brought about.
        from torch.distributed.elastic.multiprocessing.errors import record
        return record(_main)(argv)
    return _main(argv)


def _main(argv: list[str] | None) -> int:
    logging.basicConfig(level=logging.INFO, format="stripes: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as err:
        print(f"stripes {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
