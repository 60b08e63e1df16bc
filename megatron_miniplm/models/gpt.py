"""Build a megatron-core ``GPTModel`` from a ``ModelConfig``.

Layers and attention: Transformer Engine's spec (its fused attention) when
megatron-core can use Transformer Engine on a GPU, else megatron's local layers
with PyTorch SDPA (flash) attention on a GPU, else the local spec with its
unfused attention on the CPU, where it is the fastest of the three for training.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from megatron_miniplm import platform
from megatron_miniplm.models.config import ModelConfig
from megatron_miniplm.settings import setting

AttentionBackend = Literal["auto", "local", "sdpa", "te"]


def transformer_engine_status() -> tuple[bool, str]:
    """Whether megatron-core builds Transformer Engine layers here, and what it is or why not:
    TE's PyTorch part must import (``platform.transformer_engine``) and megatron-core must
    have enabled its TE extension, as its layer specs check."""
    usable, why = platform.transformer_engine()
    if not usable:
        return False, why
    from megatron.core.extensions import transformer_engine as te_extension
    from megatron.core.models.gpt import gpt_layer_specs

    if not (te_extension.HAVE_TE and gpt_layer_specs.HAVE_TE):
        return False, "megatron-core did not enable its Transformer Engine layers"
    return True, why


def resolve_attention_backend(backend: AttentionBackend) -> str:
    if backend != "auto":
        return backend
    if not platform.cuda_available():
        return "local"
    return "te" if transformer_engine_status()[0] else "sdpa"


def describe_backend(backend: AttentionBackend) -> str:
    """One line for a start-up summary: which layers and attention a model gets here."""
    resolved = resolve_attention_backend(backend)
    if resolved == "te":
        return f"layers: Transformer Engine spec ({transformer_engine_status()[1]}), attention: TE fused"
    attention = {"sdpa": "PyTorch SDPA", "local": "megatron local (unfused)"}[resolved]
    note = ""
    if platform.cuda_available() and backend == "auto":
        note = f"; no Transformer Engine: {transformer_engine_status()[1]}"
    return f"layers: megatron-core local spec, attention: {attention}{note}"


RECOMPUTE = "activation recomputation"


@dataclass(frozen=True)
class RecomputeSettings:
    """Megatron-LM's activation recomputation: memory for compute, the numbers unchanged."""

    recompute_granularity: Optional[str] = setting(
        None, group=RECOMPUTE, choices=("full", "selective"),
        help="full: recompute whole transformer layers in the backward pass; selective: only the "
             "core attention (the memory of long sequences)")
    recompute_method: Optional[str] = setting(
        None, group=RECOMPUTE, choices=("uniform", "block"),
        help="with full: uniform (every --recompute-num-layers layers as one unit) or block (the first "
             "--recompute-num-layers layers of each pipeline stage)")
    recompute_num_layers: Optional[int] = setting(None, group=RECOMPUTE, help="layers per unit (uniform) or "
                                                                               "recomputed layers (block)")

    def __post_init__(self):
        full = self.recompute_granularity == "full"
        if full and (self.recompute_method is None or not self.recompute_num_layers):
            raise ValueError("recompute_granularity full (--recompute-granularity) needs --recompute-method "
                             "and --recompute-num-layers, as in Megatron-LM")
        if not full and (self.recompute_method is not None or self.recompute_num_layers is not None):
            raise ValueError("--recompute-method and --recompute-num-layers go with --recompute-granularity full")


def transformer_config(
    config: ModelConfig,
    *,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    params_dtype: torch.dtype = torch.float32,
    bf16: bool = False,
    recompute: RecomputeSettings = RecomputeSettings(),
):
    """The megatron ``TransformerConfig`` of a model at a parallel layout."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    config.check_tensor_parallel(tensor_parallel_size)
    if config.num_layers % pipeline_parallel_size != 0:
        raise ValueError(
            f"pipeline-model-parallel-size {pipeline_parallel_size} does not divide the "
            f"{config.num_layers} layers of model '{config.name}'"
        )
    on_gpu = platform.cuda_available()
    return TransformerConfig(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.kv_heads,
        kv_channels=config.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=config.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=config.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=config.init_method_std,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        pipeline_dtype=params_dtype,
        params_dtype=params_dtype,
        bf16=bf16,
        use_cpu_initialization=not on_gpu,
        # Fused kernels exist only on CUDA.
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        sequence_parallel=False,
        recompute_granularity=recompute.recompute_granularity,
        recompute_method=recompute.recompute_method,
        recompute_num_layers=recompute.recompute_num_layers,
    )


def layer_spec(config: ModelConfig, backend: AttentionBackend = "auto"):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    backend = resolve_attention_backend(backend)
    if backend == "te":
        usable, why = transformer_engine_status()
        if not usable:
            raise ValueError(f"attention backend 'te' needs Transformer Engine: {why}")
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    if backend == "sdpa":
        from megatron_miniplm.models.attention import SDPAttention

        spec = copy.deepcopy(spec)
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    elif backend != "local":
        raise ValueError(f"unknown attention backend '{backend}' (auto, local, sdpa, te)")
    return spec


def build_model(
    config: ModelConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    bf16: bool = False,
    attention_backend: AttentionBackend = "auto",
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    initialize: bool = True,
    recompute: RecomputeSettings = RecomputeSettings(),
):
    """A ``GPTModel`` for this rank's tensor/pipeline slice.

    Needs megatron's parallel state (``megatron_miniplm.parallel.initialize``);
    ``pre_process`` / ``post_process`` default to this rank's pipeline stage.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    platform.apply()
    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    tcfg = transformer_config(
        config, tensor_parallel_size=tp, pipeline_parallel_size=pp,
        params_dtype=params_dtype, bf16=bf16, recompute=recompute,
    )
    tcfg.perform_initialization = initialize
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage()
    if post_process is None:
        post_process = ps.is_pipeline_last_stage()
    model = GPTModel(
        config=tcfg,
        transformer_layer_spec=layer_spec(config, attention_backend),
        vocab_size=config.padded_vocab_size(tp),
        max_sequence_length=config.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=config.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(config.rotary_base),
    )
    if params_dtype != torch.float32:
        # Without TE/apex, megatron's torch-norm fallback makes fp32 norm weights whatever
        # params_dtype says, and every norm then takes PyTorch's unfused mixed-dtype path.
        # Megatron-LM casts the whole module to the training dtype (Float16Module): so do we.
        model.to(params_dtype)
    model.miniplm_config = config
    return model
