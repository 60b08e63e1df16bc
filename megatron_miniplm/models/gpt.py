"""Build a megatron-core ``GPTModel`` from a ``ModelConfig``.

Layers, attention and fusions follow Megatron-LM's flags and GPU defaults
(``LayerImpl``, ``TrainingFusions``): Transformer Engine's spec, its attention and
fused RoPE where TE imports; else megatron-core's local layers with PyTorch SDPA
(flash) attention on a GPU, and on the CPU whichever attention was measured faster
for the job. ``resolve_implementation`` decides once what runs here and why, and
the start-up lines print it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_miniplm import megatron_compat, platform
from megatron_miniplm.models.config import ModelConfig
from megatron_miniplm.models.config import LayerImpl, RecomputeSettings, TrainingFusions


@dataclass(frozen=True)
class Implementation:
    """What a ``LayerImpl`` (and the training fusions) come to on this machine."""

    spec: str  # "transformer_engine" | "local"
    attention: str  # "te" (TE's DotProductAttention), "sdpa", "sdpa-flash", "local" (megatron-core's)
    # TransformerConfig.attention_backend: with TE the kernels it may choose from. megatron-core
    # passes it to TE through process-wide NVTE_* variables (and refuses a later model that
    # asks otherwise), so the local spec, where it means nothing, always leaves it at auto.
    attention_backend: str
    rope_fusion: bool
    gradient_accumulation_fusion: bool
    cross_entropy_fusion: Optional[str]  # None, "native" or "te"
    # megatron-core's bias-SwiGLU and bias-dropout-add fusions: torch.compile'd, so GPU only, and
    # only where the compiler Triton needs at their first use is there
    compiled_fusions: bool = False
    notes: tuple = ()  # why something asked for is not used here

    def describe(self) -> str:
        layers = ("Transformer Engine spec" if self.spec == "transformer_engine" else "megatron-core local spec")
        attention = {"te": f"TE ({self.attention_backend})", "sdpa": "PyTorch SDPA",
                     "sdpa-flash": "PyTorch SDPA (flash kernel only)", "local": "megatron-core local (unfused)"}
        fused = [name for name, on in (("RoPE", self.rope_fusion),
                                       ("gradient accumulation", self.gradient_accumulation_fusion),
                                       (f"cross entropy ({self.cross_entropy_fusion})", self.cross_entropy_fusion),
                                       ("bias-SwiGLU and bias-dropout-add (torch.compile)", self.compiled_fusions))
                 if on]
        text = (f"layers: {layers}, attention: {attention[self.attention]}, fused: "
                f"{', '.join(fused) if fused else 'none'}")
        return text + "".join(f"; {note}" for note in self.notes)


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


# Layers for code that needs exactly megatron-core's unfused local model (checkpoint
# conversion and its checks against HF): no probing, the same everywhere.
PLAIN_LOCAL = Implementation(spec="local", attention="local", attention_backend="auto", rope_fusion=False,
                             gradient_accumulation_fusion=False, cross_entropy_fusion=None)


def _apex_grad_accumulation() -> bool:
    from megatron.core.tensor_parallel import layers

    return bool(layers._grad_accum_fusion_available)


def resolve_implementation(layers: LayerImpl = LayerImpl(), fusions: Optional[TrainingFusions] = None, *,
                           forward_only: bool = False) -> Implementation:
    """What runs here for these settings. Falls back where a kernel is missing and says why in
    ``notes``; refuses (ValueError) only what cannot be had at all and has no fallback that
    means the same: TE's fused attention or TE's cross entropy without TE."""
    te, why_not = transformer_engine_status()
    notes = []
    spec = "transformer_engine" if layers.transformer_impl == "transformer_engine" and te else "local"
    if layers.transformer_impl == "transformer_engine" and not te:
        notes.append(f"no Transformer Engine ({why_not})")
    backend = layers.attention_backend
    if backend == "fused" and spec != "transformer_engine":
        raise ValueError("attention_backend fused (--attention-backend) is Transformer Engine's cuDNN attention: "
                         + (f"Transformer Engine does not import here ({why_not})" if not te
                            else "it needs --transformer-impl transformer_engine"))
    if spec == "transformer_engine":
        attention = "local" if backend == "local" else "te"
    elif backend == "flash":
        attention = "sdpa-flash"
    elif backend in ("unfused", "local"):
        attention = "local"
    elif platform.cuda_available() or forward_only:
        attention = "sdpa"
    else:
        # On a CPU megatron-core's attention was measured faster for training than SDPA's CPU
        # kernels, and SDPA faster for forward-only scoring (bench_score.py).
        attention = "local"
    rope = layers.apply_rope_fusion and te
    if layers.apply_rope_fusion and not te:
        notes.append("RoPE unfused (the fused RoPE is TE's)")
    fusions = fusions or TrainingFusions(gradient_accumulation_fusion=False)
    # Every layer that fuses must have its kernel: TE's linear layers bring theirs, but the output
    # layer is always megatron-core's ColumnParallelLinear, whose constructor refuses the fusion
    # without apex's fused_weight_gradient_mlp_cuda, TE or not.
    grad_accum = fusions.gradient_accumulation_fusion and _apex_grad_accumulation()
    if fusions.gradient_accumulation_fusion and not grad_accum:
        notes.append("gradient accumulation unfused (the output layer needs apex's fused_weight_gradient_mlp_cuda)")
    compiled = platform.cuda_available()
    if compiled:
        compiled, why = platform.kernel_compiler()
        if not compiled:
            notes.append(f"bias-SwiGLU and bias-dropout-add unfused ({why})")
    ce = fusions.cross_entropy_fusion_impl if fusions.cross_entropy_loss_fusion else None
    if ce == "te" and not te:
        raise ValueError(f"cross_entropy_fusion_impl te (--cross-entropy-fusion-impl) needs Transformer Engine: "
                         f"{why_not}; use native")
    return Implementation(spec=spec, attention=attention,
                          attention_backend=backend if spec == "transformer_engine" else "auto", rope_fusion=rope,
                          gradient_accumulation_fusion=grad_accum, cross_entropy_fusion=ce,
                          compiled_fusions=compiled, notes=tuple(notes))


def transformer_config(
    config: ModelConfig,
    *,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    expert_parallel_size: int = 1,
    params_dtype: torch.dtype = torch.float32,
    bf16: bool = False,
    recompute: RecomputeSettings = RecomputeSettings(),
    impl: Optional[Implementation] = None,
    sequence_parallel: bool = False,
    allocate_on_device: Optional[bool] = None,
):
    """The megatron ``TransformerConfig`` of a model at a parallel layout. ``allocate_on_device``:
    megatron-core creates the weights directly on this process's device (default: where that
    device is an accelerator, as Megatron-LM does on GPUs), else on the host."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    impl = impl or resolve_implementation()
    _check_layout(config, tensor_parallel_size, pipeline_parallel_size, expert_parallel_size)
    if allocate_on_device is None:
        allocate_on_device = platform.device().type != "cpu"
    return TransformerConfig(
        **_architecture(config),
        **_experts(config, expert_parallel_size),
        **_layout(tensor_parallel_size, pipeline_parallel_size, sequence_parallel),
        **_precision(params_dtype, bf16, allocate_on_device),
        **_kernels(impl),
        recompute_granularity=recompute.recompute_granularity,
        recompute_method=recompute.recompute_method,
        recompute_num_layers=recompute.recompute_num_layers,
    )


def _check_layout(config: ModelConfig, tensor_parallel_size: int, pipeline_parallel_size: int,
                  expert_parallel_size: int = 1) -> None:
    """Refuses a layout the model cannot be split into: heads over TP, layers over PP, experts over EP."""
    config.check_tensor_parallel(tensor_parallel_size)
    config.check_expert_parallel(expert_parallel_size)
    if config.num_layers % pipeline_parallel_size != 0:
        raise ValueError(
            f"pipeline-model-parallel-size {pipeline_parallel_size} does not divide the "
            f"{config.num_layers} layers of model '{config.name}'"
        )


def _architecture(config: ModelConfig) -> dict:
    """The model's shape and its Llama/Qwen2-style block: RMSNorm, SwiGLU, no linear biases
    (QKV bias as the model says), no dropout, softmax in fp32."""
    return dict(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.kv_heads,
        kv_channels=config.head_dim,
        qk_layernorm=config.qk_layernorm,
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
    )


def _experts(config: ModelConfig, expert_parallel_size: int = 1) -> dict:
    """A mixture-of-experts MLP: megatron-core's router, top-k and experts one after another
    (SequentialMLP), 1/EP of them on each expert-parallel rank. Without EP the tokens are
    gathered to the TP ranks (allgather dispatcher); with EP each rank sends each token to
    the ranks of its experts (alltoall dispatcher), which, unlike the all-gather, lets the
    EP ranks hold batches of different shapes (data-parallel replicas scoring their own
    batches). No load-balancing loss: the routing of a converted teacher is its own, and the
    loss only trains a router."""
    if not config.num_experts:
        return {}
    return dict(num_moe_experts=config.num_experts, moe_router_topk=config.moe_router_topk,
                moe_ffn_hidden_size=config.expert_ffn_hidden_size, moe_router_pre_softmax=config.moe_router_pre_softmax,
                moe_grouped_gemm=False, expert_model_parallel_size=expert_parallel_size,
                moe_token_dispatcher_type="alltoall" if expert_parallel_size > 1 else "allgather",
                moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0)


def _layout(tensor_parallel_size: int, pipeline_parallel_size: int, sequence_parallel: bool) -> dict:
    """The parallel layout; sequence parallelism only where there is a TP group to split over."""
    return dict(
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        # as Megatron-LM: a stage's sent activations are freed, only their grad-fn kept
        deallocate_pipeline_outputs=True,
        sequence_parallel=sequence_parallel and tensor_parallel_size > 1,
    )


def _precision(params_dtype: torch.dtype, bf16: bool, allocate_on_device: bool) -> dict:
    """Parameter and pipeline dtypes, and where megatron-core creates the weights."""
    return dict(
        pipeline_dtype=params_dtype,
        params_dtype=params_dtype,
        bf16=bf16,
        use_cpu_initialization=not allocate_on_device,
    )


def _kernels(impl: Implementation) -> dict:
    """The resolved implementation's attention backend and fusions."""
    from megatron.core.transformer.enums import AttnBackend

    return dict(
        bias_activation_fusion=impl.compiled_fusions,
        bias_dropout_fusion=impl.compiled_fusions,
        masked_softmax_fusion=False,
        attention_backend=AttnBackend[impl.attention_backend],
        apply_rope_fusion=impl.rope_fusion,
        gradient_accumulation_fusion=impl.gradient_accumulation_fusion,
        cross_entropy_loss_fusion=impl.cross_entropy_fusion is not None,
        cross_entropy_fusion_impl=impl.cross_entropy_fusion or "native",
        persist_layer_norm=False,
    )


class LocalRMSNorm(torch.nn.RMSNorm):
    """PyTorch's RMSNorm under megatron-core's norm constructor: the norm of the local spec.

    megatron-core's own fallback (``WrappedTorchNorm``, the same PyTorch module) refuses
    sequence parallelism. Under it each TP rank normalises its own slice of the sequence, so
    the weight's gradient is a partial sum: marked ``sequence_parallel``, it is all-reduced
    over the TP group by ``finalize_model_grads``, as megatron-core does for TE's norms.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def layer_spec(impl: Implementation, qk_layernorm: bool = False, num_experts: Optional[int] = None):
    """The transformer layer's ``ModuleSpec`` for a resolved implementation; ``qk_layernorm``:
    an RMSNorm over each query and key head (the spec's own where TE imports, else ours);
    ``num_experts``: a mixture-of-experts MLP of that many experts."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    if impl.spec == "transformer_engine":
        spec = get_gpt_layer_with_transformer_engine_spec(num_experts=num_experts, moe_grouped_gemm=False,
                                                          qk_layernorm=qk_layernorm)
    else:
        spec = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False, normalization="RMSNorm",
                                        qk_layernorm=qk_layernorm)
        spec.submodules.input_layernorm = LocalRMSNorm
        spec.submodules.pre_mlp_layernorm = LocalRMSNorm
        if qk_layernorm:
            attention = spec.submodules.self_attention.submodules
            attention.q_layernorm = attention.k_layernorm = LocalRMSNorm
    from megatron_miniplm.models.attention import FlashSDPAttention, SDPAttention

    core = {"sdpa": SDPAttention, "sdpa-flash": FlashSDPAttention, "local": DotProductAttention}.get(impl.attention)
    if core is not None:
        spec.submodules.self_attention.submodules.core_attention = core
    return spec


def _block_spec(impl: Implementation, tcfg):
    """What GPTModel is given: the layer spec with TE (whose block norm is TE's), else this
    stage's layers with the local norm as the final one too."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    spec = layer_spec(impl, tcfg.qk_layernorm, tcfg.num_moe_experts)
    if impl.spec == "transformer_engine":
        return spec
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(tcfg), layer_norm=LocalRMSNorm)


def build_model(
    config: ModelConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    bf16: bool = False,
    impl: Optional[Implementation] = None,
    sequence_parallel: bool = False,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    initialize: bool = True,
    recompute: RecomputeSettings = RecomputeSettings(),
    device: Optional[torch.device] = None,
):
    """A ``GPTModel`` for this rank's tensor/pipeline slice, built as ``impl`` says
    (``resolve_implementation``; default: Megatron-LM's layer defaults, forward fusions only).

    Every parameter and buffer ends on ``device``: by default this process's device
    (``platform.device()``), where Megatron-LM moves each model chunk once built, since not
    every module megatron-core builds allocates there itself (the local spec's norms are
    PyTorch modules created on the host). Another device keeps a whole model off the
    accelerator: the host for conversion, ``meta`` for counting; it is then built there
    from the start. Needs megatron's parallel state (``megatron_miniplm.parallel.initialize``);
    ``pre_process`` / ``post_process`` default to this rank's pipeline stage.
    """
    from megatron.core import parallel_state as ps

    megatron_compat.apply()
    if config.num_experts:
        megatron_compat.moe_router_without_te()
    impl = impl or resolve_implementation()
    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    ep = ps.get_expert_model_parallel_world_size()
    device = platform.device() if device is None else torch.device(device)
    on_device = device == platform.device() and device.type != "cpu"
    tcfg = transformer_config(
        config, tensor_parallel_size=tp, pipeline_parallel_size=pp, expert_parallel_size=ep,
        params_dtype=params_dtype, bf16=bf16, recompute=recompute, impl=impl, sequence_parallel=sequence_parallel,
        allocate_on_device=on_device,
    )
    tcfg.perform_initialization = initialize
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage()
    if post_process is None:
        post_process = ps.is_pipeline_last_stage()
    with contextlib.nullcontext() if on_device else device:
        model = _gpt_model(config, tcfg, impl, tp, pre_process, post_process)
    # The local norms are created in fp32 whatever params_dtype says, and every norm would
    # then take PyTorch's unfused mixed-dtype path. Megatron-LM casts the whole module to
    # the training dtype (Float16Module): so do we.
    model.to(device=device, dtype=None if params_dtype == torch.float32 else params_dtype)
    model.miniplm_config = config
    model.miniplm_impl = impl
    return model


def _gpt_model(config: ModelConfig, tcfg, impl: Implementation, tp: int, pre_process: bool, post_process: bool):
    from megatron.core.models.gpt import GPTModel

    model = GPTModel(
        config=tcfg,
        transformer_layer_spec=_block_spec(impl, tcfg),
        vocab_size=config.padded_vocab_size(tp),
        max_sequence_length=config.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=config.tie_embeddings,
        position_embedding_type="rope",
        # a real number, as in transformers' configs (megatron-core's annotation says int, its
        # RotaryEmbedding raises whatever base it is given to the powers)
        rotary_base=config.rotary_base,
    )
    if config.use_rope_scaling and hasattr(model, "rotary_pos_emb"):
        model.rotary_pos_emb.inv_freq = rope_inverse_frequencies(config, model.rotary_pos_emb.inv_freq.device)
    return model


def rope_inverse_frequencies(config: ModelConfig, device=None) -> torch.Tensor:
    """RoPE's inverse frequencies with Llama 3.1's scaling, all four of its parameters as the
    model says. megatron-core's RotaryEmbedding takes only the factor and fixes the others (low
    1, high 4, original context 8192), so the builder sets the frequencies itself.

    Per frequency, by its wavelength 2 pi / f against the original context L: shorter than
    L / high_freq_factor, kept; longer than L / low_freq_factor, divided by the factor; in
    between, a linear blend of the two weighted by L / wavelength, from 0 at the long end
    to 1 at the short end.
    """
    dim = config.head_dim
    base = config.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    inv_freq = 1.0 / base
    factor, context = config.rope_scaling_factor, config.rope_original_max_position_embeddings
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    weight = ((context / wavelength - low) / (high - low)).clamp(0.0, 1.0)
    blended = (1 - weight) * inv_freq / factor + weight * inv_freq
    scaled = torch.where(wavelength > context / low, inv_freq / factor, blended)
    return torch.where(wavelength < context / high, inv_freq, scaled)
