"""tools/convert_checkpoint.py on tiny random models of every supported family made with transformers
(Qwen1.5/2, Llama, Qwen3, Llama 3.1/3.2, Mistral, Qwen3-MoE, Mixtral: tiny_hf_models.MODELS).

- the megatron model's logits equal HF's (fp32, 1e-4) at TP=1 and TP=2, its per-token
  NLLs within 1e-5 (the mixtures of experts' also at EP=2, each rank with its own
  sequence), and its per-token losses at PP=2;
- HF -> megatron -> HF gives identical tensors, also from a checkpoint re-saved at TP=2;
- the checkpoint directory carries model_config.json, tokenizer/ and checkpoint_info.json;
- unsupported architectures, missing files and bad parallel sizes are clear errors.
"""

import importlib
import json
import os

import pytest
import torch
import torch.nn.functional as F

import tiny_hf_models as tiny
from distributed import run_distributed

ATOL = 1e-4
NLL_ATOL = 1e-5
TOOL = importlib.import_module("megatron_miniplm.cli.convert_checkpoint")


def convert(*args) -> int:
    return TOOL.main([str(a) for a in args])


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def hf_token_nll(model, tokens, padded_vocab=None):
    """Per-token NLL; with ``padded_vocab``, over logits padded with zeros the way
    megatron's padded output rows (zero weights) produce them."""
    logits = hf_logits(model, tokens[:, :-1])
    if padded_vocab is not None:
        logits = F.pad(logits, (0, padded_vocab - logits.shape[-1]))
    return F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")


# --- multi-process workers (module level: spawned processes import them) -----

def _parallel_worker(root: str, names: list):
    from megatron.core import parallel_state as ps

    from megatron_miniplm import parallel
    from megatron_miniplm.dist_checkpoint import load_model, load_model_config, save_model
    from megatron_miniplm.models.gpt import build_model
    from megatron_miniplm.training.engine import forward_losses

    tokens = torch.load(os.path.join(root, "tokens.pt"))
    parallel.initialize(parallel.ParallelConfig(tensor_model_parallel_size=2))
    rank = torch.distributed.get_rank()
    for name in names:
        config = load_model_config(os.path.join(root, f"{name}-meg"))
        model = build_model(config)
        load_model([model], os.path.join(root, f"{name}-meg"))
        model.eval()  # scoring's mode (megatron-core's MoE layers refuse TP without SP in training mode)
        with torch.no_grad():
            local = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)
        shards = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
        torch.distributed.all_gather(shards, local.contiguous(), group=ps.get_tensor_model_parallel_group())
        if rank == 0:
            torch.save(torch.cat(shards, dim=-1), os.path.join(root, f"{name}-tp2-logits.pt"))
        resaved = os.path.join(root, f"{name}-meg-tp2")
        os.makedirs(resaved, exist_ok=True)
        save_model([model], resaved, config)

    parallel.initialize(parallel.ParallelConfig(pipeline_model_parallel_size=2))
    batch = {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
             "position_ids": torch.arange(tokens.shape[1] - 1).expand(tokens.shape[0], -1).contiguous()}
    for name in names:
        config = load_model_config(os.path.join(root, f"{name}-meg"))
        model = build_model(config)
        load_model([model], os.path.join(root, f"{name}-meg"))
        losses = forward_losses([model], iter([batch]), num_microbatches=1,
                                micro_batch_size=tokens.shape[0], seq_length=tokens.shape[1] - 1)
        if ps.is_pipeline_last_stage():
            torch.save(losses[0], os.path.join(root, f"{name}-pp2-losses.pt"))

    # EP=2: each rank holds half of every layer's experts and runs its own sequence, of its own
    # length, through them (megatron-core's all-to-all dispatcher exchanges the tokens)
    parallel.initialize(parallel.ParallelConfig(expert_model_parallel_size=2))
    row, length = EP2_INPUTS[rank]
    mine = tokens[row: row + 1, :length]
    for name in MOE_NAMES:
        model, _ = load_megatron(os.path.join(root, f"{name}-meg"))
        assert len(model.decoder.layers[0].mlp.experts.local_experts) == 2  # of the 4
        torch.save(megatron_logits(model, mine), os.path.join(root, f"{name}-ep2-logits-{rank}.pt"))


# --- fixtures ------------------------------------------------------------------

NAMES = list(tiny.MODELS)
MOE_NAMES = ["qwen3-moe", "mixtral"]
EP2_INPUTS = [(0, 96), (1, 72)]  # (row of tokens.pt, length) each EP rank scores


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each tiny model as HF dir, converted to megatron, and exported back."""
    root = tmp_path_factory.mktemp("convert")
    models = {}
    for name in NAMES:
        models[name] = tiny.save_hf(name, root / f"{name}-hf", seed=NAMES.index(name))
        assert convert("--direction", "hf-to-megatron", "--load", root / f"{name}-hf",
                       "--save", root / f"{name}-meg", "--tensor-model-parallel-size", 2) == 0
        assert convert("--direction", "megatron-to-hf", "--load", root / f"{name}-meg",
                       "--save", root / f"{name}-rt") == 0
    torch.save(tiny.random_tokens(), root / "tokens.pt")
    return root, models


@pytest.fixture(scope="module")
def parallel_runs(converted):
    root, _ = converted
    run_distributed(_parallel_worker, 2, str(root), NAMES)
    return root


@pytest.fixture(scope="module")
def world_of_one():
    """An in-process world of one, torn down after the module: later tests that
    start subprocesses must not inherit a live rendezvous port."""
    from megatron_miniplm import parallel
    from megatron_miniplm.conversion.session import RENDEZVOUS_ENV, restore_env

    saved = {k: os.environ.get(k) for k in RENDEZVOUS_ENV}
    parallel.initialize(parallel.ParallelConfig(seed=5))
    yield
    parallel.destroy()
    restore_env(saved)


def load_megatron(directory, dtype=torch.float32):
    from megatron_miniplm.dist_checkpoint import load_model, load_model_config
    from megatron_miniplm.models.gpt import build_model

    config = load_model_config(str(directory))
    model = build_model(config, params_dtype=dtype)
    load_model([model], str(directory))
    return model.eval(), config


def megatron_logits(model, tokens):
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)


# --- logits --------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_logits_match_at_tp1(converted, world_of_one, name):
    root, models = converted
    model, config = load_megatron(root / f"{name}-meg")
    tokens = torch.load(root / "tokens.pt")
    ref = hf_logits(models[name], tokens)
    got = megatron_logits(model, tokens)
    assert got.shape[-1] == config.padded_vocab_size() > tiny.VOCAB
    torch.testing.assert_close(got[..., : tiny.VOCAB], ref, rtol=0, atol=ATOL)
    assert ref.abs().max() > 0.5  # the comparison is not between near-zero logits


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_at_tp2(converted, parallel_runs, name):
    root, models = converted
    ref = hf_logits(models[name], torch.load(root / "tokens.pt"))
    got = torch.load(parallel_runs / f"{name}-tp2-logits.pt")
    torch.testing.assert_close(got[..., : tiny.VOCAB], ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", NAMES)
def test_per_token_losses_match_at_pp2(converted, parallel_runs, name):
    """megatron's fused loss runs over the padded vocabulary, whose logits are 0
    (not -inf): the reference pads HF's logits the same way."""
    root, models = converted
    tokens = torch.load(root / "tokens.pt")
    got = torch.load(parallel_runs / f"{name}-pp2-losses.pt")
    ref = hf_token_nll(models[name], tokens, padded_vocab=384)
    torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)
    assert (got - hf_token_nll(models[name], tokens)).abs().min() > 1e-3  # the padding does count


def token_nll(logits, tokens):
    """Per-token NLL of the next token over the true vocabulary."""
    return F.cross_entropy(logits[:, :-1, : tiny.VOCAB].transpose(1, 2), tokens[:, 1:], reduction="none")


@pytest.mark.parametrize("name", NAMES)
def test_per_token_nll_matches_at_tp1_and_tp2(converted, parallel_runs, world_of_one, name):
    root, models = converted
    tokens = torch.load(root / "tokens.pt")
    ref = token_nll(hf_logits(models[name], tokens), tokens)
    model, _ = load_megatron(root / f"{name}-meg")
    torch.testing.assert_close(token_nll(megatron_logits(model, tokens), tokens), ref, rtol=0, atol=NLL_ATOL)
    tp2 = torch.load(parallel_runs / f"{name}-tp2-logits.pt")
    torch.testing.assert_close(token_nll(tp2, tokens), ref, rtol=0, atol=NLL_ATOL)


@pytest.mark.parametrize("name", MOE_NAMES)
def test_per_token_nll_matches_at_ep2(converted, parallel_runs, name):
    """The experts split over 2 ranks (loaded from the TP=2 checkpoint), each rank with its own
    sequence: every rank's NLLs equal transformers' on that sequence."""
    root, models = converted
    tokens = torch.load(root / "tokens.pt")
    for rank, (row, length) in enumerate(EP2_INPUTS):
        mine = tokens[row: row + 1, :length]
        got = torch.load(parallel_runs / f"{name}-ep2-logits-{rank}.pt")
        torch.testing.assert_close(token_nll(got, mine), token_nll(hf_logits(models[name], mine), mine),
                                   rtol=0, atol=NLL_ATOL)


def test_a_wrong_mapping_would_be_caught(converted, world_of_one):
    """Swapping two layers' attention weights must break the match the tests rely on."""
    root, models = converted
    model, _ = load_megatron(root / "llama-meg")
    with torch.no_grad():
        a = model.decoder.layers[0].self_attention.linear_qkv.weight
        b = model.decoder.layers[1].self_attention.linear_qkv.weight
        tmp = a.clone()
        a.copy_(b)
        b.copy_(tmp)
    tokens = torch.load(root / "tokens.pt")
    diff = (megatron_logits(model, tokens)[..., : tiny.VOCAB] - hf_logits(models["llama"], tokens)).abs().max()
    assert diff > 100 * ATOL


# --- round trip ----------------------------------------------------------------

def _safetensors(directory):
    from safetensors.torch import load_file

    return load_file(os.path.join(directory, "model.safetensors"))


def assert_same_tensors(got_dir, want_dir):
    got, want = _safetensors(got_dir), _safetensors(want_dir)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("name", NAMES)
def test_hf_megatron_hf_gives_identical_tensors(converted, name):
    root, _ = converted
    assert_same_tensors(root / f"{name}-rt", root / f"{name}-hf")


@pytest.mark.parametrize("name", NAMES)
def test_export_from_a_tp2_checkpoint(converted, parallel_runs, world_of_one, name):
    root, _ = converted
    out = root / f"{name}-rt-from-tp2"
    assert convert("--direction", "megatron-to-hf", "--load", parallel_runs / f"{name}-meg-tp2",
                   "--save", out, "--tokenizer", root / f"{name}-hf") == 0
    assert_same_tensors(out, root / f"{name}-hf")


@pytest.mark.parametrize("name", NAMES)
def test_exported_directory_loads_in_transformers(converted, name):
    from transformers import AutoConfig, AutoModelForCausalLM

    root, models = converted
    out = root / f"{name}-rt"
    config = AutoConfig.from_pretrained(out)
    want = models[name].config
    assert config.architectures == want.architectures
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "tie_word_embeddings", "rms_norm_eps"):
        assert getattr(config, field) == getattr(want, field), field
    assert config.rope_parameters == want.rope_parameters  # Llama 3's scaling with it
    assert getattr(config, "sliding_window", None) == getattr(want, "sliding_window", None)

    def head_width(c):
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    assert head_width(config) == head_width(want)
    assert config.eos_token_id == 0  # the tokenizer's <|endoftext|>
    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    tokens = torch.load(root / "tokens.pt")
    assert torch.equal(hf_logits(model, tokens), hf_logits(models[name], tokens))
    with open(out / "tokenizer.json", "rb") as a, open(root / f"{name}-hf" / "tokenizer.json", "rb") as b:
        assert a.read() == b.read()


# --- checkpoint directory contract ---------------------------------------------

def test_checkpoint_directory_contract(converted):
    from megatron_miniplm.data.tokenizer import file_sha256

    root, _ = converted
    ckpt = root / "qwen2-meg"
    info = json.loads((ckpt / "checkpoint_info.json").read_text())
    assert info["format_version"] == 1
    assert info["architecture"] == "Qwen2ForCausalLM" and info["dtype"] == "fp32"
    assert info["source"] == str(root / "qwen2-hf") and info["source_format"] == "hf"
    assert info["parallel"] == {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1}
    tok = info["tokenizer"]
    assert tok["path"] == "tokenizer/tokenizer.json"
    assert tok["sha256"] == file_sha256(str(root / "qwen2-hf" / "tokenizer.json"))
    assert tok["sha256"] == file_sha256(str(ckpt / tok["path"]))
    assert (tok["vocab_size"], tok["eod_id"], tok["eod_token"]) == (tiny.VOCAB, 0, tiny.EOD)
    config = json.loads((ckpt / "model_config.json").read_text())
    assert config["vocab_size"] == tiny.VOCAB and config["qkv_bias"] and config["tie_embeddings"]
    assert config["num_query_groups"] == 2
    assert not [p for p in os.listdir(root) if p.startswith(".")], "temporary directories left behind"


def test_bf16_checkpoint(converted, world_of_one):
    root, models = converted
    out = root / "llama-meg-bf16"
    assert convert("--direction", "hf-to-megatron", "--load", root / "llama-hf", "--save", out,
                   "--dtype", "bf16") == 0
    assert json.loads((out / "checkpoint_info.json").read_text())["dtype"] == "bf16"
    model, config = load_megatron(out)  # a bf16 checkpoint loads into an fp32 model
    want = models["llama"].model.embed_tokens.weight.to(torch.bfloat16).float()
    got = model.embedding.word_embeddings.weight[: config.vocab_size]
    assert torch.equal(got, want)
    hf_out = root / "llama-rt-bf16"
    assert convert("--direction", "megatron-to-hf", "--load", out, "--save", hf_out, "--dtype", "bf16") == 0
    tensors = _safetensors(hf_out)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert torch.equal(tensors["model.embed_tokens.weight"].float(), want)


# --- errors --------------------------------------------------------------------

def _error(capsys, *args) -> str:
    assert convert(*args) == 1
    return capsys.readouterr().err


def test_error_unsupported_architecture(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    err = _error(capsys, "--direction", "hf-to-megatron", "--load", tmp_path / "gpt2", "--save", tmp_path / "out")
    assert "unsupported architecture GPT2LMHeadModel" in err and "Qwen2ForCausalLM" in err
    assert not (tmp_path / "out").exists()


def test_error_missing_files(tmp_path, capsys):
    err = _error(capsys, "--direction", "hf-to-megatron", "--load", tmp_path / "nope", "--save", tmp_path / "o")
    assert "no such file or directory" in err
    (tmp_path / "empty").mkdir()
    err = _error(capsys, "--direction", "hf-to-megatron", "--load", tmp_path / "empty", "--save", tmp_path / "o")
    assert "neither a HF model directory" in err
    err = _error(capsys, "--direction", "megatron-to-hf", "--load", tmp_path / "empty", "--save", tmp_path / "o")
    assert "not a megatron checkpoint" in err


def test_error_parallel_sizes_that_do_not_divide(converted, tmp_path, capsys):
    root, _ = converted
    err = _error(capsys, "--direction", "hf-to-megatron", "--load", root / "llama-hf", "--save", tmp_path / "o",
                 "--tensor-model-parallel-size", 3)
    assert "tensor-model-parallel-size 3 does not divide the 4 attention heads" in err
    err = _error(capsys, "--direction", "hf-to-megatron", "--load", root / "qwen1.5-hf", "--save", tmp_path / "o",
                 "--pipeline-model-parallel-size", 3)
    assert "pipeline-model-parallel-size 3 does not divide the 2 layers" in err
    assert not (tmp_path / "o").exists()


def test_error_existing_output_and_failed_conversion_leaves_nothing(converted, tmp_path, capsys):
    root, _ = converted
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    err = _error(capsys, "--direction", "hf-to-megatron", "--load", root / "llama-hf", "--save", tmp_path / "full")
    assert "not empty" in err and (tmp_path / "full" / "x").read_text() == "keep"
    # A tokenizer without an end-of-document token fails mid-conversion: no output, no temp dirs.
    src = tmp_path / "no-eod"
    tiny.make_model("llama").save_pretrained(src)
    tok = json.loads((root / "llama-hf" / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["plain"] = vocab.pop(tiny.EOD)
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != tiny.EOD]
    (src / "tokenizer.json").write_text(json.dumps(tok))
    err = _error(capsys, "--direction", "hf-to-megatron", "--load", src, "--save", tmp_path / "o")
    assert "end-of-document" in err
    assert sorted(os.listdir(tmp_path)) == ["full", "no-eod"]


def test_a_full_disk_stops_the_export_and_the_rerun_completes_it(converted, tmp_path, capsys, monkeypatch):
    """The weights file does not fit: one line naming it and the bytes it needs; no output, no
    temporary directory; with space again, the export is the one made before."""
    import errno

    import safetensors.torch

    root, _ = converted
    real = safetensors.torch.save_file

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)  # what fitted
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "hf"
    err = _error(capsys, "--direction", "megatron-to-hf", "--load", root / "llama-meg", "--save", out)
    lines = err.strip().splitlines()
    size = sum(t.numel() * t.element_size() for t in safetensors.torch.load_file(root / "llama-rt" / "model.safetensors").values())
    assert len(lines) == 1 and f"{out / 'model.safetensors'}: no space left on the device ({size:,} bytes needed" in lines[0], err
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert convert("--direction", "megatron-to-hf", "--load", root / "llama-meg", "--save", out) == 0
    assert_same_tensors(out, root / "llama-rt")
