import pytest

from selection_helpers import make_corpus  # on the path by pyproject.toml's pytest pythonpath


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Three shards (700, 1 and 900 instances) with teacher and reference score files."""
    return make_corpus(str(tmp_path_factory.mktemp("corpus")))
