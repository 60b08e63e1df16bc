"""A plain PyTorch GPT of the Qwen/Llama shape (RMSNorm, SwiGLU, RoPE, SDPA): the baseline.

Written the way a careful nanoGPT-style user would, to measure what megatron-core
costs or saves against it at the same shape, dtype and batch.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_miniplm.models.config import ModelConfig


def _rope(seq: int, dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Block(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.heads, self.kv, self.dim = c.num_attention_heads, c.kv_heads, c.head_dim
        self.norm1 = nn.RMSNorm(c.hidden_size, eps=c.norm_epsilon)
        self.qkv = nn.Linear(c.hidden_size, (self.heads + 2 * self.kv) * self.dim, bias=c.qkv_bias)
        self.proj = nn.Linear(c.hidden_size, c.hidden_size, bias=False)
        self.norm2 = nn.RMSNorm(c.hidden_size, eps=c.norm_epsilon)
        self.fc1 = nn.Linear(c.hidden_size, 2 * c.ffn_hidden_size, bias=False)
        self.fc2 = nn.Linear(c.ffn_hidden_size, c.hidden_size, bias=False)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(
            [self.heads * self.dim, self.kv * self.dim, self.kv * self.dim], dim=-1)
        q = _rotate(q.view(b, s, self.heads, self.dim).transpose(1, 2), cos, sin)
        k = _rotate(k.view(b, s, self.kv, self.dim).transpose(1, 2), cos, sin)
        v = v.view(b, s, self.kv, self.dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv != self.heads)
        x = x + self.proj(y.transpose(1, 2).reshape(b, s, -1))
        gate, up = self.fc1(self.norm2(x)).chunk(2, dim=-1)
        return x + self.fc2(F.silu(gate) * up)


class PlainGPT(nn.Module):
    def __init__(self, c: ModelConfig, seq_length: int):
        super().__init__()
        self.embed = nn.Embedding(c.padded_vocab_size(), c.hidden_size)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.norm = nn.RMSNorm(c.hidden_size, eps=c.norm_epsilon)
        self.head = nn.Linear(c.hidden_size, c.padded_vocab_size(), bias=False)
        if c.tie_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = _rope(seq_length, c.head_dim, c.rotary_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=c.init_method_std)

    def forward(self, tokens, labels, loss_mask):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, self.cos, self.sin)
        logits = self.head(self.norm(x)).float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
        mask = loss_mask.reshape(-1)
        return (nll * mask).sum() / mask.sum()
