"""Two simulated nodes: torchrun --nnodes 2 (one process each, rendezvous on 127.0.0.1,
one shared output directory) gives what one node with two processes gives, for training
and for scoring, and each output is written once."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from corpus import pattern_instances, write_dataset
from presets import model_flags
from distributed import free_port, run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
SEQ, VOCAB = 32, 512


def _one_node(tool, argv):
    out = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", tool, *argv],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return [out.stdout]


def _two_nodes(tool, argv):
    port = str(free_port())
    procs = [subprocess.Popen([TORCHRUN, "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
                               "--master-addr", "127.0.0.1", "--master-port", port, tool, *argv],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for node in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [o for o, _ in outs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    data = write_dataset(str(root / "data"), pattern_instances(200, VOCAB, SEQ + 1, seed=1), VOCAB, SEQ)
    results = {}
    for layout, launch in (("one-node", _one_node), ("two-nodes", _two_nodes)):
        out = root / layout
        out.mkdir()
        train = [*model_flags("tiny"), "--data-path", data, "--seq-length", str(SEQ),
                 "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "4",
                 "--bf16", "--use-distributed-optimizer", "--save", str(out / "ckpt"),
                 "--save-interval", "2", "--metrics-file", str(out / "metrics.jsonl"), "--log-interval", "1"]
        train_log = launch(os.path.join(REPO, "tools", "pretrain_gpt.py"), train)
        score = ["--data-path", data, "--load", str(out / "ckpt"), "--output", str(out / "scores"),
                 "--micro-batch-size", "4", "--no-progress"]
        launch(os.path.join(REPO, "tools", "score_docs.py"), score)
        results[layout] = (out, train_log)
    return results


def _weights(save_dir, out):
    from megatron_miniplm import parallel
    from megatron_miniplm.dist_checkpoint import load_model, load_model_config
    from megatron_miniplm.models.gpt import build_model

    parallel.initialize()
    model = build_model(load_model_config(save_dir))
    load_model([model], save_dir)
    torch.save({k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}, out)


def test_training_matches_one_node(runs, tmp_path):
    (one, one_log), (two, two_log) = runs["one-node"], runs["two-nodes"]
    from megatron_miniplm.training.metrics import read as read_metrics

    a, b = read_metrics(str(one / "metrics.jsonl")), read_metrics(str(two / "metrics.jsonl"))
    assert (a.train, a.valid) == (b.train, b.valid)  # the throughput records hold timings
    lines = [json.loads(l) for l in (two / "metrics.jsonl").read_text().splitlines()]
    steps = [m["iteration"] for m in lines if "loss" in m]
    assert steps == [1, 2, 3, 4] and len(lines) == 4 + len(b.throughput)  # one writer: no line twice
    for layout in runs:
        run_distributed(_weights, 1, str(runs[layout][0] / "ckpt"), str(tmp_path / f"{layout}.pt"))
    a, b = torch.load(tmp_path / "one-node.pt"), torch.load(tmp_path / "two-nodes.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sum(log.count("saved checkpoint at iteration") for log in two_log) == 2  # rank 0 only
    for directory in (one, two):
        ckpt = directory / "ckpt"
        assert sorted(os.listdir(ckpt)) == ["iter_0000002", "iter_0000004", "latest_checkpointed_iteration.txt"]
        assert sorted(f for f in os.listdir(ckpt / "iter_0000004") if f.startswith("rng_rank")) == [
            "rng_rank00000.pt", "rng_rank00001.pt"]


def test_scoring_matches_one_node_byte_for_byte(runs):
    (one, _), (two, _) = runs["one-node"], runs["two-nodes"]
    assert (one / "scores.npy").read_bytes() == (two / "scores.npy").read_bytes()
    assert np.load(one / "scores.npy").shape == (200, 2)
    metas = [json.loads((d / "scores.meta.json").read_text()) for d in (one, two)]
    assert metas[0]["sha256"] == metas[1]["sha256"]
    assert [m["parallel"]["data_parallel_size"] for m in metas] == [2, 2]
    for directory in (one, two):
        assert sorted(f for f in os.listdir(directory) if f.startswith("scores")) == [
            "scores.meta.json", "scores.npy"]  # the progress is gone, nothing else was left
