"""Tiny random Qwen2 / Llama models and a word-level tokenizer, written as HF directories.

Created with transformers' own config and model classes, so no download is
needed; every parameter (norms and biases included) is randomised so that a
mapping mistake anywhere changes the logits.
"""

from __future__ import annotations

import os

import torch

VOCAB = 300  # not a multiple of 128: the megatron side pads to 384
EOD = "<|endoftext|>"

MODELS = {
    # Qwen1.5 style: multi-head attention, QKV bias, untied embeddings.
    "qwen1.5": dict(arch="qwen2", num_key_value_heads=4, tie_word_embeddings=False),
    # Qwen2 style: GQA, QKV bias, tied embeddings.
    "qwen2": dict(arch="qwen2", num_key_value_heads=2, tie_word_embeddings=True),
    # SmolLM2 style: Llama, GQA, no bias, tied embeddings.
    "llama": dict(arch="llama", num_key_value_heads=2, tie_word_embeddings=True),
}
# Per architecture: its RoPE base and norm epsilon, as in the models each one stands for.
ARCHS = {"qwen2": dict(rope_theta=1e6, eps=1e-6), "llama": dict(rope_theta=1e4, eps=1e-5)}


def variant_config(arch: str, *, num_key_value_heads: int, tie_word_embeddings: bool):
    """A tiny transformers config of ``arch`` (qwen2: QKV bias; llama: no bias)."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=num_key_value_heads,
        max_position_embeddings=256, rms_norm_eps=ARCHS[arch]["eps"],
        tie_word_embeddings=tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": ARCHS[arch]["rope_theta"]},
        bos_token_id=0, eos_token_id=0,
    )
    if arch == "qwen2":
        return Qwen2Config(architectures=["Qwen2ForCausalLM"], **common)
    return LlamaConfig(architectures=["LlamaForCausalLM"], **common)


def hf_config(name: str):
    spec = MODELS[name]
    return variant_config(spec["arch"], num_key_value_heads=spec["num_key_value_heads"],
                          tie_word_embeddings=spec["tie_word_embeddings"])


def make_model(name_or_config, seed: int = 0, vocab_std: float = 0.08):
    """A model with every parameter random; ``vocab_std``: the std of the embedding and output
    matrices (larger: sharper next-token distributions, NLLs far from log V)."""
    from transformers import AutoModelForCausalLM

    config = hf_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "embed_tokens" in pname or "lm_head" in pname:
                p.copy_(vocab_std * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model.eval()


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {EOD: 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOD, unk_token="[UNK]")


def save_hf(name_or_config, directory: str, seed: int = 0, vocab_std: float = 0.08):
    """Write model + tokenizer as a HF directory; returns the model."""
    model = make_model(name_or_config, seed, vocab_std)
    model.save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    assert os.path.isfile(os.path.join(directory, "tokenizer.json"))
    return model


def random_tokens(batch: int = 2, seq: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)
