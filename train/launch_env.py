"""Which launcher started this process, and this process's place in the world.

Three cases, tried in this order:
- torchrun (or any torch.distributed launcher): RANK and WORLD_SIZE are set; MASTER_ADDR and
  MASTER_PORT say where rank 0 listens.
- a Slurm step task (`srun ... stripes train`, one task per GPU): srun sets
  SLURM_STEP_NUM_TASKS, SLURM_PROCID, SLURM_LOCALID and SLURM_STEP_NODELIST. The batch
  script itself also carries SLURM_PROCID and SLURM_NTASKS but is not a step, so the step's
  variables are the ones read. Rank 0 listens on the step's first node.
- neither: a world of one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from stripes.core.config import ConfigError

# A job's rendezvous port when MASTER_PORT is not given: derived from the job id, so that two
# jobs sharing a node do not collide.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 20000

# NVLink multicast (NVLS) off in NCCL, PyTorch's symmetric memory and NVSHMEM. On hosts whose
# GPUs are shared, a job that creates multicast objects can leave the GPUs out of service for
# others. Every launcher stripes builds (torchrun, the Slurm script) and the trainer itself
# set these unless the user's environment already names a value: turning multicast on is
# then a deliberate `export NCCL_NVLS_ENABLE=1`.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                 "NVSHMEM_DISABLE_NVLS": "1"}


def multicast_settings(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """MULTICAST_OFF's variables as a launched process should get them: the environment's
    value where it has one, else off."""
    env = os.environ if environ is None else environ
    return {key: env.get(key, off) for key, off in MULTICAST_OFF.items()}


@dataclass(frozen=True)
class LaunchEnv:
    launcher: str  # "torchrun", "slurm" or "single"
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None = None
    master_port: int | None = None

    def torch_variables(self) -> dict[str, str]:
        """The variables torch.distributed's env:// rendezvous (and DeepSpeed) read."""
        if self.launcher == "single":
            return {}
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size),
                "LOCAL_RANK": str(self.local_rank), "MASTER_ADDR": str(self.master_addr),
                "MASTER_PORT": str(self.master_port)}


def detect_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv("torchrun", _int(env, "RANK"), _int(env, "WORLD_SIZE"),
                         _int(env, "LOCAL_RANK", 0), env.get("MASTER_ADDR"),
                         _int(env, "MASTER_PORT") if "MASTER_PORT" in env else None)
    if "SLURM_STEP_NUM_TASKS" in env:
        nodes = expand_hostlist(env.get("SLURM_STEP_NODELIST")
                                or env.get("SLURM_JOB_NODELIST", ""))
        if not nodes:
            raise ConfigError("SLURM_STEP_NODELIST", env.get("SLURM_STEP_NODELIST", ""),
                              "a Slurm host list such as node[01-04]",
                              "rank 0's host is its first node")
        port = (_int(env, "MASTER_PORT") if "MASTER_PORT" in env else
                SLURM_PORT_BASE + _int(env, "SLURM_JOB_ID", 0) % SLURM_PORT_SPAN)
        return LaunchEnv("slurm", _int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS"),
                         _int(env, "SLURM_LOCALID", 0), env.get("MASTER_ADDR", nodes[0]), port)
    return LaunchEnv("single", 0, 1, 0)


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list to host names: "gpu[01-03,07],login" -> gpu01, gpu02,
    gpu03, gpu07, login. Zero padding follows the range's first number; several bracket
    groups in one name expand as a product ("r[1-2]n[1-2]" -> r1n1, r1n2, r2n1, r2n2)."""
    hosts: list[str] = []
    for item in _split_top_level(hostlist.strip()):
        hosts += _expand_one(item, hostlist)
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    return [item for item in [*items, current] if item]


def _expand_one(name: str, whole: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", name)
    if match is None:
        if "[" in name or "]" in name:
            raise ConfigError("SLURM_STEP_NODELIST", whole, "a Slurm host list such as "
                              "node[01-04]", f"unbalanced brackets in {name!r}")
        return [name]
    head, tail = name[:match.start()], name[match.end():]
    out = []
    for part in match.group(1).split(","):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ConfigError("SLURM_STEP_NODELIST", whole, "a Slurm host list such as "
                              "node[01-04]", f"{part!r} is not a number or a range")
        for number in range(int(low), int(high or low) + 1):
            out += _expand_one(f"{head}{number:0{len(low)}d}{tail}", whole)
    return out


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    value = env.get(key)
    if value is None and default is not None:
        return default
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(key, str(value), "an integer", "set by the launcher") from None
