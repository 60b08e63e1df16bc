"""Scoring a mixture-of-experts teacher with its experts split over expert-parallel ranks:
EP=2 (two gloo CPU ranks, 2 of the 4 experts each, tokens sent to their experts by
megatron-core's all-to-all dispatcher) gives the scores of one process holding every expert
and of a direct per-instance computation, and so does EP=2 beside TP=2 or PP=2 (four ranks);
the replicas step together although the plan gives one of them a batch more; the layouts
that cannot be split are refused.

Within fp32 tolerance, not bit for bit: under EP an expert's GEMM runs over the tokens of both
replicas at once, and its rows are summed in another blocking. Routing ties (two experts with
router logits equal to the last bit) could send a token elsewhere; a random model has none.
"""

import logging
import os

import numpy as np
import pytest

from distributed import run_distributed
from helpers import EOD, make_instances, run_until_records, save_checkpoint, torchrun_score_docs, write_dataset

N_INSTANCES = 17
MICRO_BATCH = 2
RTOL = 1e-5
KILL_INSTANCES = 241  # an odd number of batches of one: replica 1 runs a dummy at the end


def _config(root, name, **kw):
    from megatron_miniplm.scoring.config import ScoreConfig

    kw.setdefault("data_path", os.path.join(root, "data"))
    return ScoreConfig(load=os.path.join(root, kw.pop("ckpt", "moe")),
                       output_prefix=os.path.join(root, name), micro_batch_size=kw.pop("micro_batch_size", MICRO_BATCH),
                       progress=False, fsync=False, **kw)


def _world1(root: str) -> None:
    """The data, a MoE and a dense checkpoint saved at EP=1, the reference, the EP=1 scores."""
    from megatron_miniplm.scoring.scorer import score

    instances = make_instances(N_INSTANCES, seed=5)
    write_dataset(os.path.join(root, "data"), instances)
    write_dataset(os.path.join(root, "big"), make_instances(KILL_INSTANCES, seed=4))
    save_checkpoint(os.path.join(root, "moe"), preset="tiny-moe")
    save_checkpoint(os.path.join(root, "dense"))
    _reference(root, instances)
    score(_config(root, "ep1"))


def _reference(root: str, instances) -> None:
    """Each instance alone through the model's full-vocabulary logits, MiniPLM's mask applied here."""
    import torch

    from megatron_miniplm.dist_checkpoint import load_model, load_model_config
    from megatron_miniplm.models.gpt import PLAIN_LOCAL, build_model

    config = load_model_config(os.path.join(root, "moe"))
    model = build_model(config, impl=PLAIN_LOCAL)
    load_model([model], os.path.join(root, "moe"))
    model.eval()
    out = np.zeros((len(instances), 2))
    with torch.no_grad():
        for i, x in enumerate(instances):
            if len(x) < 2:
                continue
            x = torch.from_numpy(x)
            inputs, labels = x[:-1][None], x[1:]
            logits = model(inputs, torch.arange(inputs.shape[1])[None], None)[0].double()
            nll = -torch.log_softmax(logits[:, : config.vocab_size], dim=-1).gather(1, labels[:, None]).squeeze(1)
            counted = inputs[0] != EOD
            out[i] = [nll[counted].sum().item(), counted.sum().item()]
    np.save(os.path.join(root, "reference.npy"), out)


def _world2(root: str) -> None:
    """EP=2 scores with the start-up lines kept, then the refusals of this world."""
    import torch.distributed as dist

    from megatron_miniplm.scoring.dataset import ScoringError
    from megatron_miniplm.scoring.scorer import score

    handler = logging.FileHandler(os.path.join(root, "startup.log"))
    logging.getLogger("score_docs").addHandler(handler)
    logging.getLogger("score_docs").setLevel(logging.INFO)
    score(_config(root, "ep2", expert_model_parallel_size=2))
    logging.getLogger("score_docs").removeHandler(handler)
    score(_config(root, "big-uninterrupted", data_path=os.path.join(root, "big"), expert_model_parallel_size=2,
                  micro_batch_size=1))
    refusals = {}
    for name, kw in (("dense", dict(ckpt="dense")), ("ep4", dict(expert_model_parallel_size=4)),
                     ("tp2", dict(tensor_model_parallel_size=2))):
        try:
            score(_config(root, f"refused-{name}", **{"expert_model_parallel_size": 2, **kw}))
        except ScoringError as e:
            refusals[name] = str(e)
    if dist.get_rank() == 0:
        with open(os.path.join(root, "refusals.txt"), "w") as f:
            f.write("\n".join(f"{k}: {v}" for k, v in sorted(refusals.items())))
    _evaluate(root)


def _evaluate(root: str) -> None:
    """tools/evaluate.py's LM loss at --expert-model-parallel-size 2: the MoE checkpoint with its
    experts split, the dense one (nothing to split) at EP 1."""
    from megatron_miniplm.evaluation.config import EvalConfig
    from megatron_miniplm.evaluation.run import lm_loss_results

    lm_loss_results(EvalConfig(load=[os.path.join(root, "moe"), os.path.join(root, "dense")], name=["moe", "dense"],
                               data_path=os.path.join(root, "data"), output_dir=os.path.join(root, "eval"),
                               micro_batch_size=MICRO_BATCH, expert_model_parallel_size=2))


def _world4(root: str) -> None:
    """EP=2 beside TP=2 (the experts' tokens also gathered over TP), and beside PP=2 (several
    micro-batches per schedule call, the dummy among them)."""
    from megatron_miniplm.scoring.scorer import score

    score(_config(root, "ep2-tp2", expert_model_parallel_size=2, tensor_model_parallel_size=2))
    score(_config(root, "ep2-pp2", expert_model_parallel_size=2, pipeline_model_parallel_size=2))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("expert_parallel"))
    run_distributed(_world1, 1, root)
    run_distributed(_world2, 2, root)
    run_distributed(_world4, 4, root)
    return root


def _load(prefix):
    from megatron_miniplm.scoring.score_file import load_scores

    arr, meta = load_scores(prefix, verify_sha256=True)
    return np.array(arr), meta


def test_the_replicas_have_unequal_batch_counts():
    """The plan gives replica 0 a batch more than replica 1, so EP=2 runs a dummy on replica 1."""
    from megatron_miniplm.scoring.bucketing import plan_batches

    lengths = np.array([len(x) for x in make_instances(N_INSTANCES, seed=5)])
    assert len(plan_batches(lengths, MICRO_BATCH)) % 2 == 1


def test_ep2_scores_equal_one_process_and_the_direct_computation(root):
    ref = np.load(os.path.join(root, "reference.npy"))
    ep1, _ = _load(os.path.join(root, "ep1"))
    ep2, meta = _load(os.path.join(root, "ep2"))
    np.testing.assert_array_equal(ep2[:, 1], ref[:, 1])
    np.testing.assert_allclose(ep2[:, 0], ep1[:, 0], rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(ep2[:, 0], ref[:, 0], rtol=1e-4, atol=1e-6)
    assert meta["parallel"]["expert_model_parallel_size"] == 2 and meta["parallel"]["data_parallel_size"] == 2
    assert meta["settings"]["expert_model_parallel_size"] == 2


@pytest.mark.parametrize("name", ["ep2-tp2", "ep2-pp2"])
def test_ep2_beside_tp2_and_pp2_equals_one_process(root, name):
    ep1, _ = _load(os.path.join(root, "ep1"))
    got, meta = _load(os.path.join(root, name))
    np.testing.assert_array_equal(got[:, 1], ep1[:, 1])
    np.testing.assert_allclose(got[:, 0], ep1[:, 0], rtol=RTOL, atol=1e-6)
    assert meta["parallel"]["expert_model_parallel_size"] == 2 and meta["parallel"]["data_parallel_size"] == 2


def _fewer_records_on_replica_1(output: str) -> None:
    """Cut replica 1's progress shard two records shorter than replica 0's: a kill can land
    between the replicas' appends of the same step (or the replicas' shards reach the disk
    unequally), and the rerun must then pair the batches as the uninterrupted run did."""
    from megatron_miniplm.scoring import resume

    pdir = resume.progress_dir(output)
    kept = len(resume.read_shard(resume.shard_path(pdir, 0))[0]) - 2
    path = resume.shard_path(pdir, 1)
    shard, _ = resume.read_shard(path)
    assert len(shard) >= kept
    os.truncate(path, 0)
    writer = resume.ShardWriter(path, fsync=False)
    for record in shard[:kept]:
        writer.append(record.batch_index, record.scores)
    writer.close()


def test_sigkill_mid_run_then_rerun_is_bit_identical_at_ep2(root):
    """torchrun, EP=2: SIGKILL every process once a few batches are recorded, cut replica 1's
    progress two records short of replica 0's, rerun: the bytes of the uninterrupted EP=2 run
    (replica 0 scores two batches again, beside the batches it had beside it before, and their
    second records must equal the first: the progress assembly checks)."""
    args = ["--data-path", os.path.join(root, "big"), "--load", os.path.join(root, "moe"), "--micro-batch-size", "1",
            "--expert-model-parallel-size", "2"]
    output = os.path.join(root, "big-killed")
    assert run_until_records(args, output, 5) >= 5
    _fewer_records_on_replica_1(output)
    proc = torchrun_score_docs([*args, "--output-prefix", output])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "(resuming)" in err
    want, want_meta = _load(os.path.join(root, "big-uninterrupted"))
    got, meta = _load(output)
    assert got.tobytes() == want.tobytes() and meta["sha256"] == want_meta["sha256"]
    assert meta["resumed"] is True and not want_meta["resumed"]
    assert not os.path.exists(output + ".progress")


def test_evaluation_splits_the_experts_of_the_checkpoints_that_have_them(root):
    ep1, _ = _load(os.path.join(root, "ep1"))
    moe, meta = _load(os.path.join(root, "eval", "moe-data"))
    assert meta["parallel"]["expert_model_parallel_size"] == 2
    np.testing.assert_allclose(moe, ep1, rtol=RTOL, atol=1e-6)
    _, dense = _load(os.path.join(root, "eval", "dense-data"))
    assert dense["parallel"]["expert_model_parallel_size"] == 1


def test_startup_says_how_the_experts_are_placed(root):
    text = open(os.path.join(root, "startup.log")).read()
    assert "TP=1 PP=1 DP=2 EP=2" in text
    assert "experts: 4 over EP 2 (2 per rank), top 2" in text


def test_layouts_that_cannot_split_the_experts_are_refused(root):
    refusals = dict(line.split(": ", 1) for line in open(os.path.join(root, "refusals.txt")).read().splitlines())
    assert "model 'tiny' has no experts to split" in refusals["dense"]
    assert "expert-model-parallel-size 4 does not divide the 2 data-parallel ranks" in refusals["ep4"]
    assert "expert-model-parallel-size 2 does not divide the 1 data-parallel ranks" in refusals["tp2"]


def test_an_expert_count_that_ep_does_not_divide_is_refused():
    from presets import get_preset

    config = get_preset("tiny-moe")
    config.check_expert_parallel(4)
    with pytest.raises(ValueError, match="expert-model-parallel-size 3 does not divide the 4 experts of model 'tiny-moe'"):
        config.check_expert_parallel(3)
