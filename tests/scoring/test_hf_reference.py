"""Scores against an independent reference: transformers' own fp32 forward.

For every layout the converter accepts (Qwen2 with QKV bias, Llama without), tied and
untied embeddings, GQA and MHA, a tiny random HF model is converted with
tools/convert_checkpoint.py and

- scored with tools/score_docs.py at TP=1, TP=2 and PP=2: each instance's mean NLL
  under MiniPLM's mask (a prediction counts unless its input token is EOD) equals the
  one computed from transformers' logits, within 1e-5;
- evaluated with tools/evaluate.py: its per-instance losses are the same numbers;
- loaded as the Vanilla KD teacher at TP=1 and TP=2: its log-probabilities (final hidden
  states times the output weight it regathered) equal transformers' log-softmax.

The reference never touches megatron: it runs each instance alone through transformers
(no batching, padding or chunking). The models' embedding and output matrices are
large enough that NLLs lie far from log V: a near-uniform model hides which matrix is
used, and every matrix is random, so a wrong one shows as an error of nats.
"""

from __future__ import annotations

import importlib
import json
import os

import numpy as np
import pytest
import torch

from conversion import tiny_hf_models as tiny
from corpus import write_dataset
from distributed import run_distributed

ATOL = 1e-5
EOD = 0
VOCAB_STD = 0.5  # logits of std ~4 over the 300-token vocabulary: NLLs of several nats off log V
N_INSTANCES = 12
# (architecture, tied, key/value heads): qwen2 has QKV bias, llama none; 4 kv heads of 4 is MHA
VARIANTS = [(arch, tied, kv) for arch in ("qwen2", "llama") for tied in (True, False) for kv in (4, 2)]
NAMES = [f"{arch}-{'tied' if tied else 'untied'}-{'mha' if kv == 4 else 'gqa'}" for arch, tied, kv in VARIANTS]
LAYOUTS = {"tp1": [], "tp2": ["--tensor-model-parallel-size", "2"], "pp2": ["--pipeline-model-parallel-size", "2"]}


def _tool(name: str):
    return importlib.import_module(f"megatron_miniplm.cli.{name}")


def make_instances(n: int, seed: int = 0) -> list[np.ndarray]:
    """Instances of 2..48 tokens with EODs inside (one at the start of some), as MiniPLM cuts them."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x = rng.integers(1, tiny.VOCAB, size=int(rng.integers(2, 49)))
        x[rng.integers(0, len(x), size=max(1, len(x) // 10))] = EOD
        if i % 3 == 0:
            x[0] = EOD
        out.append(x.astype(np.int64))
    return out


def hf_mean_nll(model, instances) -> np.ndarray:
    """Each instance's mean NLL from transformers' fp32 logits under MiniPLM's mask (NaN
    where nothing counts)."""
    out = np.full(len(instances), np.nan)
    with torch.no_grad():
        for i, x in enumerate(instances):
            x = torch.from_numpy(x)
            logp = torch.log_softmax(model(x[None, :-1]).logits[0].float(), dim=-1)
            nll = -logp.gather(1, x[1:, None]).squeeze(1).double()
            counted = x[:-1] != EOD
            if counted.any():
                out[i] = float(nll[counted].sum() / counted.sum())
    return out


def _kd_logprobs(root: str, name: str, tp: int) -> None:
    """The KD teacher's log-probabilities over the real vocabulary, [s, b, V], on rank 0."""
    from megatron.core import parallel_state as ps

    from megatron_miniplm import parallel
    from megatron_miniplm.training.kd import Teacher
    from megatron_miniplm.training.config import KDSettings

    parallel.initialize(parallel.ParallelConfig(tensor_model_parallel_size=tp))
    ckpt, data = os.path.join(root, f"{name}-meg"), os.path.join(root, "data")
    tokenizer = json.load(open(data + ".meta.json"))["tokenizer"]
    teacher = Teacher(KDSettings(kd_teacher_load=ckpt), _config(ckpt), bf16=False, data_tokenizer=tokenizer,
                      data_path=data)
    tokens = torch.load(os.path.join(root, "kd_tokens.pt"))
    hidden = teacher.hidden_states(tokens, torch.arange(tokens.shape[1]).expand_as(tokens))
    local = (hidden @ teacher.weight.t()).contiguous()  # [s, b, V/tp] of this rank's vocabulary slice
    if tp > 1:
        parts = [torch.empty_like(local) for _ in range(tp)]
        torch.distributed.all_gather(parts, local, group=ps.get_tensor_model_parallel_group())
        local = torch.cat(parts, dim=-1)
    if torch.distributed.get_rank() == 0:
        torch.save(torch.log_softmax(local[..., : tiny.VOCAB], dim=-1), os.path.join(root, f"kd-{name}-tp{tp}.pt"))


def _config(ckpt: str):
    from megatron_miniplm.dist_checkpoint import load_model_config

    return load_model_config(ckpt)


def _score(root: str, layouts: list[str]) -> None:
    """tools/score_docs.py's flags and run, without its ``main``, which ends the process group
    (a world of several processes cannot rendezvous again on torchrun's port)."""
    from megatron_miniplm.scoring.scorer import score
    from megatron_miniplm.scoring.config import ScoreConfig
    from megatron_miniplm.settings import from_args

    parser = _tool("score_docs").build_parser()
    for layout in layouts:
        for name in NAMES:
            argv = ["--data-path", os.path.join(root, "data"), "--load", os.path.join(root, f"{name}-meg"),
                    "--output-prefix", os.path.join(root, f"scores-{name}-{layout}"), "--micro-batch-size", "3",
                    "--no-progress", "--no-fsync", *LAYOUTS[layout]]
            score(from_args(ScoreConfig, parser.parse_args(argv)))


def _world1(root: str) -> None:
    _score(root, ["tp1"])
    evaluate = _tool("evaluate")
    assert evaluate.main(["--load", *[os.path.join(root, f"{n}-meg") for n in NAMES], "--name", *NAMES,
                          "--data-path", os.path.join(root, "data"), "--output-dir", os.path.join(root, "eval"),
                          "--bootstrap-samples", "10"]) == 0
    for name in NAMES:
        _kd_logprobs(root, name, tp=1)


def _world2(root: str) -> None:
    _score(root, ["tp2", "pp2"])
    for name in NAMES:
        _kd_logprobs(root, name, tp=2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return build_runs(str(tmp_path_factory.mktemp("hf_reference")))


def build_runs(root: str):
    """The converted models, transformers' reference per instance and on the KD tokens, and
    every run of our tools, under ``root``: (root, reference NLLs, reference KD log-probs)."""
    convert = _tool("convert_checkpoint")
    instances = make_instances(N_INSTANCES)
    kd_tokens = torch.from_numpy(np.stack([x[:16] for x in make_instances(40, seed=5) if len(x) >= 16][:2]))
    torch.save(kd_tokens, os.path.join(root, "kd_tokens.pt"))
    reference, kd_reference = {}, {}
    for k, ((arch, tied, kv), name) in enumerate(zip(VARIANTS, NAMES)):
        config = tiny.variant_config(arch, num_key_value_heads=kv, tie_word_embeddings=tied)
        model = tiny.save_hf(config, os.path.join(root, f"{name}-hf"), seed=k, vocab_std=VOCAB_STD)
        assert convert.main(["--direction", "hf-to-megatron", "--load", os.path.join(root, f"{name}-hf"),
                             "--save", os.path.join(root, f"{name}-meg"), "--dtype", "fp32"]) == 0
        reference[name] = hf_mean_nll(model, instances)
        with torch.no_grad():
            kd_reference[name] = torch.log_softmax(model(kd_tokens).logits.float(), dim=-1).transpose(0, 1)
    info = json.load(open(os.path.join(root, f"{NAMES[0]}-meg", "checkpoint_info.json")))["tokenizer"]
    tokenizer = {"name": "tiny", "pad_id": info["eod_id"], **info}
    assert tokenizer["eod_id"] == EOD
    write_dataset(os.path.join(root, "data"), instances, tiny.VOCAB, max(len(x) for x in instances) - 1,
                  tokenizer=tokenizer)
    run_distributed(_world1, 1, root)
    run_distributed(_world2, 2, root)
    return root, reference, kd_reference


def _mean_nll(prefix: str) -> np.ndarray:
    from megatron_miniplm.scoring.score_file import load_scores

    scores, _ = load_scores(prefix, verify_sha256=True)
    scores = np.asarray(scores)
    with np.errstate(invalid="ignore"):
        return np.where(scores[:, 1] > 0, scores[:, 0] / np.maximum(scores[:, 1], 1), np.nan)


def test_reference_is_far_from_uniform(runs):
    """The harness can tell output matrices apart: NLLs are nats away from log V."""
    _, reference, _ = runs
    for name, nll in reference.items():
        assert np.isnan(nll).sum() < len(nll) // 2, name
        assert abs(np.nanmedian(nll) - np.log(tiny.VOCAB)) > 2.0, (name, nll)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", NAMES)
def test_score_docs_equals_transformers(runs, name, layout):
    root, reference, _ = runs
    got = _mean_nll(os.path.join(root, f"scores-{name}-{layout}"))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(reference[name]))
    np.testing.assert_allclose(got, reference[name], rtol=0, atol=ATOL, equal_nan=True)


@pytest.mark.parametrize("name", NAMES)
def test_evaluator_per_instance_losses_equal_transformers(runs, name):
    root, reference, _ = runs
    got = _mean_nll(os.path.join(root, "eval", f"{name}-data"))
    np.testing.assert_allclose(got, reference[name], rtol=0, atol=ATOL, equal_nan=True)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_kd_teacher_log_probabilities_equal_transformers(runs, name, tp):
    root, _, kd_reference = runs
    got = torch.load(os.path.join(root, f"kd-{name}-tp{tp}.pt"))
    assert got.shape == kd_reference[name].shape
    # every entry of the vocabulary, log-probabilities down to about -40: a few fp32 ulps apart
    torch.testing.assert_close(got, kd_reference[name], rtol=1e-6, atol=ATOL)
