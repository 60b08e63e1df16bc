"""Run a function on N local processes under a gloo process group (torchrun's environment)."""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world_size: int, port: int, args: tuple) -> None:
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
    mp.start_processes(
        _entry, args=(fn, world_size, free_port(), args), nprocs=world_size,
        join=True, start_method="spawn",
    )
