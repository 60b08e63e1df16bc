"""Running tools/pretrain_gpt.py in tests: the tiny corpus's arguments, metrics, checkpoints."""

import os

from presets import model_flags

from megatron_miniplm.training.metrics import read as read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "pretrain_gpt.py")
SEQ = 32
VOCAB = 512


def args(corpus, *extra, iters=6):
    train, valid = corpus
    return [*model_flags("tiny"), "--data-path", train, "--seq-length", str(SEQ),
            "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(iters),
            "--lr", "3e-3", "--lr-warmup-iters", "2", "--log-interval", "1", "--seed", "5", *extra]


def metrics(path):
    """The last training record of each iteration (a resumed run appends re-run iterations)."""
    return read_metrics(path).train


def train(argv):
    """tools/pretrain_gpt.py's main in this process (run it under tests/distributed.py)."""
    from megatron_miniplm.cli import pretrain_gpt

    assert pretrain_gpt.main(argv) == 0


def refuses(argv, message, code=None):
    """tools/pretrain_gpt.py's main in this process (run it under tests/distributed.py) refuses
    ``argv``: a non-zero status (``code`` where given) and ``message`` on stderr."""
    import contextlib
    import io

    from megatron_miniplm.cli import pretrain_gpt

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            status = pretrain_gpt.main(argv)
        except SystemExit as e:  # argparse's usage errors
            status = e.code
    assert status != 0 and code in (None, status), (status, err.getvalue()[-3000:])
    assert message in err.getvalue(), err.getvalue()[-3000:]


def parameters_at_tp1(checkpoints, leading=None):
    """Every tensor of each checkpoint, read at TP=1/PP=1 in fp32 and saved: ``checkpoints``
    maps a checkpoint (or save) directory to the file to write, name -> values (the first
    ``leading`` of each, flattened, when given). Run under run_distributed."""
    import torch

    from megatron_miniplm import parallel
    from megatron_miniplm.dist_checkpoint import load_model, load_model_config
    from megatron_miniplm.models.gpt import build_model

    parallel.initialize()
    for save_dir, out in checkpoints.items():
        model = build_model(load_model_config(save_dir))
        load_model([model], save_dir)
        state = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
        if leading:
            state = {k: v.flatten()[:leading].clone() for k, v in state.items() if v.numel() >= leading}
        torch.save(state, out)
