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
    "qwen1.5": dict(arch="qwen2", num_key_value_heads=4, tie_word_embeddings=False, rope_theta=1e6, eps=1e-6),
    # Qwen2 style: GQA, QKV bias, tied embeddings.
    "qwen2": dict(arch="qwen2", num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6, eps=1e-6),
    # SmolLM2 style: Llama, GQA, no bias, tied embeddings.
    "llama": dict(arch="llama", num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e4, eps=1e-5),
}


def hf_config(name: str):
    from transformers import LlamaConfig, Qwen2Config

    spec = MODELS[name]
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=spec["num_key_value_heads"],
        max_position_embeddings=256, rms_norm_eps=spec["eps"],
        tie_word_embeddings=spec["tie_word_embeddings"],
        rope_parameters={"rope_type": "default", "rope_theta": spec["rope_theta"]},
        bos_token_id=0, eos_token_id=0,
    )
    if spec["arch"] == "qwen2":
        return Qwen2Config(architectures=["Qwen2ForCausalLM"], **common)
    return LlamaConfig(architectures=["LlamaForCausalLM"], **common)


def make_model(name: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(name), dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
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


def save_hf(name: str, directory: str, seed: int = 0):
    """Write model + tokenizer as a HF directory; returns the model."""
    model = make_model(name, seed)
    model.save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    assert os.path.isfile(os.path.join(directory, "tokenizer.json"))
    return model


def random_tokens(batch: int = 2, seq: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)
