"""HF model configs (Qwen2, Llama) <-> ``ModelConfig``, refusing what megatron's GPT cannot express."""

from __future__ import annotations

from typing import Optional

from megatron_miniplm.conversion.errors import ConversionError
from megatron_miniplm.conversion.mapping import LLAMA, QWEN2
from megatron_miniplm.models.config import ModelConfig

# HF architecture class -> our layout name. Qwen1.5 checkpoints declare Qwen2ForCausalLM.
ARCHITECTURES = {"Qwen2ForCausalLM": QWEN2, "LlamaForCausalLM": LLAMA}
MODEL_TYPES = {"qwen2": QWEN2, "llama": LLAMA}
CLASS_OF_LAYOUT = {layout: cls for cls, layout in ARCHITECTURES.items()}


def layout_of(hf_config) -> str:
    """``qwen2`` or ``llama`` for a supported HF config, else a ConversionError naming what is supported."""
    names = list(getattr(hf_config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    model_type = getattr(hf_config, "model_type", None)
    if not names and model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    found = ", ".join(names) or f"model_type '{model_type}'"
    raise ConversionError(
        f"unsupported architecture {found}: supported are {', '.join(ARCHITECTURES)}"
    )


def rope_theta(hf_config) -> float:
    """RoPE base, refusing RoPE scaling (transformers 5 ``rope_parameters`` or 4.x ``rope_theta``)."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        kind = params.get("rope_type", "default")
        theta = params.get("rope_theta")
    else:
        scaling = getattr(hf_config, "rope_scaling", None) or {}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        theta = getattr(hf_config, "rope_theta", None)
    if kind not in (None, "default"):
        raise ConversionError(f"RoPE scaling '{kind}' is not supported (plain RoPE only)")
    if theta is None:
        raise ConversionError("HF config has no rope_theta")
    return float(theta)


def model_config_from_hf(hf_config, name: str) -> ModelConfig:
    layout = layout_of(hf_config)
    c = hf_config
    problems = []
    if getattr(c, "hidden_act", "silu") != "silu":
        problems.append(f"activation '{c.hidden_act}' (SwiGLU with silu only)")
    head_dim = getattr(c, "head_dim", None)
    if head_dim is not None and head_dim * c.num_attention_heads != c.hidden_size:
        problems.append(f"head_dim {head_dim} x {c.num_attention_heads} heads != hidden size {c.hidden_size}")
    if getattr(c, "mlp_bias", False):
        problems.append("bias on the MLP")
    if layout == LLAMA and getattr(c, "attention_bias", False):
        problems.append("attention_bias (megatron's GPT has no bias on the output projection)")
    if getattr(c, "use_sliding_window", False):
        problems.append("sliding-window attention")
    layer_types = getattr(c, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        problems.append(f"layer types {sorted(set(layer_types))}")
    if problems:
        raise ConversionError(f"{c.architectures or layout}: unsupported " + "; ".join(problems))
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return ModelConfig(
        name=name,
        num_layers=c.num_hidden_layers,
        hidden_size=c.hidden_size,
        ffn_hidden_size=c.intermediate_size,
        num_attention_heads=c.num_attention_heads,
        num_query_groups=None if kv == c.num_attention_heads else kv,
        vocab_size=c.vocab_size,
        max_position_embeddings=c.max_position_embeddings,
        rotary_base=rope_theta(c),
        # GGUF stores eps as float32 (1e-5 -> 9.9999997e-06): 7 significant digits undo that.
        norm_epsilon=float(f"{float(c.rms_norm_eps):.7g}"),
        qkv_bias=layout == QWEN2,
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        init_method_std=float(getattr(c, "initializer_range", 0.02)),
    )


def hf_config_from_model_config(
    config: ModelConfig, layout: str, *, dtype: str = "float32", eod_id: Optional[int] = None
):
    """A transformers config for a megatron model in the Qwen2 or Llama layout.

    bos = eos = the end-of-document token, as in the Qwen and SmolLM base models.
    """
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        architectures=[CLASS_OF_LAYOUT[layout]],
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.kv_heads,
        hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.init_method_std,
        rms_norm_eps=config.norm_epsilon,
        tie_word_embeddings=config.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rotary_base)},
        bos_token_id=eod_id,
        eos_token_id=eod_id,
        dtype=dtype,
    )
    if layout == QWEN2:
        hf = Qwen2Config(use_sliding_window=False, **common)
    elif layout == LLAMA:
        hf = LlamaConfig(attention_bias=config.qkv_bias, mlp_bias=False, head_dim=config.head_dim, **common)
    else:
        raise ConversionError(f"unknown HF layout '{layout}' (qwen2, llama)")
    return hf
