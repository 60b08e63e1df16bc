"""Held-out LM loss, the paper's metric: the mean over instances of each instance's mean NLL.

Computed by the scoring stage (the same masked NLL, TP/PP/DP, chunked
vocab-parallel cross entropy, resumable), then averaged here. The
token-weighted mean is reported beside it.
"""

from __future__ import annotations

import math
import os

import numpy as np


def lm_loss_from_scores(scores: np.ndarray) -> dict:
    """scores: [N, 2] (nll_sum, token_count) per instance."""
    counted = scores[:, 1] > 0
    if not counted.any():
        raise ValueError("no instance has a counted token")
    per_instance = scores[counted, 0] / scores[counted, 1]
    token_mean = float(scores[counted, 0].sum() / scores[counted, 1].sum())
    return {
        "lm_loss": float(per_instance.mean()),
        "token_weighted_loss": token_mean,
        "perplexity": math.exp(min(token_mean, 50.0)),
        "instances": int(counted.sum()),
        "tokens": int(scores[counted, 1].sum()),
    }


def score_test_set(checkpoint: str, data_path: str, output: str, **score_options) -> np.ndarray | None:
    """Per-instance (nll_sum, token_count) of a checkpoint on a test set, through the scorer
    (resumable, any TP/PP/DP). Collective (every rank calls it); the scores on rank 0,
    None elsewhere."""
    import torch.distributed as dist

    from megatron_miniplm.scoring.score_file import load_scores
    from megatron_miniplm.scoring.scorer import score
    from megatron_miniplm.scoring.config import ScoreConfig

    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    summary = score(ScoreConfig(data_path=data_path, load=checkpoint, output_prefix=output, **score_options))
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return np.concatenate([load_scores(p)[0] for p in summary.outputs])
