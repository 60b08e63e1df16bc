"""What the data tools (tools/preprocess_data.py, tools/split_dataset.py) share: logging
set-up, and running a stage with its errors reported as one line and an exit status.

Kept free of heavy imports: the tools call `setup_logging` before importing the stage.
"""
from __future__ import annotations

import logging
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


def setup_logging() -> None:
    """INFO to stderr; megatron-core's own loggers only from WARNING (its warnings about
    itself are filtered by the package: megatron_miniplm.THIRD_PARTY_NOTICES)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)


def run_stage(stage: Callable[[T], object], config: T) -> int:
    """`stage(config)`, then print its summary's format(): exit status 0. Bad input or
    arguments (ValueError, OSError: the stages' own errors derive from them) print
    `error: ...` to stderr, status 1; Ctrl-C, status 130. The stages leave no output
    behind when they fail, which the messages say."""
    try:
        summary = stage(config)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        print("error: no output written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130
    print(summary.format())
    return 0
