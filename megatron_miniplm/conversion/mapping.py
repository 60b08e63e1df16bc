"""Tensor mapping between HF (Qwen2 / Llama / Qwen3 / Mistral) and megatron-core GPT state dicts.

Both sides are whole (TP=1) tensors: megatron's dist checkpoint reshards them
to any TP/PP on load, so the mapping never deals with parallel slices.

Megatron's fused layouts (checked against a built ``GPTModel``):

- ``linear_qkv`` rows are grouped per key/value group: for each of the G
  groups, its H/G query heads, then its key head, then its value head, each
  ``head_dim`` rows. The bias (Qwen) follows the same order.
- ``linear_fc1`` is ``[gate; up]`` (SwiGLU), ``linear_fc2`` is ``down``. A mixture of
  experts has ``mlp.router`` (HF's ``mlp.gate``) and ``mlp.experts.local_experts.E.linear_fc1/2``,
  one per expert: a transformers 5 model holds them stacked, ``experts.gate_up_proj``
  ``[E, 2 x inner, hidden]`` (gate rows first) and ``experts.down_proj`` ``[E, hidden, inner]``;
  the published checkpoints (and the export) one by one (``EXPERT_NAMES``).
- The RMSNorm before attention is ``input_layernorm``, before the MLP
  ``pre_mlp_layernorm`` (local spec; the checkpoint maps them to the
  Transformer Engine names, so either spec loads it). Qwen3's per-head
  ``q_norm`` / ``k_norm`` are ``q_layernorm`` / ``k_layernorm``.
- Embedding and output rows are padded to ``padded_vocab_size()``; the pad
  rows are zero and are dropped on export.
"""

from __future__ import annotations

from typing import Iterator, MutableMapping

import torch

from megatron_miniplm.conversion.errors import ConversionError
from megatron_miniplm.models.config import ModelConfig

QWEN2 = "qwen2"
LLAMA = "llama"
QWEN3 = "qwen3"
MISTRAL = "mistral"
QWEN3_MOE = "qwen3_moe"
MIXTRAL = "mixtral"
LAYOUTS = (QWEN2, LLAMA, QWEN3, MISTRAL, QWEN3_MOE, MIXTRAL)


# --- fused QKV ---------------------------------------------------------------

def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """HF's separate q/k/v projections (weights ``[out, in]`` or biases ``[out]``) -> megatron's fused rows."""
    head_dim = q.shape[0] // heads
    rest = q.shape[1:]
    q = q.reshape(groups, heads // groups, head_dim, *rest)
    k = k.reshape(groups, 1, head_dim, *rest)
    v = v.reshape(groups, 1, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, heads: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``fuse_qkv``."""
    per_group = heads // groups + 2
    head_dim = qkv.shape[0] // (groups * per_group)
    rest = qkv.shape[1:]
    grouped = qkv.reshape(groups, per_group, head_dim, *rest)
    q = grouped[:, : heads // groups].reshape(heads * head_dim, *rest)
    k = grouped[:, -2].reshape(groups * head_dim, *rest)
    v = grouped[:, -1].reshape(groups * head_dim, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


# --- vocabulary padding ------------------------------------------------------

def pad_vocab(weight: torch.Tensor, padded_size: int) -> torch.Tensor:
    if weight.shape[0] == padded_size:  # Qwen's 151,936 and SmolLM's 49,152 need no padding
        return weight
    if weight.shape[0] > padded_size:
        raise ConversionError(f"vocabulary of {weight.shape[0]} rows exceeds the padded size {padded_size}")
    out = weight.new_zeros((padded_size, *weight.shape[1:]))
    out[: weight.shape[0]] = weight
    return out


# --- whole state dicts -------------------------------------------------------

def _hf_layer(i: int) -> str:
    return f"model.layers.{i}."


def _meg_layer(i: int) -> str:
    return f"decoder.layers.{i}."


def hf_to_megatron(hf: MutableMapping[str, torch.Tensor], config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield megatron (key, tensor) pairs, popping the HF tensors as they are used.

    Popping keeps peak memory at about one layer above the two models; any HF
    tensor left over at the end (an o_proj bias, an MLP bias...) is a feature
    the megatron model does not have, and is an error rather than silently dropped.
    """
    def take(key: str) -> torch.Tensor:
        try:
            return hf.pop(key)
        except KeyError:
            raise ConversionError(f"HF state dict has no tensor '{key}'") from None

    heads, groups = config.num_attention_heads, config.kv_heads
    padded = config.padded_vocab_size()
    yield "embedding.word_embeddings.weight", pad_vocab(take("model.embed_tokens.weight"), padded)
    for i in range(config.num_layers):
        h, m = _hf_layer(i), _meg_layer(i)
        yield m + "input_layernorm.weight", take(h + "input_layernorm.weight")
        yield m + "self_attention.linear_qkv.weight", fuse_qkv(
            take(h + "self_attn.q_proj.weight"), take(h + "self_attn.k_proj.weight"),
            take(h + "self_attn.v_proj.weight"), heads, groups)
        if config.qkv_bias:
            yield m + "self_attention.linear_qkv.bias", fuse_qkv(
                take(h + "self_attn.q_proj.bias"), take(h + "self_attn.k_proj.bias"),
                take(h + "self_attn.v_proj.bias"), heads, groups)
        if config.qk_layernorm:
            yield m + "self_attention.q_layernorm.weight", take(h + "self_attn.q_norm.weight")
            yield m + "self_attention.k_layernorm.weight", take(h + "self_attn.k_norm.weight")
        yield m + "self_attention.linear_proj.weight", take(h + "self_attn.o_proj.weight")
        yield m + "pre_mlp_layernorm.weight", take(h + "post_attention_layernorm.weight")
        yield from _mlp_to_megatron(take, h, m, config)
    yield "decoder.final_layernorm.weight", take("model.norm.weight")
    if config.tie_embeddings:
        hf.pop("lm_head.weight", None)  # the same tensor as the embedding
    else:
        yield "output_layer.weight", pad_vocab(take("lm_head.weight"), padded)
    if hf:
        raise ConversionError(
            f"HF tensors with no megatron counterpart (unsupported model features): {sorted(hf)[:8]}"
        )


def _mlp_to_megatron(take, h: str, m: str, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """One layer's dense SwiGLU MLP, or its router and experts."""
    if not config.num_experts:
        yield m + "mlp.linear_fc1.weight", torch.cat(
            [take(h + "mlp.gate_proj.weight"), take(h + "mlp.up_proj.weight")], dim=0)
        yield m + "mlp.linear_fc2.weight", take(h + "mlp.down_proj.weight")
        return
    yield m + "mlp.router.weight", take(h + "mlp.gate.weight")
    gate_up, down = take(h + "mlp.experts.gate_up_proj"), take(h + "mlp.experts.down_proj")
    for e in range(config.num_experts):
        yield m + f"mlp.experts.local_experts.{e}.linear_fc1.weight", gate_up[e].contiguous()
        yield m + f"mlp.experts.local_experts.{e}.linear_fc2.weight", down[e].contiguous()


# Per-expert names of the published checkpoints (what transformers' save_pretrained writes and
# every reader of those models expects): the MoE block, then gate, up and down of expert E.
EXPERT_NAMES = {QWEN3_MOE: ("mlp", "gate_proj", "up_proj", "down_proj"),
                MIXTRAL: ("block_sparse_moe", "w1", "w3", "w2")}


def _mlp_to_hf(take, m: str, h: str, config: ModelConfig, layout: str) -> dict[str, torch.Tensor]:
    """Inverse of ``_mlp_to_megatron``, experts written one by one as the published checkpoints hold them."""
    if not config.num_experts:
        gate, up = take(m + "mlp.linear_fc1.weight").chunk(2, dim=0)
        return {h + "mlp.gate_proj.weight": gate.contiguous(), h + "mlp.up_proj.weight": up.contiguous(),
                h + "mlp.down_proj.weight": take(m + "mlp.linear_fc2.weight")}
    if layout not in EXPERT_NAMES:
        raise ConversionError(f"HF layout '{layout}' has no experts")
    block, gate_name, up_name, down_name = EXPERT_NAMES[layout]
    out = {h + f"{block}.gate.weight": take(m + "mlp.router.weight")}
    for e in range(config.num_experts):
        expert = f"{h}{block}.experts.{e}."
        gate, up = take(m + f"mlp.experts.local_experts.{e}.linear_fc1.weight").chunk(2, dim=0)
        out[expert + f"{gate_name}.weight"], out[expert + f"{up_name}.weight"] = gate.contiguous(), up.contiguous()
        out[expert + f"{down_name}.weight"] = take(m + f"mlp.experts.local_experts.{e}.linear_fc2.weight")
    return out


def megatron_to_hf(meg: MutableMapping[str, torch.Tensor], config: ModelConfig, layout: str) -> dict[str, torch.Tensor]:
    """HF state dict (names of ``layout``) of a whole megatron model, padding rows dropped.

    A Qwen2 layout always has q/k/v biases and a Llama or Qwen3 layout with biases
    also has one on o_proj: where the megatron model has none, zeros are written,
    which leaves the function unchanged.
    """
    if layout not in LAYOUTS:
        raise ConversionError(f"unknown HF layout '{layout}' ({', '.join(LAYOUTS)})")
    meg = {k: v for k, v in meg.items() if torch.is_tensor(v)}  # drop _extra_state

    def take(key: str) -> torch.Tensor:
        try:
            return meg.pop(key)
        except KeyError:
            raise ConversionError(f"megatron state dict has no tensor '{key}'") from None

    heads, groups, vocab = config.num_attention_heads, config.kv_heads, config.vocab_size
    hf_bias = layout == QWEN2 or config.qkv_bias
    out: dict[str, torch.Tensor] = {}
    out["model.embed_tokens.weight"] = take("embedding.word_embeddings.weight")[:vocab].contiguous()
    for i in range(config.num_layers):
        h, m = _hf_layer(i), _meg_layer(i)
        out[h + "input_layernorm.weight"] = take(m + "input_layernorm.weight")
        q, k, v = split_qkv(take(m + "self_attention.linear_qkv.weight"), heads, groups)
        out[h + "self_attn.q_proj.weight"], out[h + "self_attn.k_proj.weight"], out[h + "self_attn.v_proj.weight"] = q, k, v
        if config.qkv_bias:
            qb, kb, vb = split_qkv(take(m + "self_attention.linear_qkv.bias"), heads, groups)
        elif hf_bias:
            qb, kb, vb = q.new_zeros(q.shape[0]), k.new_zeros(k.shape[0]), v.new_zeros(v.shape[0])
        if hf_bias:
            out[h + "self_attn.q_proj.bias"], out[h + "self_attn.k_proj.bias"], out[h + "self_attn.v_proj.bias"] = qb, kb, vb
        if config.qk_layernorm:
            out[h + "self_attn.q_norm.weight"] = take(m + "self_attention.q_layernorm.weight")
            out[h + "self_attn.k_norm.weight"] = take(m + "self_attention.k_layernorm.weight")
        out[h + "self_attn.o_proj.weight"] = take(m + "self_attention.linear_proj.weight")
        if layout not in (QWEN2, MISTRAL, MIXTRAL) and hf_bias:
            out[h + "self_attn.o_proj.bias"] = q.new_zeros(config.hidden_size)
        out[h + "post_attention_layernorm.weight"] = take(m + "pre_mlp_layernorm.weight")
        out.update(_mlp_to_hf(take, m, h, config, layout))
    out["model.norm.weight"] = take("decoder.final_layernorm.weight")
    if not config.tie_embeddings:
        out["lm_head.weight"] = take("output_layer.weight")[:vocab].contiguous()
    if meg:
        raise ConversionError(f"megatron tensors left unmapped: {sorted(meg)[:8]}")
    return out
