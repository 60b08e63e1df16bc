"""What the data tools (tools/preprocess_data.py, tools/split_dataset.py) share: logging
set-up, and running a stage and printing its summary. Their errors are reported by the
runner every tool shares (megatron_miniplm.cli.runner).

Kept free of heavy imports: the tools call `setup_logging` before importing the stage.
"""
from __future__ import annotations

import logging
from typing import Callable, TypeVar

T = TypeVar("T")


def setup_logging() -> None:
    """INFO to stderr; megatron-core's own loggers only from WARNING (its warnings about
    itself are filtered by the package: megatron_miniplm.THIRD_PARTY_NOTICES)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)


def run_stage(stage: Callable[[T], object], config: T) -> int:
    """`stage(config)`, then print its summary's format(): exit status 0. Bad input or
    arguments raise (ValueError, OSError: the stages' own errors derive from them), and
    the tool's runner reports them (status 1); a stage that fails leaves no output behind."""
    summary = stage(config)
    print(summary.format())
    return 0
