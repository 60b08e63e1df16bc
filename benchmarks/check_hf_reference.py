#!/usr/bin/env python
"""The figures behind RESULTS.md's "Scores against transformers": the largest |ours -
transformers' fp32 forward| of an instance's mean NLL, per model and layout, from the runs
of tests/scoring/test_hf_reference.py (which asserts them within 1e-5).

    python benchmarks/check_hf_reference.py        # ~30 s on 2 cores
"""

import os
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "tests"), os.path.join(REPO, "tests", "scoring")]

import test_hf_reference as harness  # noqa: E402


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        root, reference, _ = harness.build_runs(tmp)
        print("| model | TP=1 | TP=2 | PP=2 | evaluate.py (TP=1) |\n|---|---|---|---|---|")
        for name in harness.NAMES:
            prefixes = [os.path.join(root, f"scores-{name}-{layout}") for layout in harness.LAYOUTS]
            prefixes.append(os.path.join(root, "eval", f"{name}-data"))
            cells = [np.nanmax(np.abs(harness._mean_nll(p) - reference[name])) for p in prefixes]
            print(f"| {name} | " + " | ".join(f"{c:.1e}" for c in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
