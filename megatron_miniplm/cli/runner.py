"""How every tool ends: the one place that turns a refusal into an error line and an exit status.

A tool's body parses its arguments, does its work and returns its exit status (0, or a
status of its own, such as the pipeline's 3 for a stage stopped by SIGTERM). `@tool` makes
it the tool's `main(argv=None) -> int`:

- a refusal prints one line, `<tool>: error: <message>`, to stderr and returns 1. Refusals
  are UserError (megatron_miniplm.errors), plus ValueError and OSError: the configs refuse
  settings with plain ValueErrors, and an OSError names a file the user gave that is missing
  or unreadable. A plain ValueError may also come from a bug, so its line ends with where it
  was raised;
- Ctrl-C (KeyboardInterrupt) prints `<tool>: interrupted` and returns 130, the shell's
  status for a process ended by SIGINT;
- argparse's own errors (usage, and `parser.error` for settings that do not go together)
  exit 2 as argparse makes them: SystemExit passes through;
- anything else is a bug and propagates with its traceback.

`<tool>` is the name argparse gives its own errors: the command as typed (tools/x.py's
`x.py`, or the console script's name). SIGTERM is not handled here: the tools that stop
cleanly on it (pretrain_gpt, score_docs, pipeline) install their own handlers and return
normally.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import traceback
from typing import Callable, Optional, Sequence

from megatron_miniplm.errors import UserError

REFUSALS = (UserError, ValueError, OSError)
REFUSED = 1
INTERRUPTED = 130

Main = Callable[[Optional[Sequence[str]]], int]


def prog() -> str:
    """The tool's name in its messages, as argparse names it in its own."""
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "miniplm"


def run(body: Main, argv: Optional[Sequence[str]] = None) -> int:
    """`body(argv)`'s exit status, with refusals and Ctrl-C reported as the module says."""
    from megatron_miniplm.locking import release_outputs

    try:
        return body(argv)
    except REFUSALS as e:
        print(f"{prog()}: error: {e}{_origin(e)}", file=sys.stderr)
        return REFUSED
    except KeyboardInterrupt:
        print(f"{prog()}: interrupted", file=sys.stderr)
        return INTERRUPTED
    finally:
        release_outputs()  # the outputs' lock files (locking.hold_output)


def _origin(e: BaseException) -> str:
    """Where a plain ValueError was raised: it may also be a bug, and the place lets the one
    line be followed up without a traceback (an OSError's message names its file already)."""
    if isinstance(e, (UserError, OSError)) or e.__traceback__ is None:
        return ""
    frame = traceback.extract_tb(e.__traceback__)[-1]
    return f" (raised at {os.path.relpath(frame.filename)}:{frame.lineno})"


def parser(description: str, config: Optional[type] = None) -> argparse.ArgumentParser:
    """A tool's parser: its module docstring as the description (kept as written) and, given a
    config class, one flag per setting of it (``megatron_miniplm.settings``)."""
    from megatron_miniplm.settings import add_arguments

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if config is not None:
        add_arguments(p, config)
    return p


def tool(body: Main) -> Main:
    """Decorator: a tool's body becomes its `main(argv=None) -> int`, run by `run`."""

    @functools.wraps(body)
    def main(argv: Optional[Sequence[str]] = None) -> int:
        return run(body, argv)

    return main
