"""Typed model configs and the named presets of the paper, its teachers, and tests.

All models are decoder-only transformers of the Qwen / Llama / Mistral family: RMSNorm,
SwiGLU MLP (optionally a mixture of SwiGLU experts), RoPE (optionally with Llama 3's
frequency scaling), no bias except (optionally) on the QKV projection, optionally RMSNorm
on each query and key head (Qwen3's QK-norm).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Optional

from megatron_miniplm.settings import setting


MODEL = "model"


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int = setting(group=MODEL, help="transformer layers")
    hidden_size: int = setting(group=MODEL, help="hidden size")
    ffn_hidden_size: int = setting(group=MODEL, help="SwiGLU inner size")
    num_attention_heads: int = setting(group=MODEL, help="attention heads")
    vocab_size: int = setting(group=MODEL, help="vocabulary size before padding (default: the data's)")
    num_query_groups: Optional[int] = setting(
        None, group=MODEL, help="key/value heads (GQA); default: one per attention head")
    max_position_embeddings: int = setting(4096, group=MODEL, help="longest sequence the model takes")
    rotary_base: float = setting(1_000_000.0, group=MODEL, help="RoPE base (Qwen's)")
    norm_epsilon: float = setting(1e-6, group=MODEL, help="RMSNorm epsilon")
    qkv_bias: bool = setting(True, group=MODEL, flag="--no-add-qkv-bias",
                             help="no bias on the QKV projection (Qwen has one, Llama does not)")
    tie_embeddings: bool = setting(True, group=MODEL, flag="--untie-embeddings-and-output-weights",
                                   help="an output layer of its own instead of the input embedding")
    init_method_std: float = setting(0.02, group=MODEL, help="standard deviation of the initial weights")
    kv_channels: Optional[int] = setting(
        None, group=MODEL, help="width of each attention head (default: hidden size / attention heads; Qwen3's "
                                "heads are wider)")
    qk_layernorm: bool = setting(False, group=MODEL, help="RMSNorm on each query and key head before RoPE (Qwen3)")
    use_rope_scaling: bool = setting(
        False, group=MODEL, help="Llama 3.1's RoPE frequency scaling (rope_type llama3): long wavelengths divided by "
                                 "--rope-scaling-factor, short ones kept, a smooth blend between")
    rope_scaling_factor: float = setting(8.0, group=MODEL, help="with --use-rope-scaling: the factor")
    rope_low_freq_factor: float = setting(
        1.0, group=MODEL, help="with --use-rope-scaling: wavelengths above original context / this are scaled "
                               "(Megatron-LM fixes it at 1)")
    rope_high_freq_factor: float = setting(
        4.0, group=MODEL, help="with --use-rope-scaling: wavelengths below original context / this are kept "
                               "(Megatron-LM fixes it at 4)")
    rope_original_max_position_embeddings: int = setting(
        8192, group=MODEL, help="with --use-rope-scaling: the context the RoPE frequencies were made for "
                                "(Megatron-LM fixes it at 8192)")
    sliding_window: Optional[int] = setting(
        None, group=MODEL, help="the model's attention window (Mistral): it runs only sequences that fit the window, "
                                "where its attention is plain causal attention (unlike Megatron-LM's --window-size, "
                                "no windowed kernel)")
    num_experts: Optional[int] = setting(
        None, group=MODEL, help="experts of every layer's mixture-of-experts MLP (Qwen3-MoE, Mixtral); default: "
                                "a dense MLP")
    moe_router_topk: int = setting(2, group=MODEL, help="with --num-experts: experts each token is routed to")
    moe_ffn_hidden_size: Optional[int] = setting(
        None, group=MODEL, help="with --num-experts: each expert's SwiGLU inner size (default: --ffn-hidden-size)")
    moe_router_pre_softmax: bool = setting(
        False, group=MODEL, help="with --num-experts: the top-k experts weighted by their softmax over all experts "
                                 "(Qwen3-MoE's norm_topk_prob false); default: by the softmax over the chosen "
                                 "experts' logits (Mixtral, Qwen3-MoE)")
    make_vocab_size_divisible_by: int = setting(
        128, group=MODEL, help="pad the vocabulary to a multiple of this (x TP where TP does not divide it)")
    name: str = "custom"
    # Published size, in parameters, for the report; None where the paper's
    # name is nominal rather than a count (see PRESET_NOTES).
    published_params: Optional[int] = None

    def __post_init__(self):
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden size {self.hidden_size} is not divisible by "
                f"{self.num_attention_heads} attention heads"
            )
        if self.num_attention_heads % self.kv_heads != 0:
            raise ValueError(
                f"{self.num_attention_heads} attention heads are not divisible by "
                f"{self.kv_heads} key/value heads"
            )

    @property
    def kv_heads(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def expert_ffn_hidden_size(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def check_attention_window(self, seq_length: int) -> None:
        """Refuses sequences longer than the model's attention window: there windowed attention
        differs from causal attention, and the layers built here have no window."""
        if self.sliding_window is not None and seq_length > self.sliding_window:
            raise ValueError(
                f"sequence length {seq_length} exceeds the {self.sliding_window}-token sliding attention window of "
                f"model '{self.name}': it is computed exactly only where a sequence fits the window (plain causal "
                f"attention there); use sequences of at most {self.sliding_window} tokens")

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        """Vocabulary padded so that TP divides it.

        The padding multiple does not depend on TP when TP divides
        ``make_vocab_size_divisible_by`` (TP = 1, 2, 4, 8 with the default 128),
        so a checkpoint keeps its shapes when resharded across those sizes.
        """
        multiple = self.make_vocab_size_divisible_by
        if multiple % tensor_parallel_size != 0:
            multiple *= tensor_parallel_size
        return -(-self.vocab_size // multiple) * multiple

    def check_tensor_parallel(self, tensor_parallel_size: int) -> None:
        for what, count in (("attention heads", self.num_attention_heads),
                            ("key/value heads", self.kv_heads)):
            if count % tensor_parallel_size != 0:
                raise ValueError(
                    f"tensor-model-parallel-size {tensor_parallel_size} does not divide the "
                    f"{count} {what} of model '{self.name}'"
                )

    def check_expert_parallel(self, expert_parallel_size: int) -> None:
        """Refuses an expert-model-parallel-size that does not divide the experts (or a model
        without experts to split)."""
        if expert_parallel_size == 1:
            return
        if not self.num_experts:
            raise ValueError(f"expert-model-parallel-size {expert_parallel_size}: model '{self.name}' has no "
                             f"experts to split (a dense MLP)")
        if self.num_experts % expert_parallel_size:
            raise ValueError(f"expert-model-parallel-size {expert_parallel_size} does not divide the "
                             f"{self.num_experts} experts of model '{self.name}'")

    def describe_experts(self, expert_parallel_size: int) -> str:
        """How the experts are placed: 'experts: 8 over EP 2 (4 per rank), top 2'."""
        n = self.num_experts
        return f"experts: {n} over EP {expert_parallel_size} ({n // expert_parallel_size} per rank), top {self.moe_router_topk}"

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**data)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str) -> "ModelConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))


QWEN_VOCAB = 151_936
SMOLLM_VOCAB = 49_152


LLAMA3_VOCAB = 128_256
# Llama 3.1's RoPE: base 500,000, frequencies scaled for a context 8x its original 8,192 (Llama 3.2: 32x).
_LLAMA31_ROPE = dict(rotary_base=500_000.0, use_rope_scaling=True, rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
                     rope_high_freq_factor=4.0, rope_original_max_position_embeddings=8192)
def _qwen(name, hidden, ffn, layers, heads, *, tied=True, published=None) -> ModelConfig:
    return ModelConfig(
        name=name, num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
        num_attention_heads=heads, vocab_size=QWEN_VOCAB, qkv_bias=True,
        tie_embeddings=tied, rotary_base=1_000_000.0, max_position_embeddings=32768,
        published_params=published,
    )


PRESETS: dict[str, ModelConfig] = {
    # MiniPLM's reference model and students (the method doc's table). Tied embeddings
    # up to 500M, as in MiniPLM's released student configs (counts include the embedding
    # matrix once); untied at 1.2B, as its released checkpoint.
    "qwen-104M": _qwen("qwen-104M", 512, 1408, 8, 8, published=104_000_000),
    "qwen-200M": _qwen("qwen-200M", 768, 2112, 12, 12, published=200_000_000),
    "qwen-300M": _qwen("qwen-300M", 768, 2112, 18, 12),
    "qwen-500M": _qwen("qwen-500M", 1024, 2816, 24, 16),
    # The released 1.2B student has untied embeddings (its checkpoint holds 1.16B parameters).
    "qwen-1.2B": _qwen("qwen-1.2B", 1536, 4224, 24, 16, tied=False, published=1_160_000_000),
    # Teachers, as published by Qwen (untied embeddings).
    "qwen1.5-0.5B": _qwen("qwen1.5-0.5B", 1024, 2816, 24, 16, tied=False, published=620_000_000),
    "qwen1.5-1.8B": _qwen("qwen1.5-1.8B", 2048, 5504, 24, 16, tied=False, published=1_840_000_000),
    "qwen1.5-4B": _qwen("qwen1.5-4B", 2560, 6912, 40, 20, tied=False, published=3_950_000_000),
    # Llama style with GQA and tied embeddings: the demo's real teacher.
    "smollm2-135M": ModelConfig(
        name="smollm2-135M", num_layers=30, hidden_size=576, ffn_hidden_size=1536,
        num_attention_heads=9, num_query_groups=3, vocab_size=SMOLLM_VOCAB,
        rotary_base=100_000.0, norm_epsilon=1e-5, qkv_bias=False, tie_embeddings=True,
        max_position_embeddings=8192, init_method_std=0.041666666666666664,
        published_params=135_000_000,
    ),
    # MiniPLM's cross-family student: Llama 3.1's architecture and tokenizer, 12 layers of width 768
    # with multi-head attention and tied embeddings (see PRESET_NOTES).
    "llama3.1-212M": ModelConfig(
        name="llama3.1-212M", num_layers=12, hidden_size=768, ffn_hidden_size=3072, num_attention_heads=12,
        vocab_size=LLAMA3_VOCAB, norm_epsilon=1e-5, qkv_bias=False, tie_embeddings=True,
        max_position_embeddings=131_072, published_params=212_000_000, **_LLAMA31_ROPE),
    # Teachers of today's families, as published.
    "llama3.2-1B": ModelConfig(
        name="llama3.2-1B", num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32,
        num_query_groups=8, vocab_size=LLAMA3_VOCAB, norm_epsilon=1e-5, qkv_bias=False, tie_embeddings=True,
        max_position_embeddings=131_072, published_params=1_240_000_000,
        **dict(_LLAMA31_ROPE, rope_scaling_factor=32.0)),
    "qwen3-0.6B": ModelConfig(
        name="qwen3-0.6B", num_layers=28, hidden_size=1024, ffn_hidden_size=3072, num_attention_heads=16,
        num_query_groups=8, kv_channels=128, qk_layernorm=True, vocab_size=QWEN_VOCAB, qkv_bias=False,
        tie_embeddings=True, rotary_base=1_000_000.0, max_position_embeddings=40_960,
        published_params=600_000_000),
}

# Students of other architectures the paper trains, refused with the reason.
REFUSED_PRESETS = {
    "mamba-130M": "the paper's Mamba student is not built here: megatron-core's Mamba layers need GPU kernels "
                  "(mamba-ssm's selective scan, causal-conv1d) that neither run on a CPU nor are tested here; "
                  "llama3.1-212M is the paper's other cross-family student",
}

PRESET_NOTES = {
    "llama3.1-212M": "the paper's Llama-3.1 student, shape inferred (its config.json is on the HF hub, not in "
                     "MiniPLM's repository): Llama 3.1 at width 768 with tied embeddings gives 212M",
    "qwen3-0.6B": "Qwen3's 0.6B: 0.44B without the (tied) embedding",
    "qwen-300M": "paper's name is nominal: the table's shape gives 247M with tied embeddings",
    "qwen-500M": "paper's name is nominal: the table's shape gives 464M tied (619M untied)",
    "qwen-1.2B": "the paper's 1.2B: its released checkpoint's 1.16B, with untied embeddings",
}


def model_from_spec(spec: dict, vocab_size: int = 1) -> ModelConfig:
    """A model mapping of the pipeline config (a preset and/or model settings) as a ModelConfig;
    a shape without a vocabulary gets ``vocab_size`` (the data's), as tools/pretrain_gpt.py's
    shape flags do."""
    values = {k: v for k, v in spec.items() if k != "preset"}
    if spec.get("preset"):
        return get_preset(spec["preset"]).replace(**values)
    shape = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads")
    missing = [k for k in shape if k not in values]
    if missing:
        raise ValueError(f"needs a preset or all of {', '.join(shape)} (missing {', '.join(missing)})")
    values.setdefault("vocab_size", vocab_size)
    return ModelConfig(**values)


def get_preset(name: str) -> ModelConfig:
    if name in REFUSED_PRESETS:
        raise ValueError(f"model preset '{name}': {REFUSED_PRESETS[name]}")
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset '{name}'; choose from: {', '.join(PRESETS)}") from None


IMPL = "implementation and fusions"
TRANSFORMER_IMPLS = ("transformer_engine", "local")
ATTENTION_BACKENDS = ("auto", "flash", "fused", "unfused", "local")  # Megatron-LM's AttnBackend
@dataclass(frozen=True)
class LayerImpl:
    """Which layers and attention kernels a model is built with, under Megatron-LM's flags.

    One deliberate difference from Megatron-LM: where Transformer Engine does not import
    (a CPU, an image without TE) ``transformer_engine`` falls back to megatron-core's local
    spec instead of failing, so that one command runs everywhere; the start-up line says
    which layers run and why.
    """

    transformer_impl: str = setting(
        "transformer_engine", group=IMPL, choices=TRANSFORMER_IMPLS,
        help="transformer_engine: Transformer Engine's layers and fused kernels (Megatron-LM's default; "
             "unlike Megatron-LM, megatron-core's local layers where TE does not import); local: megatron-core's "
             "local layers")
    attention_backend: str = setting(
        "auto", group=IMPL, choices=ATTENTION_BACKENDS,
        help="core attention. With TE: its flash, fused (cuDNN) or unfused kernels, auto lets TE choose, local is "
             "megatron-core's unfused attention. With local layers: flash is PyTorch SDPA held to its flash kernel, "
             "unfused and local megatron-core's attention, fused needs TE; auto is SDPA on a GPU and, on a CPU, "
             "whichever was measured faster there (megatron-core's for training, SDPA for scoring)")
    apply_rope_fusion: bool = setting(
        True, group=IMPL, flag="--no-rope-fusion",
        help="unfused RoPE (the fused kernel is Transformer Engine's: off where TE does not import)")

    def __post_init__(self):
        if self.transformer_impl not in TRANSFORMER_IMPLS:
            raise ValueError(f"transformer_impl (--transformer-impl) '{self.transformer_impl}': "
                             f"choose one of {', '.join(TRANSFORMER_IMPLS)}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend (--attention-backend) '{self.attention_backend}': "
                             f"choose one of {', '.join(ATTENTION_BACKENDS)}")
@dataclass(frozen=True)
class TrainingFusions:
    """Megatron-LM's fusions of the training step that have no effect on a forward-only model."""

    gradient_accumulation_fusion: bool = setting(
        True, group=IMPL, flag="--no-gradient-accumulation-fusion",
        help="weight gradients added to the fp32 main gradients by separate kernels (the fused form needs apex's "
             "fused_weight_gradient_mlp_cuda for the output layer, with or without TE: off without it)")
    cross_entropy_loss_fusion: bool = setting(
        False, group=IMPL, help="fused vocabulary-parallel cross entropy (as in Megatron-LM, off by default)")
    cross_entropy_fusion_impl: str = setting(
        "native", group=IMPL, choices=("native", "te"),
        help="native: megatron-core's fused cross entropy; te: Transformer Engine's")
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
