"""Model FLOPs per token and MFU, the way training-throughput tables count them."""

from __future__ import annotations

from megatron_miniplm.models.config import ModelConfig

# Dense bf16 peak FLOP/s per device (no sparsity).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def training_flops_per_token(config: ModelConfig, seq_length: int) -> float:
    """Forward + backward (3x forward) matmul FLOPs per token, causal attention at full cost."""
    h, kv = config.hidden_size, config.kv_heads * config.head_dim
    per_layer = 2 * h * (h + 2 * kv) + 2 * h * h + 3 * 2 * h * config.ffn_hidden_size
    attention = 2 * 2 * seq_length * h  # scores and context
    head = 2 * h * config.vocab_size
    return 3.0 * (config.num_layers * (per_layer + attention) + head)


def device_peak_flops(override_tflops: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of this process's device; None when unknown (e.g. CPU)."""
    if override_tflops:
        return override_tflops * 1e12
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in name:
            return peak
    return None
