"""Run a function on N local processes under a gloo process group (torchrun's environment).

The processes are forked from a forkserver that has imported torch and megatron-core once
for the whole session (a fresh interpreter spends ~6 s of CPU importing them, and the suite
starts a few hundred such processes). The server computes nothing, so no thread pool is
forked. Each process gets the caller's environment as it is at the call (a forked process
would otherwise see the server's, from the session's first call)."""

from __future__ import annotations

import multiprocessing
import os
import socket

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Imported once by the forkserver; what the processes import beyond these costs them as before.
PRELOAD = ("megatron_miniplm", "torch", "numpy", "megatron.core", "megatron.core.models.gpt", "megatron.core.optimizer",
           "megatron.core.distributed", "megatron.core.dist_checkpointing", "megatron.core.datasets.indexed_dataset")


def _entry(rank: int, fn, world_size: int, port: int, env: dict, args: tuple) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world_size))
    try:
        fn(*args)
    finally:
        from megatron_miniplm import parallel

        parallel.destroy()


def run_distributed(fn, world_size: int, *args) -> None:
    """Spawn ``world_size`` processes running ``fn(*args)``; raises if any of them fails."""
    multiprocessing.set_forkserver_preload(list(PRELOAD))  # read when the server starts (first call)
    mp.start_processes(
        _entry, args=(fn, world_size, free_port(), dict(os.environ), args), nprocs=world_size,
        join=True, start_method="forkserver",
    )
