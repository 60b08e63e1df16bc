import pytest

from corpus import pattern_instances, write_dataset
from distributed import run_distributed
from trainer_helpers import SEQ, VOCAB, args, train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    train_prefix = write_dataset(str(root / "train"), pattern_instances(400, VOCAB, SEQ + 1, seed=1), VOCAB, SEQ)
    valid_prefix = write_dataset(str(root / "valid"), pattern_instances(40, VOCAB, SEQ + 1, seed=2), VOCAB, SEQ)
    return train_prefix, valid_prefix


@pytest.fixture(scope="module")
def initial_checkpoint(corpus, tmp_path_factory):
    """Iteration-0 checkpoint (fp32, TP=1, seed 5): every layout starts from the same weights."""
    root = tmp_path_factory.mktemp("init")
    run_distributed(train, 1, args(corpus, "--save", str(root), iters=0))
    return str(root)
