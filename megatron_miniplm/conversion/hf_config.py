"""HF model configs (Qwen2, Llama, Qwen3, Mistral, Qwen3-MoE, Mixtral) <-> ``ModelConfig``, refusing what megatron's GPT
cannot express exactly, by name."""

from __future__ import annotations

from typing import Optional

from megatron_miniplm.conversion.errors import ConversionError
from megatron_miniplm.conversion.mapping import LAYOUTS, LLAMA, MISTRAL, MIXTRAL, QWEN2, QWEN3, QWEN3_MOE
from megatron_miniplm.models.config import ModelConfig

# HF architecture class -> our layout name. Qwen1.5 checkpoints declare Qwen2ForCausalLM,
# Llama 3.x and SmolLM LlamaForCausalLM.
ARCHITECTURES = {"Qwen2ForCausalLM": QWEN2, "LlamaForCausalLM": LLAMA, "Qwen3ForCausalLM": QWEN3,
                 "MistralForCausalLM": MISTRAL, "Qwen3MoeForCausalLM": QWEN3_MOE, "MixtralForCausalLM": MIXTRAL}
MODEL_TYPES = {"qwen2": QWEN2, "llama": LLAMA, "qwen3": QWEN3, "mistral": MISTRAL, "qwen3_moe": QWEN3_MOE,
               "mixtral": MIXTRAL}
# Imported: every layer slides where the config has a window (Qwen3-MoE's config keeps one only
# with use_sliding_window); Qwen2 and Qwen3 slide the layers their layer_types name.
WINDOWED = (MISTRAL, MIXTRAL, QWEN3_MOE)
QK_NORM = (QWEN3, QWEN3_MOE)
MOE = (QWEN3_MOE, MIXTRAL)
CLASS_OF_LAYOUT = {layout: cls for cls, layout in ARCHITECTURES.items()}
_MAMBA = ("Mamba layers: megatron-core's need GPU kernels (mamba-ssm's selective scan, causal-conv1d) that "
          "neither run on a CPU nor are tested here")
# Architectures users bring that the GPT built here cannot compute exactly, and what it lacks.
REFUSED = {
    "Qwen2MoeForCausalLM": "a shared expert with a sigmoid gate (not converted yet)",
    "Gemma2ForCausalLM": "logit soft-capping, post-norms, GeGLU and (1 + weight) norms",
    "Gemma3ForCausalLM": "post-norms, GeGLU and (1 + weight) norms",
    "GemmaForCausalLM": "GeGLU, embeddings scaled by sqrt(hidden size) and (1 + weight) norms",
    "MambaForCausalLM": _MAMBA,
    "Mamba2ForCausalLM": _MAMBA,
}
# RoPE variants: plain, and Llama 3.1's frequency scaling (its four parameters).
LLAMA3_ROPE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def layout_of(hf_config) -> str:
    """The layout name of a supported HF config, else a ConversionError naming what is supported."""
    names = list(getattr(hf_config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    model_type = getattr(hf_config, "model_type", None)
    if not names and model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    found = ", ".join(names) or f"model_type '{model_type}'"
    why = "".join(f" ({name}: {REFUSED[name]})" for name in names if name in REFUSED)
    raise ConversionError(
        f"unsupported architecture {found}{why}: supported are {', '.join(ARCHITECTURES)}"
    )


def rope_settings(hf_config) -> dict:
    """RoPE base and scaling as ModelConfig fields (transformers 5 ``rope_parameters`` or 4.x
    ``rope_theta`` + ``rope_scaling``), refusing a scaling other than Llama 3.1's by name."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        scaling, theta = params, params.get("rope_theta")
    else:
        scaling, theta = getattr(hf_config, "rope_scaling", None) or {}, getattr(hf_config, "rope_theta", None)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if theta is None:
        raise ConversionError("HF config has no rope_theta")
    if kind in (None, "default"):
        return dict(rotary_base=float(theta))
    if kind != "llama3":
        raise ConversionError(f"RoPE scaling '{kind}' is not supported (plain RoPE and 'llama3' only)")
    missing = [k for k in LLAMA3_ROPE if scaling.get(k) is None]
    if missing:
        raise ConversionError(f"RoPE scaling 'llama3' without {', '.join(missing)}")
    return dict(rotary_base=float(theta), use_rope_scaling=True, rope_scaling_factor=float(scaling["factor"]),
                rope_low_freq_factor=float(scaling["low_freq_factor"]),
                rope_high_freq_factor=float(scaling["high_freq_factor"]),
                rope_original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))


def sliding_window_of(hf_config, layout: str) -> Optional[int]:
    """The attention window of a model any of whose layers slide, None where none does."""
    window = getattr(hf_config, "sliding_window", None)
    if layout in WINDOWED:
        return window
    layer_types = getattr(hf_config, "layer_types", None) or []
    return window if "sliding_attention" in layer_types else None


def unsupported_features(c, layout: str) -> list[str]:
    """What the HF config has that the GPT built here does not compute exactly, each by name."""
    problems = []
    if getattr(c, "hidden_act", "silu") not in ("silu", "swish"):  # transformers' swish is SiLU
        problems.append(f"activation '{c.hidden_act}' (SwiGLU with silu only)")
    if getattr(c, "mlp_bias", False):
        problems.append("bias on the MLP")
    if layout in (LLAMA, *QK_NORM) and getattr(c, "attention_bias", False):
        problems.append("attention_bias (megatron's GPT has no bias on the output projection)")
    sliding = layout in (QWEN2, *QK_NORM) and getattr(c, "use_sliding_window", False)
    if sliding and getattr(c, "sliding_window", None) is None:
        problems.append("sliding-window attention without a window size")
    layer_types = getattr(c, "layer_types", None) or []
    odd = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if odd:
        problems.append(f"layer types {odd}")
    if layout == QWEN3_MOE and (getattr(c, "mlp_only_layers", None) or getattr(c, "decoder_sparse_step", 1) != 1):
        problems.append("dense MLP layers among the expert layers (mlp_only_layers, decoder_sparse_step)")
    if layout in MOE and c.num_experts_per_tok == 1 and (layout == MIXTRAL or c.norm_topk_prob):
        problems.append("top-1 routing with the chosen expert's weight renormalised to 1 (megatron-core's router "
                        "takes top-1 only weighted by the softmax over all experts)")
    for name in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(c, name, None):
            problems.append(f"logit soft-capping ({name})")
    return problems


def experts_of(c, layout: str) -> dict:
    """The mixture-of-experts settings of Qwen3-MoE (``num_experts``, ``moe_intermediate_size``,
    ``norm_topk_prob``) or Mixtral (``num_local_experts``, experts of ``intermediate_size``, weights
    renormalised over the chosen experts); the load-balancing settings only train a router."""
    if layout == QWEN3_MOE:
        return dict(num_experts=c.num_experts, moe_router_topk=c.num_experts_per_tok,
                    moe_ffn_hidden_size=c.moe_intermediate_size, moe_router_pre_softmax=not c.norm_topk_prob)
    if layout == MIXTRAL:
        return dict(num_experts=c.num_local_experts, moe_router_topk=c.num_experts_per_tok,
                    moe_ffn_hidden_size=c.intermediate_size)
    return {}


def model_config_from_hf(hf_config, name: str) -> ModelConfig:
    layout = layout_of(hf_config)
    c = hf_config
    problems = unsupported_features(c, layout)
    if problems:
        raise ConversionError(f"{c.architectures or layout}: unsupported " + "; ".join(problems))
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None)
    return ModelConfig(
        name=name,
        num_layers=c.num_hidden_layers,
        hidden_size=c.hidden_size,
        ffn_hidden_size=c.intermediate_size,
        num_attention_heads=c.num_attention_heads,
        num_query_groups=None if kv == c.num_attention_heads else kv,
        kv_channels=None if head_dim in (None, c.hidden_size // c.num_attention_heads) else head_dim,
        qk_layernorm=layout in QK_NORM,
        **experts_of(c, layout),
        sliding_window=sliding_window_of(c, layout),
        vocab_size=c.vocab_size,
        max_position_embeddings=c.max_position_embeddings,
        **rope_settings(c),
        # GGUF stores eps as float32 (1e-5 -> 9.9999997e-06): 7 significant digits undo that.
        norm_epsilon=float(f"{float(c.rms_norm_eps):.7g}"),
        qkv_bias=layout == QWEN2,
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        init_method_std=float(getattr(c, "initializer_range", 0.02)),
    )


def rope_parameters(config: ModelConfig) -> dict:
    """transformers' ``rope_parameters`` of a model: plain RoPE or Llama 3.1's scaling."""
    if not config.use_rope_scaling:
        return {"rope_type": "default", "rope_theta": float(config.rotary_base)}
    return {"rope_type": "llama3", "rope_theta": float(config.rotary_base), "factor": config.rope_scaling_factor,
            "low_freq_factor": config.rope_low_freq_factor, "high_freq_factor": config.rope_high_freq_factor,
            "original_max_position_embeddings": config.rope_original_max_position_embeddings}


def layout_problems(config: ModelConfig, layout: str) -> list[str]:
    """What of the model the HF layout has no place for."""
    problems = []
    if config.qk_layernorm != (layout in QK_NORM):
        problems.append("QK-norm (qwen3, qwen3_moe)" if config.qk_layernorm else "lack of QK-norm")
    if config.sliding_window is not None and layout == LLAMA:
        problems.append("sliding attention window (not in llama)")
    if config.qkv_bias and layout in (MISTRAL, MIXTRAL):
        problems.append("QKV bias (not in mistral, mixtral)")
    if bool(config.num_experts) != (layout in MOE):
        problems.append("experts (qwen3_moe, mixtral)" if config.num_experts else "dense MLP")
    if layout == MIXTRAL and config.moe_router_pre_softmax:
        problems.append("router weights of a softmax over all experts (not in mixtral)")
    return problems


def hf_config_from_model_config(
    config: ModelConfig, layout: str, *, dtype: str = "float32", eod_id: Optional[int] = None
):
    """A transformers config for a megatron model in one of the HF layouts.

    bos = eos = the end-of-document token, as in the Qwen and SmolLM base models.
    """
    from transformers import LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    if layout not in LAYOUTS:
        raise ConversionError(f"unknown HF layout '{layout}' ({', '.join(LAYOUTS)})")
    problems = layout_problems(config, layout)
    if problems:
        raise ConversionError(f"--hf-architecture {layout} cannot hold the model's " + ", ".join(problems))
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
        rope_parameters=rope_parameters(config),
        bos_token_id=eod_id,
        eos_token_id=eod_id,
        dtype=dtype,
    )
    # Qwen2 and Qwen3 slide the layers from max_window_layers on: all of them, as the model here
    window = (dict(use_sliding_window=False) if config.sliding_window is None else
              dict(use_sliding_window=True, sliding_window=config.sliding_window, max_window_layers=0))
    if layout == QWEN2:
        return Qwen2Config(head_dim=config.head_dim, **window, **common)
    if layout == LLAMA:
        return LlamaConfig(attention_bias=config.qkv_bias, mlp_bias=False, head_dim=config.head_dim, **common)
    if layout == QWEN3:
        return Qwen3Config(attention_bias=config.qkv_bias, head_dim=config.head_dim, **window, **common)
    if layout == MISTRAL:
        return MistralConfig(sliding_window=config.sliding_window, head_dim=config.head_dim, **common)
    experts = dict(num_experts_per_tok=config.moe_router_topk, head_dim=config.head_dim)
    if layout == QWEN3_MOE:
        return Qwen3MoeConfig(attention_bias=config.qkv_bias, use_sliding_window=config.sliding_window is not None,
                              sliding_window=config.sliding_window, num_experts=config.num_experts,
                              moe_intermediate_size=config.expert_ffn_hidden_size, decoder_sparse_step=1,
                              mlp_only_layers=[], norm_topk_prob=not config.moe_router_pre_softmax, **experts, **common)
    common["intermediate_size"] = config.expert_ffn_hidden_size
    return MixtralConfig(sliding_window=config.sliding_window, num_local_experts=config.num_experts, **experts,
                         **common)
