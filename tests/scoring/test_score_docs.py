"""tools/score_docs.py end to end: scores equal a direct per-instance computation at
TP=1, TP=2, PP=2 and DP=2; sharded datasets; bf16; every refusal.

The reference runs the model on one instance at a time (no batching, no padding,
no chunking), takes megatron's full-vocabulary logits, drops megatron's padding
rows, and applies MiniPLM's loss mask itself (input token != EOD).
"""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from distributed import run_distributed
from megatron_miniplm.scoring import SCORES_VERSION
from helpers import (EOD, TOKENIZER, make_instances, records, run_until_records, save_checkpoint, torchrun_score_docs,
                     write_dataset, write_sharded)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N_INSTANCES = 40
KILL_INSTANCES = 400
RTOL = 1e-4


def _world1(root: str) -> None:
    """Everything that runs in one process: data, checkpoints, the reference, the
    single-process runs and every refusal (one megatron import for all of them)."""
    instances = make_instances(N_INSTANCES)
    write_dataset(os.path.join(root, "data"), instances)
    write_sharded(os.path.join(root, "sharded"), [instances[:25], instances[25:]])
    write_dataset(os.path.join(root, "other"), make_instances(12, seed=9))
    write_dataset(os.path.join(root, "big"), make_instances(KILL_INSTANCES, seed=4, max_len=129))
    save_checkpoint(os.path.join(root, "ckpt"))
    _reference(root, instances)
    _single(root)
    _refusals(root, os.path.join(root, "refusals.json"))


def _reference(root: str, instances) -> None:
    import torch

    from megatron_miniplm.dist_checkpoint import load_model, load_model_config
    from megatron_miniplm.models.gpt import PLAIN_LOCAL, build_model

    config = load_model_config(os.path.join(root, "ckpt"))
    model = build_model(config, impl=PLAIN_LOCAL)
    load_model([model], os.path.join(root, "ckpt"))
    model.eval()
    out = np.zeros((len(instances), 2))
    with torch.no_grad():
        for i, x in enumerate(instances):
            if len(x) < 2:
                continue
            x = torch.from_numpy(x)
            inputs, labels = x[:-1][None], x[1:]
            logits = model(inputs, torch.arange(inputs.shape[1])[None], None)[0].double()
            logp = torch.log_softmax(logits[:, : config.vocab_size], dim=-1)
            nll = -logp.gather(1, labels[:, None]).squeeze(1)
            counted = inputs[0] != EOD
            out[i] = [nll[counted].sum().item(), counted.sum().item()]
    np.save(os.path.join(root, "reference.npy"), out)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("score_docs"))
    run_distributed(_world1, 1, root)
    ref = np.load(os.path.join(root, "reference.npy"))
    assert ref[3].tolist() == [0.0, 0.0]  # the one-token instance gives no prediction
    assert (ref[:, 1] < [len(x) - 1 for x in make_instances(N_INSTANCES)]).any()  # EODs masked
    return root


def _config(root, name, **kw):
    from megatron_miniplm.scoring.config import ScoreConfig

    kw.setdefault("data_path", os.path.join(root, "data"))
    return ScoreConfig(load=os.path.join(root, "ckpt"), output_prefix=os.path.join(root, name),
                       micro_batch_size=kw.pop("micro_batch_size", 4), progress=False, fsync=False, **kw)


def _world2(root: str) -> None:
    """World of 2: TP=2, PP=2 (several micro-batches of different shapes per schedule
    call), DP=2, and the uninterrupted run the SIGKILL test compares with."""
    from megatron_miniplm.scoring.scorer import score

    score(_config(root, "tp2", tensor_model_parallel_size=2))
    score(_config(root, "pp2", pipeline_model_parallel_size=2, micro_batch_size=3))
    score(_config(root, "dp2", micro_batch_size=2))
    score(_config(root, "big_uninterrupted", data_path=os.path.join(root, "big"), micro_batch_size=1))


def _single(root: str) -> None:
    from megatron_miniplm.scoring.scorer import score

    score(_config(root, "tp1"))
    score(_config(root, "bf16", bf16=True))
    score(_config(root, "sharded_scores", data_path=os.path.join(root, "sharded"), micro_batch_size=5))
    from megatron_miniplm.models.config import LayerImpl

    score(_config(root, "local_attention", layers=LayerImpl(attention_backend="local"), logits_chunk_mb=0))


@pytest.fixture(scope="module")
def layouts(root):
    run_distributed(_world2, 2, root)
    return root


def _load(prefix):
    from megatron_miniplm.scoring.score_file import load_scores

    arr, meta = load_scores(prefix, verify_sha256=True)
    return np.array(arr), meta


@pytest.mark.parametrize("name", ["tp1", "tp2", "pp2", "dp2", "local_attention"])
def test_scores_equal_direct_per_instance_computation(layouts, name):
    ref = np.load(os.path.join(layouts, "reference.npy"))
    got, meta = _load(os.path.join(layouts, name))
    assert got.shape == (N_INSTANCES, 2) and got.dtype == np.float64
    np.testing.assert_array_equal(got[:, 1], ref[:, 1])
    np.testing.assert_allclose(got[:, 0], ref[:, 0], rtol=RTOL, atol=1e-6)
    assert not os.path.exists(os.path.join(layouts, name + ".progress"))
    assert meta["dataset_fingerprint"] == json.load(open(os.path.join(layouts, "data.meta.json")))["fingerprint"]


def test_meta_records_identity_layout_and_speed(layouts):
    _, meta = _load(os.path.join(layouts, "pp2"))
    assert meta["format_version"] == 1 and meta["num_instances"] == N_INSTANCES
    assert meta["model"]["checkpoint"] == os.path.realpath(os.path.join(layouts, "ckpt"))
    assert meta["model"]["config"]["vocab_size"] == 500
    assert meta["tokenizer"]["sha256"] == TOKENIZER["sha256"]
    assert meta["dtype"] == "fp32"
    assert meta["parallel"] == {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 2,
                                "expert_model_parallel_size": 1, "data_parallel_size": 1, "backend": "gloo"}
    assert meta["elapsed_s"] > 0 and meta["tokens_per_s"] > 0
    assert meta["num_tokens_counted"] == int(np.load(os.path.join(layouts, "reference.npy"))[:, 1].sum())
    _, dp = _load(os.path.join(layouts, "dp2"))
    assert dp["parallel"]["data_parallel_size"] == 2


def test_bf16_close_to_fp32(layouts):
    ref = np.load(os.path.join(layouts, "reference.npy"))
    got, meta = _load(os.path.join(layouts, "bf16"))
    assert meta["dtype"] == "bf16"
    np.testing.assert_array_equal(got[:, 1], ref[:, 1])
    counted = ref[:, 1] > 0
    mean_got, mean_ref = got[counted, 0] / got[counted, 1], ref[counted, 0] / ref[counted, 1]
    assert np.abs(mean_got - mean_ref).max() < 0.05
    assert not np.array_equal(got[:, 0], ref[:, 0])  # it did run in bf16


def test_sharded_dataset_gets_one_score_file_per_shard(layouts):
    from megatron_miniplm.scoring.score_file import check_scores_match

    ref = np.load(os.path.join(layouts, "reference.npy"))
    parts = []
    for i in range(2):
        prefix = os.path.join(layouts, f"sharded_scores_{i:05d}")
        got, meta = _load(prefix)
        shard = os.path.join(layouts, f"sharded_{i:05d}")
        check_scores_match(prefix, meta, shard, json.load(open(shard + ".meta.json")))
        assert meta["dataset"]["shard_index"] == i
        parts.append(got)
    got = np.concatenate(parts)
    np.testing.assert_array_equal(got[:, 1], ref[:, 1])
    np.testing.assert_allclose(got[:, 0], ref[:, 0], rtol=RTOL, atol=1e-6)
    assert not os.path.exists(os.path.join(layouts, "sharded_scores.npy"))


# --- refusals ------------------------------------------------------------------

def _refusals(root: str, out_file: str) -> None:
    """Every refusal, in one process; records (name, message) or (name, None) if it ran."""
    import time

    from megatron_miniplm.scoring import resume
    from megatron_miniplm.scoring.dataset import ScoringError
    from megatron_miniplm.scoring.scorer import score

    results = {}

    def attempt(name, cfg):
        try:
            summary = score(cfg)
            results[name] = {"ok": True, "complete": summary.already_complete}
        except ScoringError as e:
            results[name] = {"ok": False, "message": str(e)}

    def ckpt(name, vocab=None, tokenizer="same"):
        """A copy of the checkpoint (another path: another model) with its config's
        vocabulary or its recorded tokenizer changed; refusals come before loading."""
        path = os.path.join(root, name)
        shutil.copytree(os.path.join(root, "ckpt"), path)
        if vocab is not None:
            cfg_path = os.path.join(path, "model_config.json")
            cfg = json.load(open(cfg_path))
            json.dump({**cfg, "vocab_size": vocab}, open(cfg_path, "w"))
        info = os.path.join(path, "checkpoint_info.json")
        if tokenizer is None:
            os.remove(info)
        elif tokenizer != "same":
            json.dump({"format_version": 1, "tokenizer": tokenizer}, open(info, "w"))
        return path

    small = ckpt("ckpt_small_vocab", vocab=400, tokenizer=None)
    other_hash = ckpt("ckpt_other_tok", tokenizer={**TOKENIZER, "sha256": "b" * 64})
    other_size = ckpt("ckpt_other_size", tokenizer={**TOKENIZER, "vocab_size": 499})
    other_model = ckpt("ckpt_other_model")
    no_info_big_vocab = os.path.join(root, "ckpt_no_info")
    save_checkpoint(no_info_big_vocab, vocab=600, tokenizer=None)

    attempt("small_vocab", replace(_config(root, "r1"), load=small))
    attempt("other_tokenizer", replace(_config(root, "r2"), load=other_hash))
    attempt("other_vocab_size", replace(_config(root, "r3"), load=other_size))
    attempt("no_info_larger_vocab", replace(_config(root, "r4"), load=no_info_big_vocab))
    windowed = ckpt("ckpt_windowed")  # a Mistral-style attention window shorter than the instances
    cfg_path = os.path.join(windowed, "model_config.json")
    json.dump({**json.load(open(cfg_path)), "sliding_window": 4}, open(cfg_path, "w"))
    attempt("window", replace(_config(root, "r6"), load=windowed))

    # A finished output: rerunning is a no-op; another dataset, model or settings are refused.
    attempt("first", _config(root, "out"))
    npy = os.path.join(root, "out.npy")
    mtime = os.stat(npy).st_mtime_ns
    time.sleep(0.01)
    attempt("same_again", _config(root, "out"))
    results["same_again"]["untouched"] = os.stat(npy).st_mtime_ns == mtime
    attempt("other_dataset", _config(root, "out", data_path=os.path.join(root, "other")))
    attempt("other_model", replace(_config(root, "out"), load=other_model))
    attempt("other_settings", _config(root, "out", micro_batch_size=2))
    attempt("other_dtype", _config(root, "out", bf16=True))
    # Scores made by code that computed other numbers (an earlier SCORES_VERSION) are not reused.
    meta_path = os.path.join(root, "out.meta.json")
    meta = json.load(open(meta_path))
    json.dump({**meta, "settings": {**meta["settings"], "scores_version": 1}}, open(meta_path, "w"))
    attempt("older_scores", _config(root, "out"))

    # Partial scores (a progress directory) of another dataset / model / settings.
    pdir = resume.progress_dir(os.path.join(root, "part"))
    attempt("part_first", _config(root, "part"))
    for name, change in [("part_other_dataset", {"dataset": {"shards": ["0" * 64]}}),
                         ("part_other_model", {"model": {"checkpoint": "/elsewhere"}}),
                         ("part_other_settings", {"settings": {"dtype": "bf16"}})]:
        meta = json.load(open(os.path.join(root, "part.meta.json")))
        run = {"dataset": {"shards": [meta["dataset_fingerprint"]]}, "model": meta["model"],
               "settings": meta["settings"], "plan": {"digest": meta["batching"]["plan_digest"],
                                                      "num_batches": meta["batching"]["num_batches"]}}
        os.remove(os.path.join(root, "part.npy"))
        os.remove(os.path.join(root, "part.meta.json"))
        resume.write_run(pdir, {**run, **change})
        attempt(name, _config(root, "part"))
        resume.remove(pdir)
        attempt(name + "_then_ok", _config(root, "part"))

    # A kill after the final rename but before the progress cleanup: complete, cleaned up.
    resume.write_run(pdir, {"leftover": True})
    attempt("leftover_progress", _config(root, "part"))
    results["leftover_progress"]["progress_removed"] = not os.path.exists(pdir)

    # The dataset's .idx no longer matches its meta's fingerprint.
    shutil.copy(os.path.join(root, "data.bin"), os.path.join(root, "bad.bin"))
    shutil.copy(os.path.join(root, "other.idx"), os.path.join(root, "bad.idx"))
    shutil.copy(os.path.join(root, "data.meta.json"), os.path.join(root, "bad.meta.json"))
    attempt("bad_fingerprint", _config(root, "r5", data_path=os.path.join(root, "bad")))
    attempt("missing_dir", _config(root, "no/such/dir/out"))
    attempt("not_a_score_file", _config(root, "data"))  # --output naming the dataset itself
    with open(out_file, "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def refusals(root):
    return json.load(open(os.path.join(root, "refusals.json")))


@pytest.mark.parametrize("name, message", [
    ("small_vocab", "the dataset's tokenizer has 500 tokens, the model only 400"),
    ("other_tokenizer", "tokenizer mismatch"),
    ("other_vocab_size", "the model's tokenizer has 499 tokens, the dataset's 500"),
    ("other_dataset", "holds scores of another dataset"),
    ("other_model", "holds scores of another model"),
    ("other_settings", "micro_batch_size: 4 -> 2"),
    ("other_dtype", "dtype: 'fp32' -> 'bf16'"),
    ("older_scores", f"scores_version: 1 -> {SCORES_VERSION}"),
    ("part_other_dataset", "holds partial scores of another dataset"),
    ("part_other_model", "holds partial scores of another model"),
    ("part_other_settings", "partial scores computed with other settings"),
    ("bad_fingerprint", "does not match"),
    ("missing_dir", "does not exist"),
    ("not_a_score_file", "is not a score file"),
    ("window", "exceeds the 4-token sliding attention window"),
])
def test_refusal(refusals, name, message):
    assert refusals[name]["ok"] is False, f"{name} was not refused"
    assert message in refusals[name]["message"], refusals[name]["message"]


def test_what_is_not_refused(refusals, root):
    """A larger model vocabulary without a tokenizer record (Qwen's padded embedding), a
    rerun of a finished output, and a run after a refused one go through."""
    assert refusals["no_info_larger_vocab"]["ok"]  # a larger vocabulary covers the dataset
    assert refusals["first"] == {"ok": True, "complete": False}
    assert refusals["same_again"] == {"ok": True, "complete": True, "untouched": True}
    for name in ("part_other_dataset", "part_other_model", "part_other_settings"):
        assert refusals[name + "_then_ok"] == {"ok": True, "complete": False}
    assert refusals["leftover_progress"] == {"ok": True, "complete": True, "progress_removed": True}
    # The refused runs wrote nothing.
    for name in ("r1", "r2", "r3", "r5", "r6"):
        assert not any(f.startswith(name + ".") for f in os.listdir(root)), name


def test_cli_refusal_exits_1_with_the_reason(root):
    os.makedirs(os.path.join(root, "ckpt_cli"), exist_ok=True)
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "score_docs.py"), "--data-path",
         os.path.join(root, "data"), "--load", os.path.join(root, "ckpt_cli"), "--output-prefix",
         os.path.join(root, "cli")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "error: --load:" in proc.stderr and "not a megatron checkpoint" in proc.stderr


# --- SIGKILL and resume ----------------------------------------------------------

def _args(root: str) -> list:
    return ["--data-path", os.path.join(root, "big"), "--load", os.path.join(root, "ckpt"), "--micro-batch-size", "1"]


def _torchrun(root: str, output: str):
    return torchrun_score_docs([*_args(root), "--output-prefix", output])


def test_sigkill_mid_run_then_rerun_is_bit_identical(layouts):
    """torchrun, DP=2: SIGKILL everything once a few batches are recorded, again later
    in the rerun, then rerun to the end: the same bytes as an uninterrupted run."""
    root = layouts
    output = os.path.join(root, "big_killed")
    first = run_until_records(_args(root), output, 3)
    second = run_until_records(_args(root), output, first + 20)
    assert second > first
    proc = _torchrun(root, output)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "(resuming)" in err
    assert "host memory: " in err  # a CPU run says what the heap does with freed memory

    want, want_meta = _load(os.path.join(root, "big_uninterrupted"))
    got, meta = _load(output)
    assert got.tobytes() == want.tobytes()
    assert meta["sha256"] == want_meta["sha256"]
    assert meta["resumed"] is True and not want_meta["resumed"]
    total = int(np.sum([len(x) - 1 for x in make_instances(KILL_INSTANCES, seed=4, max_len=129) if len(x) > 1]))
    assert 0 < meta["tokens_this_session"] < total  # the last run did only what was left
    assert not os.path.exists(output + ".progress")


def _worker(proc: subprocess.Popen, rank: int):
    """torchrun's worker process of the given rank."""
    import psutil

    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "score_docs.py" in " ".join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no worker of rank {rank}")


def test_sigterm_flushes_progress_and_exits_cleanly(layouts):
    """SIGTERM to one worker only: every rank stops at the same step, the progress is kept,
    torchrun exits 0 without a score file; the rerun gives the uninterrupted run's bytes."""
    import signal
    import time

    from megatron_miniplm.scoring import resume

    root = layouts
    output = os.path.join(root, "big_sigterm")
    pdir = resume.progress_dir(output)
    proc = _torchrun(root, output)
    deadline = time.monotonic() + 240
    while records(pdir) < 3:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.002)
    _worker(proc, 1).send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by SIGTERM" in err and "rerun the same command" in err
    assert not os.path.exists(output + ".npy")
    recorded = records(pdir)
    assert recorded >= 3
    status = resume.read_status(pdir)  # what the pipeline's --status shows of a stopped scorer
    assert status is not None and 0 < status["instances_done"] < status["instances"], status
    proc = _torchrun(root, output)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    want, _ = _load(os.path.join(root, "big_uninterrupted"))
    got, meta = _load(output)
    assert got.tobytes() == want.tobytes() and meta["resumed"] is True
