"""Instances to model inputs, with MiniPLM's loss mask. Shared by training and scoring.

An instance ``x_0 .. x_n`` (at most seq_length + 1 tokens) becomes inputs
``x_0 .. x_{n-1}`` and labels ``x_1 .. x_n``, right-padded with the pad token.
A prediction counts unless its *input* token is the pad token (MiniPLM sets
pad = EOD): predicting EOD counts, predicting the next document's first token
from an EOD does not, and padding never counts.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch


def collate_instances(
    instances: Sequence[np.ndarray],
    pad_id: int,
    pad_to: Optional[int] = None,
) -> dict:
    """Batch of {tokens, labels, loss_mask, position_ids}, each [b, s].

    ``s`` is ``pad_to`` (training: seq_length) or the longest instance minus one
    (scoring, where batches of similar length waste little on padding).
    """
    lengths = [len(x) - 1 for x in instances]
    if min(lengths) < 1:
        raise ValueError("an instance needs at least 2 tokens to give one prediction")
    seq = pad_to if pad_to is not None else max(lengths)
    if max(lengths) > seq:
        raise ValueError(f"instance of {max(lengths) + 1} tokens exceeds seq_length + 1 = {seq + 1}")
    tokens = np.full((len(instances), seq + 1), pad_id, dtype=np.int64)
    for row, x in zip(tokens, instances):
        row[: len(x)] = x
    tokens = torch.from_numpy(tokens)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    valid = torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]
    loss_mask = (valid & (inputs != pad_id)).float()
    return {
        "tokens": inputs.contiguous(),
        "labels": labels.contiguous(),
        "loss_mask": loss_mask,
        "position_ids": torch.arange(seq).expand(len(instances), seq).contiguous(),
    }
