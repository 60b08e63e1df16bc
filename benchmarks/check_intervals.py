#!/usr/bin/env python
"""The figures behind RESULTS.md's "Intervals of the paired comparison, calibrated": in how
many of 100 seeded synthetic experiments (tests/evaluation/test_calibration.py's) the 95%
interval contains zero, for the interval tools/evaluate.py prints and for an instance
bootstrap over seed-pooled losses; and, for runs that share their seeds, paired by seed
against unpaired.

    python benchmarks/check_intervals.py          # a few seconds
"""

import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path: str, name: str):
    """A module from its file: the test's experiments, which import only the package."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


calibration = _load(os.path.join(REPO, "tests", "evaluation", "test_calibration.py"), "test_calibration")


def main() -> int:
    print("| interval | true effect | trials whose 95% interval contains 0 |\n|---|---|---|")
    for label, interval, effects in (("test documents + seeds' variance", calibration._ours, (0.0, 1.0, 1.5)),
                                     ("instances, seeds pooled first", calibration._instance_bootstrap, (0.0,))):
        for effect in effects:
            print(f"| {label} | {effect:g} | {calibration._coverage(effect, interval)} / 100 |")
    print("\nRuns of the two methods sharing seed k (a shared seed offset, sd 0.3, and one per run, sd 0.05):\n")
    print("| interval | true effect | trials whose 95% interval contains 0 | median width |\n|---|---|---|---|")
    for label, paired in (("paired by seed", True), ("unpaired (Welch)", False)):
        for effect in (0.0, 0.4):
            contains, width = calibration._paired_coverage(effect, calibration._shared_seed_experiment, paired)
            print(f"| {label} | {effect:g} | {contains} / 100 | {width:.3f} |")
    contains, width = calibration._paired_coverage(0.0, calibration._experiment, True)
    print(f"| paired by seed, on independent seeds | 0 | {contains} / 100 | {width:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
