"""Tensor and config mapping between HF and megatron, without building models."""

import pytest
import torch

from megatron_miniplm.conversion import mapping
from megatron_miniplm.conversion.errors import ConversionError
from megatron_miniplm.conversion.hf_config import (
    hf_config_from_model_config, layout_of, model_config_from_hf,
)
from presets import get_preset


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (9, 3), (8, 1)])
def test_fuse_then_split_is_identity(heads, groups):
    head_dim, hidden = 8, 16
    g = torch.Generator().manual_seed(0)
    q = torch.randn(heads * head_dim, hidden, generator=g)
    k = torch.randn(groups * head_dim, hidden, generator=g)
    v = torch.randn(groups * head_dim, hidden, generator=g)
    fused = mapping.fuse_qkv(q, k, v, heads, groups)
    assert fused.shape == ((heads + 2 * groups) * head_dim, hidden)
    for a, b in zip(mapping.split_qkv(fused, heads, groups), (q, k, v)):
        assert torch.equal(a, b)
    # biases are 1-D and follow the same order
    qb, kb, vb = q[:, 0].contiguous(), k[:, 0].contiguous(), v[:, 0].contiguous()
    assert torch.equal(mapping.fuse_qkv(qb, kb, vb, heads, groups), fused[:, 0])


def test_fused_rows_are_grouped_per_key_value_head():
    """Group j holds its query heads, then key head j, then value head j."""
    heads, groups, head_dim = 4, 2, 3
    q = torch.arange(heads).repeat_interleave(head_dim).float()[:, None]  # row value = q head index
    k = 100 + torch.arange(groups).repeat_interleave(head_dim).float()[:, None]
    v = 200 + torch.arange(groups).repeat_interleave(head_dim).float()[:, None]
    fused = mapping.fuse_qkv(q, k, v, heads, groups)[:, 0].reshape(-1, head_dim)[:, 0].tolist()
    assert fused == [0, 1, 100, 200, 2, 3, 101, 201]


def test_pad_vocab_zero_rows():
    w = torch.randn(300, 8)
    padded = mapping.pad_vocab(w, 384)
    assert padded.shape == (384, 8)
    assert torch.equal(padded[:300], w) and not padded[300:].any()
    with pytest.raises(ConversionError):
        mapping.pad_vocab(w, 256)


def _random_megatron_state(config, seed=0):
    """Whole-model megatron tensors of the right shapes, zero padding rows."""
    g = torch.Generator().manual_seed(seed)
    meg = {}
    h, f = config.hidden_size, config.ffn_hidden_size
    qkv_rows = (config.num_attention_heads + 2 * config.kv_heads) * config.head_dim
    padded = config.padded_vocab_size()
    emb = torch.randn(padded, h, generator=g)
    emb[config.vocab_size:] = 0
    meg["embedding.word_embeddings.weight"] = emb
    for i in range(config.num_layers):
        p = f"decoder.layers.{i}."
        meg[p + "input_layernorm.weight"] = torch.randn(h, generator=g)
        meg[p + "self_attention.linear_qkv.weight"] = torch.randn(qkv_rows, h, generator=g)
        if config.qkv_bias:
            meg[p + "self_attention.linear_qkv.bias"] = torch.randn(qkv_rows, generator=g)
        meg[p + "self_attention.linear_proj.weight"] = torch.randn(h, h, generator=g)
        meg[p + "pre_mlp_layernorm.weight"] = torch.randn(h, generator=g)
        meg[p + "mlp.linear_fc1.weight"] = torch.randn(2 * f, h, generator=g)
        meg[p + "mlp.linear_fc2.weight"] = torch.randn(h, f, generator=g)
    meg["decoder.final_layernorm.weight"] = torch.randn(h, generator=g)
    if not config.tie_embeddings:
        out = torch.randn(padded, h, generator=g)
        out[config.vocab_size:] = 0
        meg["output_layer.weight"] = out
    return meg


@pytest.mark.parametrize("preset,layout", [("tiny", "qwen2"), ("tiny-gqa", "llama"), ("tiny-untied", "qwen2")])
def test_state_dict_round_trip(preset, layout):
    config = get_preset(preset).replace(vocab_size=300)
    meg = _random_megatron_state(config)
    hf = mapping.megatron_to_hf(dict(meg), config, layout)
    assert hf["model.embed_tokens.weight"].shape[0] == 300
    assert ("lm_head.weight" in hf) == (not config.tie_embeddings)
    back = dict(mapping.hf_to_megatron(dict(hf), config))
    assert back.keys() == meg.keys()
    for key in meg:
        assert torch.equal(back[key], meg[key]), key


def test_export_adds_zero_biases_where_the_layout_requires_them():
    config = get_preset("tiny-gqa")  # no QKV bias
    hf = mapping.megatron_to_hf(_random_megatron_state(config), config, "qwen2")
    assert not hf["model.layers.0.self_attn.q_proj.bias"].any()
    config = get_preset("tiny")  # QKV bias, exported as Llama: o_proj gets a (zero) bias too
    hf = mapping.megatron_to_hf(_random_megatron_state(config), config, "llama")
    assert hf["model.layers.0.self_attn.k_proj.bias"].any()
    assert not hf["model.layers.0.self_attn.o_proj.bias"].any()


def test_unmapped_and_missing_hf_tensors_are_errors():
    config = get_preset("tiny-gqa")
    hf = mapping.megatron_to_hf(_random_megatron_state(config), config, "llama")
    extra = dict(hf, **{"model.layers.0.self_attn.o_proj.bias": torch.zeros(64)})
    with pytest.raises(ConversionError, match="o_proj.bias"):
        list(mapping.hf_to_megatron(extra, config))
    missing = dict(hf)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ConversionError, match="up_proj"):
        list(mapping.hf_to_megatron(missing, config))


# --- configs -----------------------------------------------------------------

def test_config_round_trip_through_hf():
    for preset, layout in [("qwen1.5-1.8B", "qwen2"), ("smollm2-135M", "llama")]:
        config = get_preset(preset)
        hf = hf_config_from_model_config(config, layout, eod_id=0)
        assert layout_of(hf) == layout
        back = model_config_from_hf(hf, config.name)
        same = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "kv_heads",
                "vocab_size", "max_position_embeddings", "rotary_base", "norm_epsilon", "qkv_bias",
                "tie_embeddings")
        for field in same:
            assert getattr(back, field) == getattr(config, field), (preset, field)


def test_unsupported_configs_are_refused():
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    with pytest.raises(ConversionError, match="unsupported architecture GPT2LMHeadModel"):
        layout_of(GPT2Config(architectures=["GPT2LMHeadModel"]))
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    cases = [
        (LlamaConfig(attention_bias=True, **small), "output projection"),
        (LlamaConfig(hidden_act="gelu", **small), "activation"),
        (LlamaConfig(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}, **small), "RoPE scaling"),
        (Qwen2Config(hidden_act="gelu", **small), "activation"),
    ]
    for config, message in cases:
        with pytest.raises(ConversionError, match=message):
            model_config_from_hf(config, "x")
