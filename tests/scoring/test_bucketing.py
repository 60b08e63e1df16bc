"""The batch plan: every usable instance exactly once, length-sorted, deterministic."""

import numpy as np
import pytest

from megatron_miniplm.scoring.bucketing import plan_batches, replica_batches, replica_runs, steps


def lengths(n=200, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(2, 1026, size=n)
    x[[5, 17]] = 1  # too short to give a prediction
    return x


def test_every_usable_instance_once_and_short_ones_skipped():
    lens = lengths()
    plan = plan_batches(lens, micro_batch_size=8)
    assert sorted(plan.order.tolist()) == [i for i in range(len(lens)) if lens[i] >= 2]
    assert plan.skipped.tolist() == [5, 17]
    assert plan.starts[0] == 0 and plan.starts[-1] == len(plan.order)


def test_batches_are_longest_first_and_padded_to_their_longest():
    lens = lengths()
    plan = plan_batches(lens, micro_batch_size=8)
    prev = None
    for k in range(len(plan)):
        b = plan.batch(k)
        preds = lens[b.ids] - 1
        assert b.seq_length == preds.max() == preds[0]
        assert b.tokens == preds.sum()
        assert list(preds) == sorted(preds, reverse=True)
        if prev is not None:
            assert prev >= b.seq_length
        prev = b.seq_length


def test_token_budget_packs_short_instances_densely():
    lens = np.array([1025] * 16 + [65] * 64)
    plan = plan_batches(lens, micro_batch_size=4)  # budget 4 x 1024 tokens
    sizes = plan.batch_sizes().tolist()
    assert sizes[:4] == [4, 4, 4, 4]
    assert sizes[4:] == [64]  # 4096 // 64 predictions = 64 rows: all short ones in one batch
    plan = plan_batches(lens, micro_batch_size=4, max_tokens=4 * 64)
    assert plan.batch_sizes().tolist() == [4] * 4 + [4] * 16


def test_plan_is_deterministic_and_its_digest_names_it():
    lens = lengths()
    a, b = plan_batches(lens, 8), plan_batches(lens.copy(), 8)
    assert a.digest() == b.digest()
    assert plan_batches(lens, 4).digest() != a.digest()
    changed = lens.copy()
    changed[0] += 1 if changed[0] < 1025 else -1
    assert plan_batches(changed, 8).digest() != a.digest()


def test_ties_are_ordered_by_id():
    plan = plan_batches(np.array([10, 10, 10, 10, 10]), micro_batch_size=2)
    assert plan.order.tolist() == [0, 1, 2, 3, 4]


def test_replicas_partition_the_batches_and_steps_cover_them():
    plan = plan_batches(lengths(), 8)
    parts = [replica_batches(plan, r, 3) for r in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(plan)))
    groups = list(steps(parts[0], 4))
    assert np.concatenate(groups).tolist() == parts[0].tolist()
    assert all(len(g) == 4 for g in groups[:-1])


def test_empty_and_invalid():
    plan = plan_batches(np.array([], dtype=np.int64), 8)
    assert len(plan) == 0
    with pytest.raises(ValueError):
        plan_batches(np.array([5]), 0)


def test_resumed_replicas_in_lockstep_run_each_batch_beside_the_same_batches():
    """7 batches over 2 replicas: replica 0 runs 0 2 4 6, replica 1 runs 1 3 5 and a dummy, in
    steps (0,1) (2,3) (4,5) (6,-). Replica 0 recorded 0 2 4, replica 1 only 1: alone, each
    runs what it has not recorded; in lockstep both resume at step 1 (replica 0 runs 2 and 4
    again) so that every step pairs the batches of the uninterrupted run."""
    plan = plan_batches(np.full(7, 5), micro_batch_size=1)
    done = np.zeros(7, bool)
    done[[0, 2, 4, 1]] = True
    alone = replica_runs(plan, done, 2, lockstep=False)
    assert [r.tolist() for r in alone] == [[6], [3, 5]]
    together = replica_runs(plan, done, 2, lockstep=True)
    assert [r.tolist() for r in together] == [[2, 4, 6], [3, 5, -1]]
    fresh = replica_runs(plan, np.zeros(7, bool), 2, lockstep=True)
    assert [r.tolist() for r in fresh] == [[0, 2, 4, 6], [1, 3, 5, -1]]
    # the short replica done, the other not: the dummy still comes last, beside batch 6
    done[[3, 5, 6]] = [True, True, False]
    assert [r.tolist() for r in replica_runs(plan, done, 2, lockstep=True)] == [[6], [-1]]
