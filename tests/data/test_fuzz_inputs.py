"""benchmarks/fuzz_inputs.py at a modest number of cases: every damaged JSONL or Parquet input
completes with the predicted counts or stops with one file:line (row) line, leaving nothing
behind; two of the cases go through tools/preprocess_data.py as a subprocess."""
import importlib.util
import os
import sys

import pytest

pytest.importorskip("pyarrow")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fuzzer():
    spec = importlib.util.spec_from_file_location("fuzz_inputs", os.path.join(REPO, "benchmarks", "fuzz_inputs.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_fuzzed_inputs_complete_or_stop_in_one_line(tmp_path):
    counts, failures = _fuzzer().fuzz(cases=80, seed=0, tool_every=40, work=str(tmp_path))
    assert failures == []
    assert sum(counts.values()) >= 80
    assert counts["completed"] and any(kind.startswith("stopped (") for kind in counts)


def test_the_fuzzer_sees_a_traceback_and_a_wrong_count(tmp_path, monkeypatch):
    """The judge can fail: a reader that raises, and one that miscounts, are reported."""
    fuzz = _fuzzer()
    from megatron_miniplm.data import records

    def raising(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr("megatron_miniplm.data.worker.parse_block", raising)
    (tmp_path / "a").mkdir()
    counts, failures = fuzz.fuzz(cases=3, seed=0, tool_every=0, work=str(tmp_path / "a"))
    assert counts["traceback"] and any("RuntimeError: a bug" in f for f in failures)

    def lenient(block, *args, **kwargs):  # a reader that skips bad lines without counting them
        out = records.parse_block(block, *args, **kwargs)
        out.bad.clear()
        return out

    monkeypatch.setattr("megatron_miniplm.data.worker.parse_block", lenient)
    (tmp_path / "b").mkdir()
    counts, failures = fuzz.fuzz(cases=6, seed=0, tool_every=0, work=str(tmp_path / "b"))
    assert counts["wrong_counts"] and any("wrong_counts" in f for f in failures)
