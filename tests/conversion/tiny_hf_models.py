"""Tiny random Qwen2 / Llama / Qwen3 / Mistral models and a word-level tokenizer, written as HF directories.

Created with transformers' own config and model classes, so no download is
needed; every parameter (norms and biases included) is randomised so that a
mapping mistake anywhere changes the logits.
"""

from __future__ import annotations

import os

import torch

VOCAB = 300  # not a multiple of 128: the megatron side pads to 384
EOD = "<|endoftext|>"

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
MODELS = {
    # Qwen1.5 style: multi-head attention, QKV bias, untied embeddings.
    "qwen1.5": dict(arch="qwen2", num_key_value_heads=4, tie_word_embeddings=False),
    # Qwen2 style: GQA, QKV bias, tied embeddings.
    "qwen2": dict(arch="qwen2", num_key_value_heads=2, tie_word_embeddings=True),
    # SmolLM2 style: Llama, GQA, no bias, tied embeddings.
    "llama": dict(arch="llama", num_key_value_heads=2, tie_word_embeddings=True),
    # Qwen3 style: QK-norm, heads wider than hidden / heads, GQA, untied.
    "qwen3": dict(arch="qwen3", num_key_value_heads=2, tie_word_embeddings=False, head_dim=24),
    # Llama 3.1 style: RoPE scaling of the llama3 kind, GQA, untied. The original context (64) is
    # shorter than random_tokens' sequences, and with RoPE base 5e5 and head width 16 the
    # frequencies fall in all three of its bands: kept (wavelength 6.3), blended (32), scaled.
    "llama3.1": dict(arch="llama", num_key_value_heads=2, tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE),
    # Llama 3.2 style: as 3.1 with factor 32 and tied embeddings.
    "llama3.2": dict(arch="llama", num_key_value_heads=2, tie_word_embeddings=True,
                     rope_parameters=dict(LLAMA3_ROPE, factor=32.0)),
    # Mistral style: an attention window the sequences fit, heads wider than hidden / heads, GQA.
    "mistral": dict(arch="mistral", num_key_value_heads=2, tie_word_embeddings=False, head_dim=24,
                    sliding_window=128),
    # Qwen3-MoE style: 4 experts of inner size 32, top-2, weights renormalised over the two.
    "qwen3-moe": dict(arch="qwen3_moe", num_key_value_heads=2, tie_word_embeddings=False, head_dim=24, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    # Mixtral style: 4 experts of inner size 160, top-2, an attention window the sequences fit.
    "mixtral": dict(arch="mixtral", num_key_value_heads=2, tie_word_embeddings=False, num_local_experts=4,
                    num_experts_per_tok=2, sliding_window=128),
}
# Per architecture: its RoPE base and norm epsilon, as in the models each one stands for.
ARCHS = {"qwen2": dict(rope_theta=1e6, eps=1e-6), "llama": dict(rope_theta=1e4, eps=1e-5),
         "qwen3": dict(rope_theta=1e6, eps=1e-6), "mistral": dict(rope_theta=1e6, eps=1e-5),
         "qwen3_moe": dict(rope_theta=1e6, eps=1e-6), "mixtral": dict(rope_theta=1e6, eps=1e-5)}
CLASSES = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "llama": ("LlamaConfig", "LlamaForCausalLM"),
           "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
           "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"), "mixtral": ("MixtralConfig", "MixtralForCausalLM")}


def variant_config(arch: str, *, num_key_value_heads: int, tie_word_embeddings: bool, **extra):
    """A tiny transformers config of ``arch`` (qwen2: QKV bias; llama, qwen3, mistral: no bias);
    ``extra``: settings of that architecture (head_dim, rope_parameters, sliding_window)."""
    import transformers

    config_class, architecture = CLASSES[arch]
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=num_key_value_heads,
        max_position_embeddings=256, rms_norm_eps=ARCHS[arch]["eps"],
        tie_word_embeddings=tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": ARCHS[arch]["rope_theta"]},
        bos_token_id=0, eos_token_id=0,
    )
    if arch in ("mistral", "mixtral"):
        common["head_dim"] = None  # MistralConfig's default is 128, not hidden / heads
    common.update(extra)
    return getattr(transformers, config_class)(architectures=[architecture], **common)


def hf_config(name: str):
    spec = dict(MODELS[name])
    return variant_config(spec.pop("arch"), **spec)


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


def random_tokens(batch: int = 2, seq: int = 96, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)
