#!/usr/bin/env python
"""The figures behind RESULTS.md's "Intervals of the paired comparison, calibrated": in how
many of 100 seeded synthetic experiments (tests/evaluation/test_calibration.py's) the 95%
interval contains zero, for the interval tools/evaluate.py prints and for an instance
bootstrap over seed-pooled losses.

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
