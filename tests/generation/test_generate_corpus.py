"""tools/generate_corpus.py against independent references.

- greedy (temperature 0), fp32: every generated sequence equals transformers' own greedy
  ``generate`` of the same weights from the same prompt (Qwen2 untied GQA with QKV bias,
  Llama tied MHA), prompts of several lengths (instances shorter than the prompt length
  included), stopping at EOD;
- sampled: TP=2, DP=2 and another micro-batch size write the same files as TP=1 (fp32, on a
  CPU); a run SIGKILLed twice and rerun writes the same bytes as an uninterrupted one;
  domains follow their prompt's instance;
- the sampling rule: temperature and top-p against transformers' warpers, by inverting the
  CDF on a grid of uniforms.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conversion import tiny_hf_models as tiny
from corpus import write_dataset
from distributed import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EOD = 0
PROMPT, MAX_LEN = 8, 36
# (architecture, key/value heads, tied, EOD's output row scaled by): the larger EOD row makes
# greedy decoding stop at EOD for some prompts and run to --max-length for others
MODELS = {"qwen2-untied-gqa": ("qwen2", 2, False, 2.0), "llama-tied-mha": ("llama", 4, True, 3.0)}
SAMPLED = ["--temperature", "1.0", "--top-p", "0.9", "--seed", "7"]
SUFFIXES = (".bin", ".idx", ".domains.npy", ".meta.json")


def make_instances(n: int, seed: int = 0) -> list[np.ndarray]:
    """3..40 tokens (some shorter than the prompt), EODs inside some."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x = rng.integers(1, tiny.VOCAB, size=int(rng.integers(3, 41)))
        if i % 4 == 1:
            x[int(rng.integers(0, len(x)))] = EOD
        out.append(x.astype(np.int64))
    return out


def _argv(root: str, model: str, output: str, *extra: str, data: str = "data") -> list[str]:
    return ["--data-path", os.path.join(root, data), "--load", os.path.join(root, f"{model}-meg"),
            "--output-prefix", os.path.join(root, output), "--prompt-length", str(PROMPT),
            "--max-length", str(MAX_LEN), "--micro-batch-size", "3", "--no-progress", "--no-fsync", *extra]


def _generate(argv: list[str]) -> None:
    """The tool's flags and run, without its ``main``, which ends the process group."""
    from megatron_miniplm.cli import generate_corpus
    from megatron_miniplm.generation.config import GenerateConfig
    from megatron_miniplm.generation.generator import generate
    from megatron_miniplm.settings import from_args

    generate(from_args(GenerateConfig, generate_corpus.build_parser().parse_args(argv)))


def _world1(root: str) -> None:
    for model in MODELS:
        _generate(_argv(root, model, f"greedy-{model}-tp1", "--temperature", "0"))
    _generate(_argv(root, "qwen2-untied-gqa", "sampled-tp1", *SAMPLED))
    _generate(_argv(root, "qwen2-untied-gqa", "sampled-mbs5", *SAMPLED, "--micro-batch-size", "5"))
    _generate(_argv(root, "qwen2-untied-gqa", "big-uninterrupted", *SAMPLED, data="big"))


def _world2(root: str) -> None:
    _generate(_argv(root, "llama-tied-mha", "greedy-llama-tied-mha-tp2", "--temperature", "0",
                    "--tensor-model-parallel-size", "2"))
    _generate(_argv(root, "qwen2-untied-gqa", "sampled-tp2", *SAMPLED, "--tensor-model-parallel-size", "2"))
    _generate(_argv(root, "qwen2-untied-gqa", "sampled-dp2", *SAMPLED))


def _save_hf(config, directory: str, seed: int, eod_scale: float):
    model = tiny.make_model(config, seed, vocab_std=0.5)
    with torch.no_grad():
        model.get_output_embeddings().weight[EOD] *= eod_scale
    model.save_pretrained(directory)
    tiny.make_tokenizer().save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megatron_miniplm.cli import convert_checkpoint

    root = str(tmp_path_factory.mktemp("generate_corpus"))
    instances = make_instances(14)
    reference = {}
    for k, (name, (arch, kv, tied, eod_scale)) in enumerate(MODELS.items()):
        model = _save_hf(tiny.variant_config(arch, num_key_value_heads=kv, tie_word_embeddings=tied),
                         os.path.join(root, f"{name}-hf"), k, eod_scale)
        assert convert_checkpoint.main(["--direction", "hf-to-megatron", "--load", os.path.join(root, f"{name}-hf"),
                                        "--save", os.path.join(root, f"{name}-meg"), "--dtype", "fp32"]) == 0
        with torch.no_grad():
            reference[name] = [model.generate(torch.from_numpy(x[:PROMPT])[None], max_length=MAX_LEN, do_sample=False,
                                              eos_token_id=EOD, pad_token_id=EOD)[0].numpy() for x in instances]
    info = json.load(open(os.path.join(root, f"{next(iter(MODELS))}-meg", "checkpoint_info.json")))["tokenizer"]
    tokenizer = {"name": "tiny", "pad_id": EOD, **info}
    write_dataset(os.path.join(root, "data"), instances, tiny.VOCAB, 40, tokenizer=tokenizer,
                  domains=np.arange(len(instances)) % 3)
    write_dataset(os.path.join(root, "big"), make_instances(60, seed=1), tiny.VOCAB, 40, tokenizer=tokenizer)
    run_distributed(_world1, 1, root)
    run_distributed(_world2, 2, root)
    return root, instances, reference


def _read(prefix: str) -> tuple[list[np.ndarray], np.ndarray, dict]:
    from megatron_miniplm.data.indexed_dataset import IndexedDatasetReader

    reader = IndexedDatasetReader(prefix)
    return ([reader[i].astype(np.int64) for i in range(len(reader))], np.load(prefix + ".domains.npy"),
            json.load(open(prefix + ".meta.json")))


def _output_order(instances) -> np.ndarray:
    """The instance each output sequence continues: the plan's order (prompt length, then id)."""
    lengths = np.array([len(x) for x in instances])
    return np.lexsort((np.arange(len(lengths)), np.minimum(lengths, PROMPT)))


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_equals_transformers_generate(runs, name):
    root, instances, reference = runs
    got, _, meta = _read(os.path.join(root, f"greedy-{name}-tp1"))
    order = _output_order(instances)
    assert len(got) == len(instances)
    for j, i in enumerate(order):
        np.testing.assert_array_equal(got[j], reference[name][i], err_msg=f"instance {i}")
    # both ends are exercised: some sequences stop at EOD, some run to --max-length
    assert any(len(s) < MAX_LEN and s[-1] == EOD for s in got) and any(len(s) == MAX_LEN for s in got)
    assert any(len(x) < PROMPT for x in instances)  # and some prompts are shorter than --prompt-length
    assert meta["generation"]["generated_tokens"] == sum(len(s) for s in got) == meta["num_tokens"]


def test_greedy_tp2_equals_transformers_generate(runs):
    root, instances, reference = runs
    got, _, _ = _read(os.path.join(root, "greedy-llama-tied-mha-tp2"))
    for j, i in enumerate(_output_order(instances)):
        np.testing.assert_array_equal(got[j], reference["llama-tied-mha"][i])


def test_domains_follow_the_prompt_instance(runs):
    root, instances, _ = runs
    _, domains, meta = _read(os.path.join(root, "sampled-tp1"))
    np.testing.assert_array_equal(domains, (np.arange(len(instances)) % 3)[_output_order(instances)])
    assert meta["domains"] == ["d0", "d1", "d2"]


def test_samples_continue_their_prompts(runs):
    root, instances, reference = runs
    got, _, _ = _read(os.path.join(root, "sampled-tp1"))
    greedy = reference["qwen2-untied-gqa"]
    order = _output_order(instances)
    for j, i in enumerate(order):
        np.testing.assert_array_equal(got[j][:min(PROMPT, len(instances[i]))], instances[i][:PROMPT])
        assert len(got[j]) == MAX_LEN or got[j][-1] == EOD
        assert EOD not in got[j][min(PROMPT, len(instances[i])):-1]
    assert sum(not np.array_equal(got[j], greedy[i]) for j, i in enumerate(order)) > len(order) // 2


@pytest.mark.parametrize("layout", ["tp2", "dp2", "mbs5"])
def test_layout_does_not_change_the_files(runs, layout):
    root, _, _ = runs
    for suffix in SUFFIXES[:3]:
        with open(os.path.join(root, "sampled-tp1" + suffix), "rb") as a, \
                open(os.path.join(root, f"sampled-{layout}" + suffix), "rb") as b:
            assert a.read() == b.read(), suffix


# --- SIGKILL and resume ----------------------------------------------------------

def _records(output: str) -> int:
    from megatron_miniplm.generation import progress
    from megatron_miniplm.scoring import resume

    return sum(1 for _ in progress.iter_records(resume.shard_files(output + ".progress")))


def _run_until_records(root: str, output: str, at_least: int) -> int:
    cmd = [sys.executable, os.path.join(REPO, "tools", "generate_corpus.py"),
           *_argv(root, "qwen2-untied-gqa", "big-killed", *SAMPLED, data="big")]
    cmd[cmd.index("--micro-batch-size") + 1] = "3"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while _records(output) < at_least:
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not os.path.exists(output + ".meta.json")
    return _records(output)


def test_sigkill_then_rerun_writes_the_same_bytes(runs):
    root, _, _ = runs
    output = os.path.join(root, "big-killed")
    first = _run_until_records(root, output, 2)
    second = _run_until_records(root, output, first + 3)
    assert second > first
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "generate_corpus.py"),
                           *_argv(root, "qwen2-untied-gqa", "big-killed", *SAMPLED, data="big")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" in proc.stderr
    assert "host memory: " in proc.stderr  # a CPU run says what the heap does with freed memory
    for suffix in SUFFIXES:
        with open(os.path.join(root, "big-uninterrupted" + suffix), "rb") as a, open(output + suffix, "rb") as b:
            assert a.read() == b.read(), suffix
    assert not os.path.exists(output + ".progress")


# --- the sampling rule -------------------------------------------------------------

@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8), (1.3, 0.5)])
def test_sampling_inverts_transformers_warped_distribution(temperature, top_p):
    """Sampling at N evenly spaced uniforms gives each token in proportion to its probability
    under transformers' TemperatureLogitsWarper and TopPLogitsWarper (within the 1/N grid)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    from megatron_miniplm.generation.sampling import sample_tokens

    torch.manual_seed(0)
    logits = 2.0 * torch.randn(3, 40)
    warped = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_p < 1:
        warped = TopPLogitsWarper(top_p)(None, warped)
    want = torch.softmax(warped.double(), dim=-1)
    n = 20000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    for row in range(logits.shape[0]):
        tokens = sample_tokens(logits[row].expand(n, -1), u, temperature, top_p)
        got = torch.bincount(tokens, minlength=logits.shape[1]).double() / n
        assert set(torch.nonzero(got).flatten().tolist()) <= set(torch.nonzero(want[row]).flatten().tolist())
        assert float((got - want[row]).abs().max()) <= 1.0 / n + 1e-12


@pytest.mark.parametrize("top_p", [1e-3, 0.3, 0.6])
def test_top_p_keeps_the_tied_tokens_transformers_keeps(top_p):
    """Equal logits across the nucleus cut (frequent with bf16 logits): the same tokens kept
    as transformers' TopPLogitsWarper keeps, each as often."""
    from transformers.generation.logits_process import TopPLogitsWarper

    from megatron_miniplm.generation.sampling import sample_tokens

    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, -1.0], [2.0, 0.0, 2.0, 2.0, 1.0]])
    want = torch.softmax(TopPLogitsWarper(top_p)(None, logits.clone()).double(), dim=-1)
    n = 12000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    for row in range(logits.shape[0]):
        tokens = sample_tokens(logits[row].expand(n, -1), u, 1.0, top_p)
        got = torch.bincount(tokens, minlength=logits.shape[1]).double() / n
        assert torch.equal(got > 0, want[row] > 0), (row, got, want[row])
        assert float((got - want[row]).abs().max()) <= 1.0 / n + 1e-12


def test_greedy_takes_the_first_most_likely_token():
    from megatron_miniplm.generation.sampling import sample_tokens

    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, 0.0, 5.0, 5.0]])
    assert sample_tokens(logits, torch.zeros(2, dtype=torch.float64), 0.0, 1.0).tolist() == [1, 0]


def test_streams_depend_on_seed_and_instance_only():
    from megatron_miniplm.generation.sampling import instance_generators, next_uniforms

    a = next_uniforms(instance_generators(7, [3, 5, 9]))
    b = next_uniforms(instance_generators(7, [9, 3]))
    assert a[2] == b[0] and a[0] == b[1]
    assert len(set(next_uniforms(instance_generators(7, range(50))).tolist())) == 50
    assert next_uniforms(instance_generators(8, [3]))[0] != a[0]


def test_refuses_a_prompt_as_long_as_the_sequence(tmp_path):
    from megatron_miniplm.cli import generate_corpus

    rc = generate_corpus.main(["--data-path", "x", "--load", "y", "--output-prefix", str(tmp_path / "o"),
                               "--prompt-length", "64", "--max-length", "64"])
    assert rc == 1


@pytest.mark.parametrize("cut", [1, 5, 30])
def test_a_torn_record_is_ignored_and_truncated_before_appending(tmp_path, cut):
    from megatron_miniplm.generation import progress

    path = str(tmp_path / "shard-00000.bin")
    writer = progress.RecordWriter(path, fsync=False)
    writer.append(0, [np.array([1, 2, 3]), np.array([4])])
    writer.append(1, [np.array([5, 6, 7, 8, 9, 10, 11])])
    writer.close()
    with open(path, "r+b") as f:  # a kill in the middle of the second record
        f.truncate(os.path.getsize(path) - cut)
    assert [k for k, _ in progress.iter_records([path])] == [0]
    writer = progress.RecordWriter(path, fsync=False)
    writer.append(2, [np.array([12, 13])])
    writer.close()
    records = list(progress.iter_records([path]))
    assert [k for k, _ in records] == [0, 2]
    assert [s.tolist() for s in records[0][1]] == [[1, 2, 3], [4]] and records[1][1][0].tolist() == [12, 13]
    where = progress.record_offsets([path])
    assert progress.read_record(*where[2])[0].tolist() == [12, 13]


def _window_worker(root: str) -> None:
    from megatron_miniplm.scoring.dataset import ScoringError

    with pytest.raises(ScoringError, match=f"--max-length {MAX_LEN}: sequence length {MAX_LEN - 1} exceeds the "
                                           f"16-token sliding attention window"):
        _generate(_argv(root, "mistral", "too-long", "--temperature", "0"))
    _generate(_argv(root, "mistral", "fits", "--temperature", "0", "--max-length", "17"))


def test_refuses_contexts_longer_than_the_attention_window(tmp_path):
    """The decoder computes plain causal attention: a teacher's window must hold every context it
    decodes from (the last token of --max-length tokens is predicted from the ones before it)."""
    from megatron_miniplm.cli import convert_checkpoint

    root = str(tmp_path)
    hf = os.path.join(root, "mistral-hf")
    _save_hf(tiny.variant_config("mistral", num_key_value_heads=2, tie_word_embeddings=False, sliding_window=16),
             hf, 0, 1.0)
    assert convert_checkpoint.main(["--direction", "hf-to-megatron", "--load", hf,
                                    "--save", os.path.join(root, "mistral-meg")]) == 0
    info = json.load(open(os.path.join(root, "mistral-meg", "checkpoint_info.json")))["tokenizer"]
    write_dataset(os.path.join(root, "data"), make_instances(4), tiny.VOCAB, 40,
                  tokenizer={"name": "tiny", "pad_id": EOD, **info})
    run_distributed(_window_worker, 1, root)
