"""Fused core attention through PyTorch SDPA (flash / memory-efficient kernels).

megatron-core's local ``DotProductAttention`` materialises the full [b, h, s, s]
score matrix. With megatron-core's local layers (no Transformer Engine) this module
takes its place in the layer spec: same constructor and forward signature, one
``scaled_dot_product_attention`` call. ``FlashSDPAttention`` is the same call held to
PyTorch's flash kernel (``--attention-backend flash``): where that kernel cannot take
the inputs, it raises instead of silently running another one.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPAttention(MegatronModule):
    """Causal self-attention over [s, b, heads, head_dim] tensors, GQA-aware."""

    kernels: Optional[tuple] = None  # SDPA's own choice

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism")
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor attention bias")
        seq, batch, heads, head_dim = query.shape
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask_type = attn_mask_type or self.attn_mask_type
        if attention_mask is None and mask_type == AttnMaskType.causal:
            mask, causal = None, True
        else:
            # megatron masks mark positions to *drop*; SDPA's boolean masks mark positions to keep.
            mask, causal = (None if attention_mask is None else ~attention_mask), False
        with self._kernels():
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal,
                dropout_p=self.dropout if self.training else 0.0,
                scale=self.softmax_scale, enable_gqa=k.shape[1] != heads,
            )
        # [b, h, s, d] -> [s, b, h * d]
        return context.permute(2, 0, 1, 3).reshape(seq, batch, heads * head_dim)

    def _kernels(self):
        return contextlib.nullcontext() if self.kernels is None else sdpa_kernel(list(self.kernels))


class FlashSDPAttention(SDPAttention):
    """SDPA on its flash kernel only."""

    kernels = (SDPBackend.FLASH_ATTENTION,)
