"""Model FLOPs per token and MFU, counted as Megatron-LM counts them.

Per token, for forward and backward (3 GEMMs per weight: forward, data and weight
gradients) at 2 FLOPs per multiply-add, so 6 x the multiply-adds of:

- attention, per layer: the QKV projection h x (q + 2 kv) with GQA's smaller k/v
  projections, the core attention q x s (QK^T and softmax(QK^T)V, each q x s / 2:
  causal, only half of the score matrix is computed), the output projection q x h;
- the SwiGLU MLP, per layer: 3 x h x ffn (gate, up and down projections); of a mixture of
  experts, those of the top-k experts a token is routed to (its active parameters) and the
  router's h x experts;
- the output layer: h x the padded vocabulary (what the GEMM really multiplies).

Embedding lookups, norms, softmax and the loss are not counted. The teacher of Vanilla
KD adds its forward pass: a third of its training FLOPs.
"""

from __future__ import annotations

from megatron_miniplm.models.config import ModelConfig

# Dense bf16 peak FLOP/s per device (no sparsity), most specific name first: matched
# against the CUDA device's name (platform.device_name(): "NVIDIA H100 80GB HBM3" is the SXM part,
# "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA A100-SXM4-80GB", ...).
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM5 (HBM3)
    ("A100-SXM4-80GB", 312e12), ("A100-SXM4-40GB", 312e12),
    ("A100 80GB PCIe", 312e12), ("A100-PCIE-40GB", 312e12), ("A100", 312e12),
    ("L40S", 362e12),
    ("A10", 125e12),
)


def training_flops_per_token(config: ModelConfig, seq_length: int, tensor_parallel_size: int = 1) -> float:
    """Training (forward + backward) matmul FLOPs per token of a sequence of seq_length."""
    h, s = config.hidden_size, seq_length
    q = config.num_attention_heads * config.head_dim
    kv = config.kv_heads * config.head_dim
    attention = h * (q + 2 * kv) + q * s + q * h
    mlp = 3 * h * config.ffn_hidden_size
    if config.num_experts:  # the experts a token is routed to, and the router
        mlp = 3 * h * config.expert_ffn_hidden_size * config.moe_router_topk + h * config.num_experts
    logits = h * config.padded_vocab_size(tensor_parallel_size)
    return 6.0 * (config.num_layers * (attention + mlp) + logits)


def kd_teacher_flops_per_token(teacher: ModelConfig, seq_length: int, tensor_parallel_size: int = 1) -> float:
    """The teacher's forward pass in Vanilla KD, per token: a third of its training FLOPs."""
    return training_flops_per_token(teacher, seq_length, tensor_parallel_size) / 3


def flops_matched_kd_iterations(iterations: int, student: ModelConfig, teacher: ModelConfig, seq_length: int,
                                tensor_parallel_size: int = 1) -> int:
    """Steps of a Vanilla KD student that spend the training FLOPs of ``iterations`` steps of the
    same student trained alone, its teacher's forward pass counted (the nearest whole step, at
    least one): the paper compares methods at equal training compute."""
    alone = training_flops_per_token(student, seq_length, tensor_parallel_size)
    with_teacher = alone + kd_teacher_flops_per_token(teacher, seq_length, tensor_parallel_size)
    return max(1, round(iterations * alone / with_teacher))


def peak_flops_of(device_name: str) -> float | None:
    """Dense bf16 peak of a CUDA device by its name; None when not in the table."""
    for key, peak in PEAK_BF16_FLOPS:
        if key in device_name:
            return peak
    return None


def device_peak_flops(override_tflops: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of this process's device (``override_tflops``: --peak-tflops);
    None when unknown (a CPU, or a GPU not in the table)."""
    if override_tflops:
        return override_tflops * 1e12
    from megatron_miniplm import platform

    name = platform.device_name()
    return peak_flops_of(name) if name else None
