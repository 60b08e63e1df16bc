"""Stopping long jobs cleanly when a cluster asks: a signal sets a flag, the ranks agree.

Slurm and Kubernetes send SIGTERM some time before they kill a job (preemption,
a time limit). A handler may only note that it came; the training and scoring
loops look at the note at a step boundary, agree across ranks with one small
all-reduce (one rank may be signalled before the others, or alone), then save
or flush and return. Megatron-LM's ``--exit-signal-handler`` works the same way.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Sequence

import torch
import torch.distributed as dist

from megatron_miniplm import platform


class SignalFlag:
    """Notes that ``sig`` arrived while installed (a context manager); restores the previous
    handler on exit. Must be entered in the main thread."""

    def __init__(self, sig: int = signal.SIGTERM):
        self.sig = sig
        self.received = False
        self._previous = None

    def _note(self, signum, frame) -> None:
        self.received = True

    def __enter__(self) -> "SignalFlag":
        self._previous = signal.signal(self.sig, self._note)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(self.sig, self._previous)

    @property
    def name(self) -> str:
        return signal.Signals(self.sig).name


def any_rank(flags: Sequence[bool]) -> list[bool]:
    """Each flag OR-ed over every rank of the job: one all-reduce on this rank's device.
    Collective: every rank passes the same number of flags."""
    values = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32, device=platform.device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def stop_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies. torchrun starts each
    worker in a session of its own, so a killed agent (or a signal to its process group) would
    leave the ranks running without it, holding their outputs' locks and waiting on its store
    until they time out; with SIGTERM they stop as on preemption (training saves, scoring
    flushes). Linux only (elsewhere nothing changes)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if parent == 1 or os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), sig)
