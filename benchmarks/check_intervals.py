#!/usr/bin/env python
"""The figures behind RESULTS.md's "Intervals of the paired comparison, calibrated": in how
many of 100 seeded synthetic experiments (tests/evaluation/test_calibration.py's) the 95%
interval contains zero, for the interval tools/evaluate.py prints and for an instance
bootstrap over seed-pooled losses.

    python benchmarks/check_intervals.py          # a few seconds
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests", "evaluation")]

import test_calibration as calibration  # noqa: E402


def main() -> int:
    print("| interval | true effect | trials whose 95% interval contains 0 |\n|---|---|---|")
    for label, interval, effects in (("test documents + seeds' variance", calibration._ours, (0.0, 1.0, 1.5)),
                                     ("instances, seeds pooled first", calibration._instance_bootstrap, (0.0,))):
        for effect in effects:
            print(f"| {label} | {effect:g} | {calibration._coverage(effect, interval)} / 100 |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
