"""Where this process sits in the job, read from its environment without importing torch.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; ``srun`` without
torchrun sets SLURM_PROCID, SLURM_STEP_NUM_TASKS and SLURM_LOCALID, and the rendezvous
host is the first of the step's node list. A process with neither is a world of one.
The tools read this before anything heavy (their output locks are taken by rank 0 at
once, before torch and megatron-core load), and ``parallel`` reads it to join the job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

from megatron_miniplm.errors import UserError


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, and how the ranks meet."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: Optional[str]
    master_port: Optional[int]
    launcher: str  # "torchrun" (or an equivalent environment), "slurm", "single"


class LaunchError(UserError, RuntimeError):
    """The environment does not describe a job this process can join."""


_HOW_TO_LAUNCH = ("launch with torchrun (torchrun --nnodes N --nproc-per-node P ...), or with srun "
                  "(one task per process: srun --ntasks-per-node P python ...)")


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list, as ``scontrol show hostnames`` lists it first: the
    list's first name with each bracket replaced by the first number of its ranges
    ('gpu[003-004,9],cpu1' -> 'gpu003'; 'rack[1-2]-node[01-04]' -> 'rack1-node01')."""
    text, parts, i = nodelist.strip(), [], 0
    while i < len(text) and text[i] != ",":
        if text[i] == "[":
            end = text.find("]", i)
            if end < 0:
                raise LaunchError(f"cannot read the Slurm node list '{nodelist}': '[' without ']'")
            parts.append(text[i + 1:end].split(",")[0].split("-")[0])
            i = end + 1
        else:
            parts.append(text[i])
            i += 1
    if not parts:
        raise LaunchError(f"cannot read the Slurm node list '{nodelist}'")
    return "".join(parts)


def _slurm_port(environ: Mapping[str, str]) -> int:
    """A port every task of a Slurm step derives alike: from the job and step ids, so that
    consecutive steps of one job (the pipeline's tools) do not meet on a port in TIME_WAIT."""
    job = int(environ.get("SLURM_JOB_ID", "0"))
    step = int(environ.get("SLURM_STEP_ID", "0") or 0) % 1000
    return 20000 + (job * 7 + step) % 20000


def launch_env(environ: Mapping[str, str] = os.environ) -> LaunchEnv:
    """This process's rank, world and rendezvous, from torchrun's variables, else Slurm's."""
    def num(name: str, default: Optional[str] = None) -> int:
        value = environ.get(name, default)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise LaunchError(f"environment variable {name}={value!r} is not an integer") from None

    if "WORLD_SIZE" in environ:
        port = environ.get("MASTER_PORT")
        return LaunchEnv(num("RANK", "0"), num("WORLD_SIZE"), num("LOCAL_RANK", "0"),
                         environ.get("MASTER_ADDR"), int(port) if port else None, "torchrun")
    # srun's task count of this step; the batch script itself (one process, whatever
    # SLURM_NTASKS says of the allocation) has none and is a world of one.
    tasks_var = "SLURM_STEP_NUM_TASKS"
    if "SLURM_PROCID" in environ and num(tasks_var, "1") > 1:
        addr = environ.get("MASTER_ADDR")
        if not addr:
            nodelist = (environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
                        or environ.get("SLURM_NODELIST"))
            if not nodelist:
                raise LaunchError(f"Slurm task {environ['SLURM_PROCID']} of {environ[tasks_var]}: no "
                                  f"MASTER_ADDR and no node list to take it from; {_HOW_TO_LAUNCH}")
            addr = first_host(nodelist)
        port = num("MASTER_PORT") if "MASTER_PORT" in environ else _slurm_port(environ)
        return LaunchEnv(num("SLURM_PROCID"), num(tasks_var), num("SLURM_LOCALID", "0"),
                         addr, port, "slurm")
    return LaunchEnv(0, 1, 0, None, None, "single")
