import os
import sys

# Tests import helpers (tests/distributed.py) as top-level modules.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    # pytest resets warning filters per test: re-apply the package's list of
    # third-party notices, so that only warnings from our code show.
    from megatron_miniplm import THIRD_PARTY_NOTICES

    for message, category in THIRD_PARTY_NOTICES:
        config.addinivalue_line("filterwarnings", f"ignore:{message}:{category.__name__}")
