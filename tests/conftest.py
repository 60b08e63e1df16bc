import os

# Tests build their models and data themselves and never download: with the Hub marked
# offline, a hub lookup (lm-eval's datasets for the paper's tasks, reported missing) fails at
# once instead of after the client's retries (~25 s a dataset on a machine without access).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def pytest_configure(config):
    # pytest resets warning filters per test: re-apply the package's list of
    # third-party notices, so that only warnings from our code show.
    from megatron_miniplm import THIRD_PARTY_NOTICES

    for message, category in THIRD_PARTY_NOTICES:
        config.addinivalue_line("filterwarnings", f"ignore:{message}:{category.__name__}")
