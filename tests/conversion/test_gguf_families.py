"""GGUF files of the newer teacher families through tools/convert_checkpoint.py: tiny random
models written as llama.cpp writes them (tiny_gguf, F32), converted, and compared with
transformers' fp32 forward of the HF model they were written from. Where transformers would
read another model than the file holds (Mixtral's experts, Llama 3.1's RoPE factors, missing
tensors), the conversion is refused by name."""

import importlib
import json
import os

import pytest
import torch
import torch.nn.functional as F

import tiny_hf_models as tiny
from tiny_gguf import write_gguf

pytest.importorskip("gguf")
NLL_ATOL = 1e-5  # the mixtures of experts' too, as in test_convert_checkpoint (no routing ties here)
TOOL = importlib.import_module("megatron_miniplm.cli.convert_checkpoint")
# tiny model -> the name llama.cpp would give its GGUF (general.name); Mistral is written as the
# llama architecture, under its own name; the Llama (SmolLM2's layout) has tied embeddings
READABLE = {"qwen3": "Qwen3 Tiny", "qwen3-moe": "Qwen3 MoE Tiny", "mistral": "Mistral Tiny", "llama": "SmolLM Tiny"}


def convert(*args) -> int:
    return TOOL.main([str(a) for a in args])


def token_nll(logits, tokens):
    return F.cross_entropy(logits[:, :-1, : tiny.VOCAB].transpose(1, 2), tokens[:, 1:], reduction="none")


def _megatron_nll(checkpoint, tokens):
    from megatron_miniplm import parallel
    from megatron_miniplm.conversion.session import RENDEZVOUS_ENV, restore_env
    from megatron_miniplm.dist_checkpoint import load_model, load_model_config
    from megatron_miniplm.models.gpt import build_model

    saved = {k: os.environ.get(k) for k in RENDEZVOUS_ENV}
    parallel.initialize(parallel.ParallelConfig(seed=5))
    try:
        config = load_model_config(str(checkpoint))
        model = build_model(config)
        load_model([model], str(checkpoint))
        with torch.no_grad():
            logits = model.eval()(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)
    finally:
        parallel.destroy()
        restore_env(saved)
    return config, token_nll(logits, tokens)


@pytest.mark.parametrize("name", list(READABLE))
def test_gguf_conversion_equals_the_hf_model(tmp_path, name):
    hf = tiny.make_model(name, seed=3)
    write_gguf(hf, str(tmp_path / "model.gguf"), READABLE[name])
    assert convert("--direction", "hf-to-megatron", "--load", tmp_path / "model.gguf", "--save", tmp_path / "meg") == 0
    info = json.loads((tmp_path / "meg" / "checkpoint_info.json").read_text())
    assert info["source_format"] == "gguf" and info["tokenizer"]["eod_id"] == 0
    tokens = tiny.random_tokens()
    with torch.no_grad():
        ref = token_nll(hf(tokens).logits, tokens)
    config, got = _megatron_nll(tmp_path / "meg", tokens)
    # the widths the file states, which transformers' GGUF mapping leaves to the config's defaults
    assert config.head_dim == (16 if name == "llama" else 24)
    assert config.tie_embeddings == (name == "llama")
    if name == "qwen3-moe":
        assert (config.num_experts, config.moe_ffn_hidden_size, config.moe_router_topk) == (4, 32, 2)
    torch.testing.assert_close(got, ref, rtol=0, atol=NLL_ATOL)
    assert ref.std() > 0.1  # per-token values that differ, not a constant


@pytest.mark.parametrize("name,gguf_name,message", [
    ("mixtral", "Mixtral Tiny",
     "a llama-architecture GGUF with 4 experts \\(Mixtral\\): transformers reads no experts"),
    ("llama3.1", "Llama 3.1 Tiny", "RoPE frequency factors \\(rope_freqs.weight, how llama.cpp writes Llama 3.1's"),
])
def test_what_transformers_would_not_read_is_refused_by_name(tmp_path, capsys, name, gguf_name, message):
    write_gguf(tiny.make_model(name), str(tmp_path / "model.gguf"), gguf_name)
    assert convert("--direction", "hf-to-megatron", "--load", tmp_path / "model.gguf", "--save", tmp_path / "meg") == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    from megatron_miniplm.conversion.errors import ConversionError
    from megatron_miniplm.conversion.sources import open_source

    with pytest.raises(ConversionError, match=message):
        open_source(str(tmp_path / "model.gguf")).load_config()
    assert not (tmp_path / "meg").exists()


def test_a_gguf_missing_a_tensor_is_refused(tmp_path, capsys):
    write_gguf(tiny.make_model("qwen3"), str(tmp_path / "model.gguf"), "Qwen3 Tiny", drop=("blk.1.ffn_down.weight",))
    assert convert("--direction", "hf-to-megatron", "--load", tmp_path / "model.gguf", "--save", tmp_path / "meg") == 1
    err = capsys.readouterr().err
    assert "weights missing from the file (transformers would initialise them at random): " \
           "model.layers.1.mlp.down_proj.weight" in err
    assert not (tmp_path / "meg").exists()
