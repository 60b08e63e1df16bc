"""benchmarks/knobs.py's stability column, on metrics files written here with a known spike and
gradient norms: the runs the stage records name, each step counted once."""

import importlib.util
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _knobs():
    spec = importlib.util.spec_from_file_location("knobs", os.path.join(REPO, "benchmarks", "knobs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(work, name, steps, recorded=True):
    out = os.path.join(work, name)
    os.makedirs(out)
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        for entry in steps:
            f.write(json.dumps(entry) + "\n")
    if recorded:
        with open(os.path.join(work, "records", f"{name}.json"), "w") as f:
            json.dump({"output": out}, f)


def test_stability_reads_the_recorded_runs_once_per_step(tmp_path):
    work = str(tmp_path)
    os.makedirs(os.path.join(work, "records"))
    lrs = [0.25e-3, 0.5e-3, 1e-3, 1e-3, 0.9e-3, 0.8e-3, 0.7e-3, 0.6e-3, 0.5e-3, 0.4e-3]
    losses = [10, 9, 8, 7, 6, 9, 5, 4, 4, 4]  # iteration 6: 9 against the mean 8 of the five before
    grads = [50, 30, 2, 3, 7, 2, 2, 1, 1, 1]  # the warm-up's (iterations 1-2) do not count
    steps = [{"iteration": i + 1, "loss": loss, "lr": lr, "grad_norm": g}
             for i, (loss, lr, g) in enumerate(zip(losses, lrs, grads))]
    # resumed after iteration 7: iteration 6 and 7 logged again; a validation line has no loss
    replayed = steps[:7] + [steps[5], steps[6], {"iteration": 7, "validation_loss": 5.5}] + steps[7:]
    _run(work, "student-miniplm", replayed)
    _run(work, "student-uniform", [{**s, "loss": 6.0, "grad_norm": 4.0} for s in steps])
    _run(work, "student-old", [{**s, "loss": 100.0 * (i % 2), "grad_norm": 500.0} for i, s in enumerate(steps)],
         recorded=False)  # a copied base's run that no record names
    got = _knobs().stability(work)
    assert got == {"loss_spike": pytest.approx(1.0), "max_grad_norm": pytest.approx(7.0)}
