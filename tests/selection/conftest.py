import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from selection_helpers import make_corpus  # noqa: E402


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Three shards (700, 1 and 900 instances) with teacher and reference score files."""
    return make_corpus(str(tmp_path_factory.mktemp("corpus")))
