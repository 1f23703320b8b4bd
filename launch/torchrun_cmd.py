"""`stripes launch torchrun CONFIG`: the torchrun command line that trains CONFIG, run here
or printed (--dry-run). The Slurm script (launch/slurm_script.py) runs the same line on
every node.

One node: `--standalone` (torchrun picks a free port). Several: a c10d rendezvous at
--rdzv-endpoint HOST:PORT, with the same command started on every node. In both, torchrun
passes SIGUSR1 and SIGTERM on to the trainers (which checkpoint and exit, see
train/preemption.py) and gives them --grace seconds before it kills them; --max-restarts
restarts the whole group after a failure, and the restarted trainers resume from the
latest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass

from stripes.core.config import ConfigError

# torchrun's own default list plus SIGUSR1, Slurm's warning before the time limit.
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


@dataclass(frozen=True)
class TorchrunPlan:
    config: str
    overrides: tuple[str, ...]
    nodes: int
    procs_per_node: int
    rdzv_endpoint: str | None  # HOST:PORT; None: one node, standalone
    rdzv_id: str = "stripes"
    max_restarts: int = 0
    grace_s: int = 100
    python: str = sys.executable

    def argv(self) -> list[str]:
        if self.nodes < 1 or self.procs_per_node < 1:
            raise ConfigError("--nodes/--nproc-per-node", f"{self.nodes}/{self.procs_per_node}",
                              "positive integers")
        if self.rdzv_endpoint is None and self.nodes > 1:
            raise ConfigError("--rdzv-endpoint", None, "HOST:PORT of the first node",
                              f"{self.nodes} nodes must meet somewhere")
        cmd = [self.python, "-m", "torch.distributed.run"]
        if self.rdzv_endpoint is None:
            cmd += ["--standalone"]
        else:
            cmd += ["--nnodes", str(self.nodes), "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", self.rdzv_endpoint, "--rdzv-id", self.rdzv_id]
        cmd += ["--nproc-per-node", str(self.procs_per_node),
                "--max-restarts", str(self.max_restarts),
                "--signals-to-handle", FORWARDED_SIGNALS,
                "--shutdown-timeout", str(self.grace_s),
                "-m", "stripes.launch.cli", "train", self.config, *self.overrides]
        return cmd


def shell_line(argv: list[str], unquoted: frozenset[str] = frozenset(), width: int = 0,
               indent: str = "    ") -> str:
    """`argv` as shell words; words in `unquoted` (shell variables such as "$SLURM_JOB_ID")
    are left for the shell to expand. With `width`, lines are continued with a backslash
    before they grow longer, never between an option and its value."""
    words = [word if word in unquoted else shlex.quote(word) for word in argv]
    if not width:
        return " ".join(words)
    groups: list[str] = []
    for word in words:  # an option keeps its value beside it
        if groups and groups[-1].startswith("-") and " " not in groups[-1] \
                and not word.startswith("-"):
            groups[-1] += f" {word}"
        else:
            groups.append(word)
    lines = [groups[0]]
    for group in groups[1:]:
        if len(lines[-1]) + 1 + len(group) > width - 2:
            lines.append(indent + group)
        else:
            lines[-1] += f" {group}"
    return " \\\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("torchrun", help="run (or print) the torchrun command for CONFIG",
                       description="Train CONFIG under torchrun on this node; for several "
                       "nodes, run the same command on each.")
    p.add_argument("config", help="training YAML")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="processes on this node: one per GPU (default 1)")
    p.add_argument("--nodes", type=int, default=1, help="nodes in the job (default 1)")
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                   help="where the nodes meet (the first node); needed for --nodes > 1")
    p.add_argument("--rdzv-id", default="stripes", help="the same on every node of one job")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="restart the group this often after a failure; it resumes (default 0)")
    p.add_argument("--grace", type=int, default=100, metavar="SECONDS",
                   help="time a signalled trainer has to checkpoint (default 100)")
    p.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from stripes.train.config import load_train_config
    from stripes.train.launch_env import multicast_settings

    load_train_config(args.config, args.overrides)  # a bad config fails here, not on N nodes
    plan = TorchrunPlan(args.config, tuple(args.overrides), args.nodes, args.nproc_per_node,
                        args.rdzv_endpoint, args.rdzv_id, args.max_restarts, args.grace)
    argv = plan.argv()
    environment = multicast_settings()  # NVLink multicast off unless the user's env says
    if args.dry_run:
        print(" ".join(f"{key}={shlex.quote(value)}" for key, value in environment.items()),
              shell_line(argv))
        return 0
    sys.stdout.flush()
    os.environ.update(environment)
    os.execv(argv[0], argv)  # torchrun takes this process's place (and its signals)
