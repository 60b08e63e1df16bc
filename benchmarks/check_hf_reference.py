#!/usr/bin/env python
"""The figures behind RESULTS.md's "Scores against transformers": the largest |ours -
transformers' fp32 forward| of an instance's mean NLL, per model and layout, from the runs
of tests/scoring/test_hf_reference.py (which asserts them within 1e-5).

    PYTHONPATH=tests:tests/scoring python benchmarks/check_hf_reference.py   # ~30 s on 2 cores

The harness is the test module itself, with the test helpers it imports as top-level
modules (tests/corpus.py, tests/distributed.py, ...): PYTHONPATH puts them on the path
as pytest's `pythonpath` setting does for the tests, and the processes the harness
starts inherit it.
"""

import os
import sys
import tempfile

import numpy as np

try:
    import test_hf_reference as harness
except ModuleNotFoundError as e:
    if e.name not in ("test_hf_reference", "conversion", "corpus", "distributed"):
        raise
    sys.exit(f"check_hf_reference.py: error: {e}; run it as "
             "PYTHONPATH=tests:tests/scoring python benchmarks/check_hf_reference.py")


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
