"""torch.distributed + megatron parallel state, from torchrun's or Slurm's environment.

A process learns its place in the job from torchrun's variables or Slurm's
(``megatron_miniplm.launch``); a process with neither is a world of one. Seeds follow Megatron-LM:
every pipeline stage gets its own (seed + 100 x pipeline rank), so the layers of
different stages never start as copies of each other.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_miniplm import megatron_compat, platform, signals
from megatron_miniplm.launch import _HOW_TO_LAUNCH, LaunchEnv, LaunchError, launch_env

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1  # Megatron-LM's: experts split over the data-parallel ranks
    seed: int = 1234
    timeout_minutes: int = 30


@dataclass(frozen=True)
class ParallelInfo:
    rank: int
    world_size: int
    local_rank: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    ep_rank: int
    ep_size: int
    device: torch.device
    backend: str

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


_launch: Optional[LaunchEnv] = None

# Megatron-LM's rule (megatron/training/arguments.py): on GPUs before Blackwell (compute
# capability < 10), tensor parallelism needs CUDA_DEVICE_MAX_CONNECTIONS=1. megatron-core's
# tensor-parallel layers start their all-reduce, all-gather or reduce-scatter asynchronously
# and then launch the computation meant to overlap it; with one connection (hardware queue)
# the GPU starts kernels in the order they were launched, so the communication runs first
# instead of behind the computation. The driver reads the variable when it creates the
# process's CUDA context (torch.cuda.set_device does, and any allocation), so it must be in
# the environment before that; device queries (count, capability, name) create none.
CUDA_CONNECTIONS = "CUDA_DEVICE_MAX_CONNECTIONS"


def order_cuda_connections(tp: int, env: LaunchEnv) -> None:
    """Set CUDA_DEVICE_MAX_CONNECTIONS=1 in this process's environment where tensor parallelism
    on a pre-Blackwell GPU needs it and it is unset; refuse another value there. Nothing on a
    CPU or at TP 1.

    A process whose CUDA context already exists (a library that creates one when imported) is
    told that the setting comes too late and goes on: the ordering only lets the communication
    overlap the computation, the results are the same without it."""
    if tp == 1 or not platform.cuda_available():
        return
    index = env.local_rank % torch.cuda.device_count()  # the device bind_local_device picks
    major, minor = torch.cuda.get_device_capability(index)
    if major >= 10:
        return
    value = os.environ.get(CUDA_CONNECTIONS)
    if value == "1":
        return
    needs = (f"tensor-model-parallel-size {tp} on {torch.cuda.get_device_name(index)} (compute capability "
             f"{major}.{minor}, before Blackwell) needs {CUDA_CONNECTIONS}=1, so that megatron-core's "
             f"tensor-parallel communication is scheduled before the computation it overlaps")
    if value is not None:
        raise ValueError(f"{CUDA_CONNECTIONS}={value} in the environment: {needs} (Megatron-LM refuses the "
                         f"same); set it to 1, or unset it and it is set here")
    if _has_cuda_context(index):  # left unset: megatron-core then warns that it is missing, rightly
        if env.rank == 0:
            log.warning("%s; this process created its CUDA context before parallel.initialize, too early for "
                        "setting it here to take effect: launch with %s=1 in the environment (tensor-parallel "
                        "communication is not overlapped with computation until then)",
                        needs, CUDA_CONNECTIONS)
        return
    os.environ[CUDA_CONNECTIONS] = "1"
    if env.rank == 0:
        log.warning("%s=1 set in each process of this job (it was unset): %s", CUDA_CONNECTIONS, needs)


def _has_cuda_context(index: int) -> bool:
    """Whether this process has created its CUDA context on device ``index`` (creates none)."""
    has_context = getattr(torch._C, "_cuda_hasPrimaryContext", None)
    return bool(has_context and has_context(index))


def set_random_seed(seed: int) -> None:
    """Megatron-LM's seeding: seed + 100 x pipeline rank for Python, numpy, torch and
    megatron's model-parallel RNG tracker (which adds the tensor-parallel rank itself)."""
    from megatron.core import parallel_state, tensor_parallel

    if seed <= 0:
        raise ValueError(f"the seed must be a positive integer, got {seed}")
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def initialize(config: ParallelConfig = ParallelConfig()) -> ParallelInfo:
    """Start the process group (NCCL on GPU, gloo on CPU) and megatron's TP/PP/DP groups, and
    its expert groups: the EP ranks of a mixture-of-experts layer are data-parallel ranks of
    the other layers (Megatron-LM's layout), each holding 1/EP of every layer's experts."""
    global _launch
    env = launch_env()
    if env.launcher == "torchrun":
        signals.stop_with_parent()  # a rank outlives no agent
    order_cuda_connections(config.tensor_model_parallel_size, env)  # before any call below creates the CUDA context
    megatron_compat.apply()
    from megatron.core import parallel_state

    tp, pp = config.tensor_model_parallel_size, config.pipeline_model_parallel_size
    ep = config.expert_model_parallel_size
    if env.world_size % (tp * pp) != 0:
        raise ValueError(
            f"world size {env.world_size} is not divisible by tensor-model-parallel-size {tp} "
            f"x pipeline-model-parallel-size {pp}"
        )
    if (env.world_size // (tp * pp)) % ep != 0:
        raise ValueError(
            f"expert-model-parallel-size {ep} does not divide the {env.world_size // (tp * pp)} data-parallel "
            f"ranks (world size {env.world_size} / (tensor-model-parallel-size {tp} x "
            f"pipeline-model-parallel-size {pp})): the expert-parallel ranks are data-parallel ones"
        )
    backend = platform.distributed_backend()
    device_id = platform.bind_local_device(env.local_rank)

    if not dist.is_initialized():
        if env.world_size == 1 and not env.master_addr:
            # A world of one on a private port, without touching os.environ: child
            # processes (tools launched from here) must not inherit a port in use.
            init_method = f"tcp://127.0.0.1:{_free_port()}"
        elif not (env.master_addr and env.master_port):
            raise LaunchError(f"a world of {env.world_size} processes without MASTER_ADDR and "
                              f"MASTER_PORT: {_HOW_TO_LAUNCH}")
        elif env.launcher == "torchrun":
            init_method = None  # env://, through torchrun's own store
        else:
            init_method = f"tcp://{env.master_addr}:{env.master_port}"
        if env.launcher == "slurm" and env.rank == 0:
            log.info("Slurm job: %d tasks, rendezvous at %s", env.world_size, init_method)
        dist.init_process_group(
            backend=backend, init_method=init_method, rank=env.rank, world_size=env.world_size,
            timeout=datetime.timedelta(minutes=config.timeout_minutes), device_id=device_id,
        )
    _launch = env
    # The groups of the same layout are kept: an evaluation scores checkpoint after checkpoint,
    # and every new group would open NCCL communicators that destroy_model_parallel, which
    # forgets megatron-core's groups without destroying them, never closes.
    if _model_parallel_layout() != (tp, pp, ep):
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
            distributed_timeout_minutes=config.timeout_minutes,
        )
    set_random_seed(config.seed)
    return info()


def _model_parallel_layout() -> Optional[tuple[int, int, int]]:
    """(TP, PP, EP) of megatron-core's current groups; None before they exist."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None
    return (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
            ps.get_expert_model_parallel_world_size())


def info() -> ParallelInfo:
    from megatron.core import parallel_state as ps

    return ParallelInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=(_launch or launch_env()).local_rank,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        ep_size=ps.get_expert_model_parallel_world_size(),
        device=platform.device(),
        backend=dist.get_backend(),
    )


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
