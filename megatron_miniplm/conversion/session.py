"""One-process megatron state for conversion.

Conversion works on whole tensors at TP=1/PP=1; the dist checkpoint it writes
reshards to any layout on load, so there is nothing to gain from more ranks. A
process that a multi-rank job launched converts only by leaving the job
(``outside_job``): tools/evaluate.py's rank 0 exports for the zero-shot tasks.
"""

from __future__ import annotations

import contextlib
import os

from megatron_miniplm.conversion.errors import ConversionError


@contextlib.contextmanager
def single_process():
    """Megatron parallel state for a world of one; leaves alone a state the caller created."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_miniplm import parallel

    # the world parallel.initialize would join: torchrun's or srun's, as the launch variables say
    world = dist.get_world_size() if dist.is_initialized() else parallel.launch_env().world_size
    if world != 1:
        raise ConversionError(
            f"conversion runs in one process (world size here: {world}); run it without torchrun "
            "(or as one srun task): the checkpoint it writes loads at any tensor/pipeline parallel size"
        )
    owns_group = not dist.is_initialized()
    owns_state = not ps.model_parallel_is_initialized()
    # parallel.initialize picks a rendezvous port through the environment; child
    # processes started later (torchrun, subprocess) must not inherit it.
    saved_env = {k: os.environ.get(k) for k in RENDEZVOUS_ENV}
    if owns_state:
        parallel.initialize(parallel.ParallelConfig())
    try:
        yield
    finally:
        if owns_group:
            parallel.destroy()
            restore_env(saved_env)
        elif owns_state:
            ps.destroy_model_parallel()


RENDEZVOUS_ENV = ("MASTER_ADDR", "MASTER_PORT")
# How a launcher places a process in a job: torchrun's variables, Slurm's (srun without
# torchrun) and PMI's (srun --mpi). parallel.launch_env reads them, and so does lm-eval's
# accelerate, which starts a process group of that world when it finds one.
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
              "ROLE_RANK", "ROLE_WORLD_SIZE", *RENDEZVOUS_ENV, "SLURM_PROCID", "SLURM_STEP_NUM_TASKS",
              "SLURM_LOCALID", "PMI_RANK", "PMI_SIZE")


@contextlib.contextmanager
def outside_job():
    """The block runs as a world of one in a process of a multi-rank job whose process group
    is gone (evaluate.py's rank 0 exporting and running lm-eval after the collective LM loss).
    The job's launch variables are hidden for the block, so that single_process() and lm-eval
    start a world of one instead of refusing or waiting for ranks that have left; they are
    restored after. A process still in a group of several ranks cannot leave it this way."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError(f"this process is still in a process group of {dist.get_world_size()} ranks: "
                           "destroy it (parallel.destroy()) before working as a world of one")
    saved = {k: os.environ.pop(k, None) for k in LAUNCH_ENV}
    try:
        yield
    finally:
        restore_env(saved)


def restore_env(saved: dict) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
