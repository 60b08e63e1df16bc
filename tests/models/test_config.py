"""Presets build, their parameter counts match the published sizes, vocab padding, validation."""

import pytest

from megatron_miniplm.models.config import PRESETS, ModelConfig
from presets import get_preset
from megatron_miniplm.models.param_count import count_parameters


def analytic_count(c: ModelConfig) -> int:
    """Independent formula: attention + SwiGLU MLP + 2 RMSNorms per layer (and QK-norm's two of
    one head's width), final norm, embeddings."""
    width = c.kv_channels or c.hidden_size // c.num_attention_heads
    q = c.hidden_size * c.num_attention_heads * width
    kv = 2 * c.hidden_size * c.kv_heads * width
    bias = (c.num_attention_heads * width + 2 * c.kv_heads * width) if c.qkv_bias else 0
    out = c.num_attention_heads * width * c.hidden_size
    mlp = 3 * c.hidden_size * c.ffn_hidden_size
    norms = 2 * c.hidden_size + (2 * width if c.qk_layernorm else 0)
    layer = q + kv + bias + out + mlp + norms
    embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_embeddings else 2)
    return c.num_layers * layer + c.hidden_size + embeddings


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_with_the_expected_count(name):
    config = get_preset(name)
    count = count_parameters(config)  # builds the real GPTModel (on the meta device)
    assert count.total == analytic_count(config)
    assert count.total == count.embedding + count.non_embedding
    assert count.padded_total >= count.total


@pytest.mark.parametrize("name", [n for n, c in PRESETS.items() if c.published_params])
def test_published_sizes_within_3_percent(name):
    config = get_preset(name)
    total = count_parameters(config).total
    assert abs(total - config.published_params) / config.published_params < 0.03, total


def test_cross_family_student_and_new_teachers():
    """The paper's Llama-3.1 student is 212M with its tied embedding; Qwen3-0.6B's published
    0.44B leaves out its embedding; a Mamba student is refused with the reason."""
    assert count_parameters(get_preset("llama3.1-212M")).total == 211_766_016
    qwen3 = count_parameters(get_preset("qwen3-0.6B"))
    assert round(qwen3.non_embedding / 1e7) == 44
    with pytest.raises(ValueError, match="mamba-130M.*megatron-core's Mamba layers need GPU kernels"):
        get_preset("mamba-130M")


def test_paper_sizes_include_embeddings():
    """MiniPLM's 104M reference is 104M only with its (tied) embedding matrix counted."""
    count = count_parameters(get_preset("qwen-104M"))
    assert count.non_embedding < 30e6 < 100e6 < count.total


@pytest.mark.parametrize("name", list(PRESETS))
def test_padded_vocab_divisible_and_layout_independent(name):
    config = get_preset(name)
    sizes = {config.padded_vocab_size(tp) for tp in (1, 2, 4, 8)}
    assert len(sizes) == 1  # resharding across TP 1..8 keeps the embedding shape
    size = sizes.pop()
    assert size >= config.vocab_size and all(size % tp == 0 for tp in (1, 2, 4, 8))
    assert config.padded_vocab_size(3) % 3 == 0


def test_unpadded_vocab_is_padded_to_128():
    config = get_preset("tiny").replace(vocab_size=1000)
    assert config.padded_vocab_size() == 1024


def test_tensor_parallel_must_divide_heads():
    config = get_preset("smollm2-135M")  # 9 heads, 3 kv heads
    config.check_tensor_parallel(3)
    with pytest.raises(ValueError, match="does not divide the 9 attention heads"):
        config.check_tensor_parallel(2)


def test_invalid_shapes_are_refused():
    with pytest.raises(ValueError, match="not divisible by 5 attention heads"):
        ModelConfig(num_layers=1, hidden_size=64, ffn_hidden_size=64, num_attention_heads=5, vocab_size=10)
    with pytest.raises(ValueError, match="not divisible by 3 key/value heads"):
        ModelConfig(num_layers=1, hidden_size=64, ffn_hidden_size=64, num_attention_heads=4,
                    num_query_groups=3, vocab_size=10)


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="qwen-200M"):
        get_preset("nope")


def test_config_json_round_trip(tmp_path):
    config = get_preset("smollm2-135M")
    config.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == config
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**config.to_dict(), "bogus": 1})
