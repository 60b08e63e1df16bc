"""One-process megatron state for conversion.

Conversion works on whole tensors at TP=1/PP=1; the dist checkpoint it writes
reshards to any layout on load, so there is nothing to gain from more ranks.
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

    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
    if world != 1:
        raise ConversionError(
            f"conversion runs in one process (world size here: {world}); run it without torchrun: "
            "the checkpoint it writes loads at any tensor/pipeline parallel size"
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


def restore_env(saved: dict) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
