"""tools/evaluate.py's settings: one dataclass, refusals that name the flag."""

import os
import subprocess
import sys

import pytest

from megatron_miniplm.evaluation.config import EvalConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("kwargs,message", [
    ({}, "give data_path (--data-path: LM loss) and/or tasks (--tasks: zero-shot)"),
    ({"data_path": "t", "name": ["a"]}, "name (--name) needs one label per checkpoint of --load: 1 for 2"),
    ({"data_path": "t", "metrics_file": ["m", "-", "-"]}, "metrics_file (--metrics-file) needs one file"),
    ({"data_path": "t", "confidence": 1.0}, "confidence (--confidence) must be in (0, 1)"),
    ({"data_path": "t", "bootstrap_samples": 0}, "bootstrap_samples (--bootstrap-samples) must be >= 1"),
    # an unknown baseline left the saving unsaid after every checkpoint was scored
    ({"data_path": "t", "name": ["m@1", "u@1"], "saving_baseline": "uniform"},
     "saving_baseline (--saving-baseline) 'uniform' is not the method of any checkpoint's label (METHOD or "
     "METHOD@SIZE): m, u"),
])
def test_refusals_name_the_setting(kwargs, message):
    with pytest.raises(ValueError) as e:
        EvalConfig(load=["a/ckpt", "b/ckpt"], **kwargs)
    assert message in str(e.value)


def test_labels_and_tasks():
    cfg = EvalConfig(load=["runs/a/ckpt/", "runs/b"], tasks=" hellaswag, ,piqa")
    assert cfg.labels == ["ckpt", "b"] and cfg.task_names == ["hellaswag", "piqa"]
    assert EvalConfig(load=["x", "y"], name=["m", "m"], data_path="t").labels == ["m", "m"]
    assert EvalConfig(load=["x", "y"], name=["m@1", "u@1"], data_path="t", saving_baseline="u").saving_baseline == "u"


def test_the_tool_refuses_before_loading_anything(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "evaluate.py"), "--load", str(tmp_path / "a"),
                          str(tmp_path / "b"), "--name", "one", "--data-path", str(tmp_path / "test")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "name (--name) needs one label per checkpoint of --load: 1 for 2" in out.stderr


def test_the_json_is_strict_json_with_null_for_what_is_not_finite(tmp_path):
    """An undefined saving (NaN) and an interval end without a bound (inf) are written as null:
    JSON has no NaN or Infinity, and readers other than Python's refuse a file that has them."""
    import json
    import math

    from megatron_miniplm.evaluation.run import write_outputs

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    path = tmp_path / "results.json"
    results = {"models": {}, "scaling": {"saving": {"m": {"1": {"saving": math.nan, "low": 0.5, "high": math.inf,
                                                                  "undefined": 3}}}},
               "extrapolation": [1.0, -math.inf]}
    write_outputs(EvalConfig(load=["a"], data_path="t", json=str(path)), results)
    got = json.loads(path.read_text(), parse_constant=refuse)
    assert got["scaling"]["saving"]["m"]["1"] == {"saving": None, "low": 0.5, "high": None, "undefined": 3}
    assert got["extrapolation"] == [1.0, None] and got["config"]["json"] == str(path)
    assert math.isnan(results["scaling"]["saving"]["m"]["1"]["saving"])  # the caller's results are left as they are
