"""Tiny models for tests: members of the family small enough for CPU tests, kept here rather
than among the library's presets (which hold the paper's models and real teachers)."""

from megatron_miniplm.models.config import ModelConfig
from megatron_miniplm.models.config import get_preset as library_preset

TEST_PRESETS = {
    "tiny": ModelConfig(name="tiny", num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
                        vocab_size=512, max_position_embeddings=512),
    "tiny-gqa": ModelConfig(name="tiny-gqa", num_layers=2, hidden_size=64, ffn_hidden_size=160,
                            num_attention_heads=4, num_query_groups=2, vocab_size=512, qkv_bias=False,
                            rotary_base=10_000.0, max_position_embeddings=512),
    "tiny-untied": ModelConfig(name="tiny-untied", num_layers=4, hidden_size=64, ffn_hidden_size=176,
                               num_attention_heads=4, vocab_size=512, tie_embeddings=False,
                               max_position_embeddings=512),
    # a mixture of 4 experts of inner size 48, top 2, in both layers
    "tiny-moe": ModelConfig(name="tiny-moe", num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
                            vocab_size=512, max_position_embeddings=512, num_experts=4, moe_router_topk=2,
                            moe_ffn_hidden_size=48),
}


def get_preset(name: str) -> ModelConfig:
    """A test model by name, else the library's preset."""
    return TEST_PRESETS[name] if name in TEST_PRESETS else library_preset(name)


def model_flags(name: str) -> list[str]:
    """tools/pretrain_gpt.py's model flags for a test model."""
    from megatron_miniplm.settings import to_argv

    return to_argv(TEST_PRESETS[name])
