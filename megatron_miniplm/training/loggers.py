"""Where the trainer's numbers go: one fan-out (``Loggers``) to a sink per destination.

The trainer hands every record it makes to ``Loggers.write``, in the metrics file's format
(``megatron_miniplm.training.metrics``): a line per training iteration, one per logging
window's throughput, one per validation. Each sink takes them its own way:

- ``MetricsFile`` (``--metrics-file``) appends them as they are;
- ``Tensorboard`` (``--tensorboard-dir``) and ``WandB`` (``--wandb-project``) write the same
  numbers as scalars (``scalars``), with step = iteration: ``train/<key>`` for the iteration
  and throughput lines, ``valid/loss`` for a validation; and ``checkpoint/iteration`` when a
  checkpoint is saved. W&B also gets the run's config when it starts.

Rank 0 holds the sinks (every rank has the same numbers); the other ranks' ``Loggers`` is
empty. A sink's package is checked on every rank before anything starts (``check``), so a
missing one is one refusal rather than a failure of rank 0 with the others waiting.
"""

from __future__ import annotations

import os
import secrets
import string
from typing import Optional, Sequence

from megatron_miniplm.errors import UserError
from megatron_miniplm.training import metrics

WANDB_EXTRA = "pip install megatron-miniplm[wandb]"


class LoggerUnavailable(UserError, RuntimeError):
    """A logging destination asked for cannot be written: its package is missing, or it cannot start."""


def check(cfg) -> None:
    """Refuses the run if a logging destination it asks for cannot be written."""
    if cfg.tensorboard_dir:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise LoggerUnavailable("--tensorboard-dir needs the tensorboard package: "
                                    "pip install megatron-miniplm[tensorboard]") from None
    if cfg.wandb_project:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise LoggerUnavailable(f"--wandb-project needs the wandb package: {WANDB_EXTRA}") from None


# Keys of a metrics-file line that say where it belongs rather than what was measured.
_NOT_SCALARS = ("iteration", "window_iterations")


def scalars(record: dict) -> dict:
    """The tensorboard / W&B scalars of a metrics-file line: its measured values (None: not
    measured, left out; a flag as 0 or 1)."""
    if metrics.kind(record) == "valid":
        return {"valid/loss": record["valid_loss"]}
    return {f"train/{key}": int(value) if isinstance(value, bool) else value
            for key, value in record.items() if key not in _NOT_SCALARS and value is not None}


class Sink:
    """A destination of the trainer's records."""

    def write(self, records: Sequence[dict]) -> None:
        raise NotImplementedError

    def checkpoint(self, iteration: int) -> None:
        """A checkpoint of ``iteration`` was saved."""

    def close(self, failed: bool = False) -> None:
        """The run ended (``failed``: by an exception)."""


class MetricsFile(Sink):
    def __init__(self, path: str):
        self.path = path

    def write(self, records: Sequence[dict]) -> None:
        metrics.append(self.path, records)


class ScalarSink(Sink):
    """A sink of named scalars at a step: each record's ``scalars`` at its iteration."""

    def write(self, records: Sequence[dict]) -> None:
        for record in records:
            self.log(scalars(record), record["iteration"])

    def checkpoint(self, iteration: int) -> None:
        self.log({"checkpoint/iteration": iteration}, iteration)

    def log(self, values: dict, step: int) -> None:
        raise NotImplementedError


class Tensorboard(ScalarSink):
    def __init__(self, directory: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(directory)

    def log(self, values: dict, step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


def new_wandb_run_id() -> str:
    """A W&B run id (W&B's form: 8 lowercase letters and digits), chosen by the trainer so that
    it can be saved with the checkpoints before W&B is asked for anything."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def wandb_dir(cfg) -> Optional[str]:
    """--wandb-save-dir, else a wandb/ directory under --save (Megatron-LM's), else None: W&B's default."""
    if cfg.wandb_save_dir:
        return cfg.wandb_save_dir
    return os.path.join(cfg.save, "wandb") if cfg.save else None


class WandB(ScalarSink):
    """A W&B run with the id ``run_id``, continued if it exists (resume="allow"). W&B keeps a
    run's steps increasing: a step at or below the last one it has is dropped, which is what
    iterations re-run after a resume are, when the run had logged them before it stopped."""

    def __init__(self, cfg, run_id: str, config: dict):
        import wandb

        directory = wandb_dir(cfg)
        if directory:
            os.makedirs(directory, exist_ok=True)
        try:
            self.run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, name=cfg.wandb_exp_name,
                                  group=cfg.wandb_group, dir=directory, mode=cfg.wandb_mode, id=run_id,
                                  resume="allow", config=config)
        except wandb.errors.Error as e:  # no API key, no network, no such entity, ...
            raise LoggerUnavailable(f"--wandb-project: W&B could not start the run: {e} "
                                    "(--wandb-mode offline needs no account and no network)") from None

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class Loggers:
    """The fan-out: each record and checkpoint to every sink. As a context manager, it closes
    them when the run ends, telling them whether it failed."""

    def __init__(self, sinks: Sequence[Sink] = ()):
        self.sinks = list(sinks)

    def write(self, *records: dict) -> None:
        for sink in self.sinks:
            sink.write(records)

    def checkpoint(self, iteration: int) -> None:
        for sink in self.sinks:
            sink.checkpoint(iteration)

    def close(self, failed: bool = False) -> None:
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close(failed)

    def __enter__(self) -> "Loggers":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


def open_loggers(cfg, *, rank: int, wandb_run_id: Optional[str], config: dict) -> Loggers:
    """The sinks ``cfg`` asks for, on rank 0; none elsewhere."""
    if rank != 0:
        return Loggers()
    sinks: list[Sink] = []
    if cfg.metrics_file:
        sinks.append(MetricsFile(cfg.metrics_file))
    if cfg.tensorboard_dir:
        sinks.append(Tensorboard(cfg.tensorboard_dir))
    if cfg.wandb_project:
        sinks.append(WandB(cfg, wandb_run_id, config))
    return Loggers(sinks)
