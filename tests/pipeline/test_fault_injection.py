"""The fault-injection benchmark at a small N: the tiny pipeline killed at random moments
(SIGKILL / SIGTERM to the launch, the launcher or one rank) ends, once rerun, with the
uninterrupted run's artifacts."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_the_pipeline_survives_random_faults(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "fault_injection.py"), "--faults", "4",
                          "--seed", "1", "--dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, timeout=3600)
    assert "faults survived 4/4" in out.stdout and out.returncode == 0, out.stdout[-4000:]
    assert out.stdout.count(" survived\n") == 4
