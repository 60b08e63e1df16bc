"""MiniPLM's loss mask on a hand-made batch with EOD and padding."""

import numpy as np
import pytest
import torch

from megatron_miniplm.data.samples import collate_instances

EOD = 0


def test_loss_mask_hand_made_batch():
    a = np.array([5, 6, EOD, 7, 8, EOD])  # two documents in one instance
    b = np.array([9, 10, 11])  # shorter: padded
    batch = collate_instances([a, b], pad_id=EOD, pad_to=6)
    assert batch["tokens"].tolist() == [[5, 6, EOD, 7, 8, EOD], [9, 10, 11, EOD, EOD, EOD]]
    assert batch["labels"].tolist() == [[6, EOD, 7, 8, EOD, EOD], [10, 11, EOD, EOD, EOD, EOD]]
    # a: predicting EOD counts (pos 1), predicting 7 from EOD does not (pos 2), position 5 is padding.
    # b: two real predictions; position 2 (input 11, label pad) and the rest are padding.
    assert batch["loss_mask"].tolist() == [[1, 1, 0, 1, 1, 0], [1, 1, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [list(range(6))] * 2


def test_pad_distinct_from_eod_masks_only_pad_inputs_and_padding():
    pad, eod = 99, 0
    batch = collate_instances([np.array([1, eod, 2, 3])], pad_id=pad, pad_to=5)
    assert batch["loss_mask"].tolist() == [[1, 1, 1, 0, 0]]


def test_scoring_pads_to_longest_only():
    batch = collate_instances([np.arange(1, 5), np.arange(1, 9)], pad_id=EOD)
    assert batch["tokens"].shape == (2, 7)
    assert batch["loss_mask"].sum(dim=1).tolist() == [3, 7]
    assert batch["tokens"].dtype == torch.int64


def test_too_long_and_too_short_instances_are_refused():
    with pytest.raises(ValueError, match="exceeds seq_length"):
        collate_instances([np.arange(1, 10)], pad_id=EOD, pad_to=4)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        collate_instances([np.array([3])], pad_id=EOD)
