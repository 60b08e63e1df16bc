"""The tools as package entry points: tools/*.py are shims of megatron_miniplm.cli modules,
every tool ends through one runner (a refusal: one error line and status 1; argparse's errors:
status 2; a bug: its traceback), and no code changes the import path."""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import re
import subprocess
import sys

import pytest

from megatron_miniplm.cli import runner
from megatron_miniplm.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = sorted(name[:-3] for name in os.listdir(os.path.join(REPO, "tools")) if name.endswith(".py"))
BIN = os.path.dirname(sys.executable)  # the console scripts, beside the environment's python


def _run(*cmd, cwd):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize("name", TOOLS)
def test_each_tool_is_a_shim_of_its_module(name, tmp_path):
    """tools/<tool>.py imports megatron_miniplm.cli.<tool>'s main and runs it, nothing else; the
    module has build_parser() and a main the runner wraps; the path and the console script both
    answer --help from outside the checkout."""
    tree = ast.parse(open(os.path.join(REPO, "tools", f"{name}.py"), encoding="utf-8").read())
    imported, guard = tree.body
    assert isinstance(imported, ast.ImportFrom) and imported.module == f"megatron_miniplm.cli.{name}"
    assert [alias.name for alias in imported.names] == ["main"]
    assert isinstance(guard, ast.If) and ast.unparse(guard.test) == "__name__ == '__main__'"
    module = importlib.import_module(f"megatron_miniplm.cli.{name}")
    assert isinstance(module.build_parser(), argparse.ArgumentParser)
    assert module.main.__wrapped__ is not None  # made by runner.tool
    script = f"miniplm-{name.replace('_', '-')}"
    for cmd, prog in (([sys.executable, os.path.join(REPO, "tools", f"{name}.py")], f"{name}.py"),
                      ([os.path.join(BIN, script)], script)):
        out = _run(*cmd, "--help", cwd=tmp_path)
        assert out.returncode == 0 and out.stdout.startswith(f"usage: {prog} "), out.stderr[-2000:]


def test_refusal_and_usage_error_from_the_command_line(tmp_path):
    """A refusal is one line on stderr, status 1; a flag argparse refuses, status 2; the
    module runs with -m as well."""
    missing = tmp_path / "missing"
    out = _run(sys.executable, os.path.join(REPO, "tools", "export_selection.py"), "--blend", str(missing),
               "--output", str(tmp_path / "x.jsonl"), cwd=tmp_path)
    assert out.returncode == 1, out.stderr[-2000:]
    (line,) = out.stderr.splitlines()
    assert line.startswith("export_selection.py: error: ") and str(missing) in line
    out = _run(os.path.join(BIN, "miniplm-model-info"), "--model-preset", "no-such-model", cwd=tmp_path)
    assert out.returncode == 2 and "miniplm-model-info: error: unknown model preset" in out.stderr
    out = _run(sys.executable, "-m", "megatron_miniplm.cli.model_info", "--model-preset", "qwen-104M", "--json",
               cwd=tmp_path)
    assert out.returncode == 0 and json.loads(out.stdout)[0]["preset"] == "qwen-104M"


def _raising(exc):
    def body(argv):
        raise exc

    return body


@pytest.mark.parametrize("exc", [UserError("bad input"), ValueError("--lr must be > 0"),
                                 FileNotFoundError(2, "No such file or directory", "data.bin")],
                         ids=["UserError", "ValueError", "OSError"])
def test_a_refusal_is_one_line_and_status_1(exc, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/somewhere/tools/pretrain_gpt.py"])
    assert runner.run(_raising(exc)) == 1
    # a plain ValueError may be a bug: its line says where it was raised
    line = _raising.__code__.co_firstlineno + 2  # body's raise
    where = f" (raised at {os.path.relpath(__file__)}:{line})" if type(exc) is ValueError else ""
    assert capsys.readouterr().err == f"pretrain_gpt.py: error: {exc}{where}\n"


def test_status_passes_through_and_argparse_keeps_status_2(capsys):
    assert runner.tool(lambda argv: 3)(None) == 3  # e.g. the pipeline's "stopped by SIGTERM"
    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument("--n", type=int)
    main = runner.tool(lambda argv: parser.parse_args(argv).n)
    assert main(["--n", "0"]) == 0
    with pytest.raises(SystemExit) as exited:
        main(["--n", "many"])
    assert exited.value.code == 2 and "x: error: argument --n" in capsys.readouterr().err


@pytest.mark.parametrize("exc", [KeyError("k"), RuntimeError("a bug"), AssertionError()])
def test_a_bug_keeps_its_traceback(exc):
    with pytest.raises(type(exc)):
        runner.run(_raising(exc))


def test_ctrl_c_is_status_130(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["miniplm-score-docs"])
    assert runner.run(_raising(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err == "miniplm-score-docs: interrupted\n"


def test_the_user_errors_share_one_base_and_keep_theirs():
    from megatron_miniplm.dist_checkpoint import CheckpointMismatch
    from megatron_miniplm.conversion.errors import ConversionError
    from megatron_miniplm.data.meta import DatasetMetaError
    from megatron_miniplm.data.records import InputError
    from megatron_miniplm.data.tokenizer import TokenizerError
    from megatron_miniplm.parallel import LaunchError
    from megatron_miniplm.scoring.dataset import ScoringError
    from megatron_miniplm.scoring.score_file import ScoreFileError

    for cls in (CheckpointMismatch, ConversionError, DatasetMetaError, InputError, TokenizerError, ScoringError,
                ScoreFileError):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError), cls
    assert issubclass(LaunchError, UserError) and issubclass(LaunchError, RuntimeError)
    from megatron_miniplm.atomic_io import DiskFullError

    assert issubclass(DiskFullError, UserError) and issubclass(DiskFullError, OSError)


def test_a_full_disk_is_one_line(capsys, monkeypatch, tmp_path):
    import errno

    from megatron_miniplm.atomic_io import DiskFullError

    monkeypatch.setattr(sys, "argv", ["preprocess_data.py"])
    full = DiskFullError(str(tmp_path / "out.bin"), 1234, OSError(errno.EDQUOT, "quota"))
    assert full.errno == errno.EDQUOT
    assert runner.run(_raising(full)) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"preprocess_data.py: error: {tmp_path / 'out.bin'}: disk quota exceeded (1,234 bytes needed, ")
    assert err.endswith(" bytes free there); free space and run again\n") and err.count("\n") == 1


# Any change to the interpreter's module search path: its methods that add or remove, an
# assignment, or an index into it. Helpers are found by installation (the package), pytest's
# `pythonpath` setting (tests/), a script's own directory or PYTHONPATH in a command.
_PATH_EDIT = re.compile(r"\bsys\s*\.\s*path\s*(\.\s*(insert|append|extend|remove|pop|clear)\b|\[|\+=|=(?!=))")


def test_no_code_changes_the_import_path():
    hits = []
    for top in ("megatron_miniplm", "tools", "benchmarks", "tests"):
        for root, dirs, files in os.walk(os.path.join(REPO, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(root, name)
                with open(path, encoding="utf-8") as f:
                    for number, line in enumerate(f, 1):
                        if _PATH_EDIT.search(line):
                            hits.append(f"{os.path.relpath(path, REPO)}:{number}: {line.strip()}")
    assert not hits, "\n".join(hits)
