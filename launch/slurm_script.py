"""`stripes launch slurm CONFIG --nodes N --gpus-per-node G`: render the sbatch script of
configs/launch/slurm.sbatch for CONFIG and submit it (or print it with --dry-run).

The script runs one task per node with srun; each runs the torchrun line of
launch/torchrun_cmd.py against a c10d rendezvous on the first node. Logs go to
OUTPUT_DIR/slurm/NAME-JOBID.out. Slurm warns the script --signal-lead seconds before the
time limit; the trainers checkpoint and the job requeues itself (see the template).
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from stripes.core.config import ConfigError
from stripes.launch.torchrun_cmd import TorchrunPlan, shell_line
from stripes.train.launch_env import MULTICAST_OFF, SLURM_PORT_BASE, SLURM_PORT_SPAN

TEMPLATE = Path(__file__).resolve().parents[1] / "configs" / "launch" / "slurm.sbatch"
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_ENDPOINT, _JOB_ID = '"$head_node:$rdzv_port"', '"$SLURM_JOB_ID"'


@dataclass(frozen=True)
class SlurmJob:
    config: str  # absolute, as the compute nodes see it
    overrides: tuple[str, ...]
    output_dir: str  # absolute
    workdir: str
    nodes: int
    gpus_per_node: int
    job_name: str
    cpus_per_gpu: int = 8
    signal_lead_s: int = 120
    max_restarts: int = 0
    rdzv_port: int | None = None  # None: derived from the job id
    sbatch_options: tuple[str, ...] = ()  # "--partition=gpu", "--time=2-00:00:00", ...
    env: tuple[str, ...] = ()  # "NCCL_IB_HCA=mlx5", ...
    python: str = field(default=sys.executable)

    def render(self, template: str | None = None) -> str:
        if self.signal_lead_s < 30:
            raise ConfigError("--signal-lead", self.signal_lead_s, "at least 30 seconds",
                              "the trainers need time to finish a step and checkpoint")
        torchrun = TorchrunPlan(self.config, self.overrides, self.nodes, self.gpus_per_node,
                                _ENDPOINT, _JOB_ID, self.max_restarts,
                                grace_s=self.signal_lead_s - 20, python=self.python)
        port = (str(self.rdzv_port) if self.rdzv_port is not None else
                f"$(({SLURM_PORT_BASE} + SLURM_JOB_ID % {SLURM_PORT_SPAN}))")
        values = {
            "job_name": self.job_name, "nodes": str(self.nodes),
            "gpus_per_node": str(self.gpus_per_node),
            "cpus_per_node": str(self.cpus_per_gpu * self.gpus_per_node),
            "threads_per_proc": str(self.cpus_per_gpu),
            "log_dir": str(Path(self.output_dir) / "slurm"),
            "signal_lead": str(self.signal_lead_s),
            "sbatch_options": "".join(f"#SBATCH {option}\n" for option in self.sbatch_options),
            "workdir": shlex.quote(self.workdir),
            "multicast_exports": "".join(f"export {key}=${{{key}:-{off}}}\n"
                                         for key, off in MULTICAST_OFF.items()),
            "env_exports": "".join(f"export {_env_pair(pair)}\n" for pair in self.env),
            "rdzv_port": port,
            "torchrun": shell_line(torchrun.argv(), frozenset({_ENDPOINT, _JOB_ID}),
                                   width=96, indent="    "),
        }
        return fill(TEMPLATE.read_text() if template is None else template, values)


def fill(template: str, values: dict[str, str]) -> str:
    """Replace every {{name}}; a name without a value, or a value the template never uses,
    is an error (the template and this file changed apart)."""
    used = set(_PLACEHOLDER.findall(template))
    if used != set(values):
        raise ValueError(f"template placeholders {sorted(used)} != values {sorted(values)}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def _env_pair(pair: str) -> str:
    key, sep, value = pair.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*", key):
        raise ConfigError("--env", pair, "KEY=VALUE with a shell variable name as KEY")
    return f"{key}={shlex.quote(value)}"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("slurm", help="submit (or print) a Slurm job that trains CONFIG",
                       description="Render configs/launch/slurm.sbatch for CONFIG and submit "
                       "it with sbatch. The job checkpoints and requeues itself before its "
                       "time limit.")
    p.add_argument("config", help="training YAML")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True, help="one trainer per GPU")
    p.add_argument("--cpus-per-gpu", type=int, default=8, help="CPU cores per trainer "
                   "(default 8; also its OMP_NUM_THREADS)")
    p.add_argument("--partition")
    p.add_argument("--time", help="time limit, e.g. 2-00:00:00")
    p.add_argument("--account")
    p.add_argument("--job-name", help="default: the config's file name")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="another #SBATCH line, e.g. --sbatch=--exclusive (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="exported on every node, e.g. NCCL_SOCKET_IFNAME=ib0 (repeatable)")
    p.add_argument("--signal-lead", type=int, default=120, metavar="SECONDS",
                   help="warn the job this long before its time limit (default 120)")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="torchrun restarts of the group after a failure (default 0)")
    p.add_argument("--rdzv-port", type=int, help="default: derived from the job id")
    p.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from stripes.train.config import load_train_config

    cfg = load_train_config(args.config, args.overrides)  # fails here, not in the queue
    options = [f"--{name}={value}" for name, value in (("partition", args.partition),
               ("time", args.time), ("account", args.account)) if value] + args.sbatch
    output_dir = Path(cfg.output_dir).resolve()
    job = SlurmJob(str(Path(args.config).resolve()), tuple(args.overrides), str(output_dir),
                   str(Path.cwd()), args.nodes, args.gpus_per_node,
                   args.job_name or Path(args.config).stem, args.cpus_per_gpu,
                   args.signal_lead, args.max_restarts, args.rdzv_port, tuple(options),
                   tuple(args.env))
    script = job.render()
    if args.dry_run:
        print(script, end="")
        return 0
    if shutil.which("sbatch") is None:
        raise ConfigError("sbatch", None, "Slurm's sbatch on PATH", "not found; --dry-run "
                          "prints the script")
    (output_dir / "slurm").mkdir(parents=True, exist_ok=True)  # Slurm does not create it
    path = output_dir / "slurm" / f"{job.job_name}.sbatch"
    path.write_text(script)
    done = subprocess.run(["sbatch", str(path)], capture_output=True, text=True)
    print((done.stdout + done.stderr).strip())
    return done.returncode
