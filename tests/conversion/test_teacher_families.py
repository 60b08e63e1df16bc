"""What the newer teacher families add, against transformers' own code: Llama 3.1's RoPE
scaling (frequencies and its effect beyond the original context), Mistral's attention window
(exact where the sequence fits it, refused where it does not), Qwen3's QK-norm, the experts of
Qwen3-MoE and Mixtral (both router weightings), and a refusal naming each feature
megatron-core's GPT cannot express. tests/conversion/test_convert_checkpoint.py runs every
family through the tool (NLL at TP=1/2, PP=2, round trip)."""

import os

import pytest
import torch
import torch.nn.functional as F

import tiny_hf_models as tiny
from megatron_miniplm.conversion import mapping
from megatron_miniplm.conversion.errors import ConversionError
from megatron_miniplm.conversion.hf_config import hf_config_from_model_config, layout_of, model_config_from_hf

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)


@pytest.fixture(scope="module")
def world_of_one():
    from megatron_miniplm import parallel
    from megatron_miniplm.conversion.session import RENDEZVOUS_ENV, restore_env

    saved = {k: os.environ.get(k) for k in RENDEZVOUS_ENV}
    parallel.initialize(parallel.ParallelConfig(seed=5))
    yield
    parallel.destroy()
    restore_env(saved)


def converted(hf_model, config=None):
    """The megatron model of an HF model (``config``: another ModelConfig for the same weights)."""
    from megatron_miniplm.conversion.hf_to_megatron import copy_into
    from megatron_miniplm.models.gpt import PLAIN_LOCAL, build_model

    config = config or model_config_from_hf(hf_model.config, "t")
    model = build_model(config, impl=PLAIN_LOCAL, initialize=False, device="cpu")
    copy_into(model, mapping.hf_to_megatron(dict(hf_model.state_dict()), config))
    return model.eval()


def nll(logits, tokens):
    return F.cross_entropy(logits[:, :-1, : tiny.VOCAB].transpose(1, 2), tokens[:, 1:], reduction="none")


def megatron_nll(model, tokens):
    with torch.no_grad():
        return nll(model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None), tokens)


def hf_nll(model, tokens):
    with torch.no_grad():
        return nll(model(tokens).logits, tokens)


# --- Llama 3.x RoPE scaling ----------------------------------------------------------

def test_llama3_inverse_frequencies_equal_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_miniplm.models.gpt import rope_inverse_frequencies

    hf = tiny.hf_config("llama3.1")
    ours = rope_inverse_frequencies(model_config_from_hf(hf, "t"))
    want, scale = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    assert scale == 1.0
    torch.testing.assert_close(ours, want, rtol=0, atol=0)
    # the test model's frequencies fall in each of the three bands: kept, blended, divided
    plain = 1.0 / (5e5 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    ratio = ours / plain
    assert ratio[0] == 1.0 and 1 / 8 < ratio[1] < 1.0 and torch.allclose(ratio[2:], torch.tensor(1 / 8))


def test_rope_scaling_counts_beyond_the_original_context(world_of_one):
    """Our model matches transformers at positions past the original context (64), and the same
    weights without the scaling would not: the comparison exercises it."""
    hf = tiny.make_model("llama3.1")
    tokens = tiny.random_tokens()
    assert tokens.shape[1] > hf.config.rope_parameters["original_max_position_embeddings"]
    config = model_config_from_hf(hf.config, "t")
    ref = hf_nll(hf, tokens)
    torch.testing.assert_close(megatron_nll(converted(hf, config), tokens), ref, rtol=0, atol=1e-5)
    unscaled = megatron_nll(converted(hf, config.replace(use_rope_scaling=False)), tokens)
    assert (unscaled - ref)[:, 64:].abs().max() > 1e-2


def test_a_rope_base_that_is_not_a_whole_number_is_kept(world_of_one):
    """The RoPE base is a real number in transformers' configs: a fractional one is not truncated."""
    config = tiny.variant_config("llama", num_key_value_heads=2, tie_word_embeddings=False,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1234.5})
    hf = tiny.make_model(config)
    tokens = tiny.random_tokens()
    ours = model_config_from_hf(hf.config, "t")
    assert ours.rotary_base == 1234.5
    torch.testing.assert_close(megatron_nll(converted(hf, ours), tokens), hf_nll(hf, tokens), rtol=0, atol=1e-5)


def test_megatron_fixed_parameters_would_differ():
    """megatron-core's own scaling fixes the original context at 8192: it is not used."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_miniplm.models.gpt import rope_inverse_frequencies

    config = model_config_from_hf(tiny.hf_config("llama3.1"), "t")
    theirs = RotaryEmbedding(16, 1.0, rotary_base=500000, rope_scaling=True, rope_scaling_factor=8.0,
                             use_cpu_initialization=True).inv_freq
    assert not torch.allclose(theirs, rope_inverse_frequencies(config))


# --- Mistral's attention window --------------------------------------------------------

def test_mistral_window_shorter_than_the_sequence_changes_the_result(world_of_one):
    """Where the sequence fits the window the model is exact (test_convert_checkpoint); a window
    shorter than the sequence would change transformers' result, hence the refusal."""
    hf = tiny.make_model("mistral")
    tokens = tiny.random_tokens()
    ours = megatron_nll(converted(hf), tokens)
    torch.testing.assert_close(ours, hf_nll(hf, tokens), rtol=0, atol=1e-5)
    hf.config.sliding_window = 16
    assert (hf_nll(hf, tokens) - ours).abs().max() > 1e-3


def test_sequences_longer_than_the_window_are_refused():
    config = model_config_from_hf(tiny.hf_config("mistral"), "mistral-tiny")
    assert config.sliding_window == 128
    config.check_attention_window(128)
    with pytest.raises(ValueError, match="sequence length 129 exceeds the 128-token sliding attention window "
                                         "of model 'mistral-tiny'"):
        config.check_attention_window(129)


def test_qwen_sliding_layers_carry_the_window():
    from transformers import Qwen2Config, Qwen3Config

    # transformers slides only layers from max_window_layers on: here none, then the second
    none = Qwen2Config(use_sliding_window=True, sliding_window=64, max_window_layers=28, **SMALL)
    assert model_config_from_hf(none, "x").sliding_window is None
    some = Qwen3Config(use_sliding_window=True, sliding_window=64, max_window_layers=1, **SMALL)
    assert model_config_from_hf(some, "x").sliding_window == 64


@pytest.mark.parametrize("arch,layout", [("qwen2", "qwen2"), ("qwen3", "qwen3")])
def test_qwen_layouts_export_a_window(world_of_one, arch, layout):
    """A model with a window exports to Qwen2 / Qwen3 with every layer sliding: transformers computes
    the megatron model's NLLs from it, and it reads back as the same model. A Qwen2-style model with
    a window (QKV bias) exports to Qwen2 by default (Mistral has no bias)."""
    from transformers import AutoModelForCausalLM

    from megatron_miniplm.conversion.megatron_to_hf import choose_layout

    spec = dict(tiny.MODELS[arch])
    hf = tiny.make_model(tiny.variant_config(spec.pop("arch"), use_sliding_window=True, sliding_window=96,
                                             max_window_layers=1, **spec))
    ours = model_config_from_hf(hf.config, "t")
    assert ours.sliding_window == 96 and choose_layout("auto", ours, None) == layout
    model = converted(hf, ours)
    exported = hf_config_from_model_config(ours, layout)
    assert exported.layer_types == ["sliding_attention"] * 2 and exported.sliding_window == 96
    back = AutoModelForCausalLM.from_config(exported, dtype=torch.float32, attn_implementation="eager").eval()
    state = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    back.load_state_dict(mapping.megatron_to_hf(state, ours, layout), strict=not ours.tie_embeddings)
    tokens = tiny.random_tokens()
    torch.testing.assert_close(hf_nll(back, tokens), megatron_nll(model, tokens), rtol=0, atol=1e-5)
    assert model_config_from_hf(exported, "t") == ours


# --- Qwen3 -------------------------------------------------------------------------------

def test_qwen3_qk_norm_and_head_width_are_mapped(world_of_one):
    hf = tiny.make_model("qwen3")
    config = model_config_from_hf(hf.config, "t")
    assert config.qk_layernorm and config.kv_channels == 24 and config.head_dim == 24
    model = converted(hf, config)
    attention = model.decoder.layers[1].self_attention
    assert torch.equal(attention.k_layernorm.weight, hf.model.layers[1].self_attn.k_norm.weight)
    # the norms count: without them the result is another
    tokens = tiny.random_tokens()
    with torch.no_grad():
        attention.q_layernorm.weight.fill_(1.0)
    assert (megatron_nll(model, tokens) - hf_nll(hf, tokens)).abs().max() > 1e-3


def test_flops_count_the_head_width():
    from megatron_miniplm.training.flops import training_flops_per_token

    config = model_config_from_hf(tiny.hf_config("qwen3"), "t")
    narrow = config.replace(kv_channels=None)
    h, q, kv, s = 64, 4 * 24, 2 * 24, 10
    per_layer = h * (q + 2 * kv) + q * s + q * h + 3 * h * 160
    want = 6.0 * (2 * per_layer + h * config.padded_vocab_size())
    assert training_flops_per_token(config, s) == want
    assert training_flops_per_token(narrow, s) < want


# --- refusals, each by name ---------------------------------------------------------------

@pytest.mark.parametrize("config_class,architecture,message", [
    ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", "a shared expert with a sigmoid gate"),
    ("Gemma2Config", "Gemma2ForCausalLM", "logit soft-capping, post-norms"),
    ("MambaConfig", "MambaForCausalLM", "Mamba layers: megatron-core's need GPU kernels"),
])
def test_unsupported_architectures_are_refused_with_the_reason(config_class, architecture, message):
    import transformers

    config = getattr(transformers, config_class)(architectures=[architecture])
    with pytest.raises(ConversionError, match=f"unsupported architecture {architecture} .*{message}"):
        layout_of(config)


@pytest.mark.parametrize("config_class,settings,message", [
    ("LlamaConfig", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
     "RoPE scaling 'yarn' is not supported"),
    ("LlamaConfig", dict(rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e4}),
     "RoPE scaling 'dynamic' is not supported"),
    ("Qwen3Config", dict(attention_bias=True), "attention_bias"),
    ("LlamaConfig", dict(mlp_bias=True), "bias on the MLP"),
    ("MistralConfig", dict(hidden_act="gelu"), "activation 'gelu'"),
    ("Qwen3Config", dict(layer_types=["full_attention", "chunked_attention"]), "layer types"),
    ("LlamaConfig", dict(final_logit_softcapping=30.0), "logit soft-capping"),
    ("Qwen3MoeConfig", dict(mlp_only_layers=[1]), "dense MLP layers among the expert layers"),
    ("Qwen3MoeConfig", dict(decoder_sparse_step=2), "dense MLP layers among the expert layers"),
    ("MixtralConfig", dict(num_experts_per_tok=1), "top-1 routing with the chosen expert's weight renormalised"),
    ("Qwen3MoeConfig", dict(num_experts_per_tok=1, norm_topk_prob=True), "top-1 routing with the chosen expert's"),
])
def test_unsupported_features_are_refused_by_name(config_class, settings, message):
    import transformers

    config = getattr(transformers, config_class)(**SMALL)
    for key, value in settings.items():
        setattr(config, key, value)
    with pytest.raises(ConversionError, match=message):
        model_config_from_hf(config, "x")


def test_swish_is_silu(world_of_one):
    """transformers' 'swish' is SiLU itself: a model that names it converts, exactly."""
    hf = tiny.make_model(tiny.variant_config("llama", num_key_value_heads=2, tie_word_embeddings=True,
                                             hidden_act="swish"))
    tokens = tiny.random_tokens()
    torch.testing.assert_close(megatron_nll(converted(hf), tokens), hf_nll(hf, tokens), rtol=0, atol=1e-5)


def test_export_refuses_a_layout_without_the_model_features():
    config = model_config_from_hf(tiny.hf_config("qwen3"), "t")
    with pytest.raises(ConversionError, match="--hf-architecture llama cannot hold the model's QK-norm"):
        hf_config_from_model_config(config, "llama")
    mistral = model_config_from_hf(tiny.hf_config("mistral"), "t")
    with pytest.raises(ConversionError, match="sliding attention window"):
        hf_config_from_model_config(mistral, "llama")


# --- the paper's cross-family student ---------------------------------------------------------

def test_llama31_student_preset_exports_as_llama_3_1():
    """The Llama-3.1 student keeps its own vocabulary whatever the data's (the students' tokenizer
    path), exports to Llama's layout with Llama 3.1's RoPE, and reads back as itself."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_miniplm.conversion.megatron_to_hf import choose_layout
    from megatron_miniplm.models.config import model_from_spec
    from megatron_miniplm.models.gpt import rope_inverse_frequencies

    config = model_from_spec({"preset": "llama3.1-212M"}, vocab_size=600)
    assert config.vocab_size == 128_256
    layout = choose_layout("auto", config, None)
    assert layout == "llama"
    hf = hf_config_from_model_config(config, layout)
    assert hf.rope_parameters == {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    torch.testing.assert_close(rope_inverse_frequencies(config), ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")[0],
                               rtol=0, atol=0)
    assert model_config_from_hf(hf, config.name) == config.replace(published_params=None)


def test_model_card_names_the_family_features():
    from megatron_miniplm.evaluation.model_card import _family_rows

    rows = dict(_family_rows(model_config_from_hf(tiny.hf_config("qwen3"), "t")))
    assert rows == {"Head width": 24, "QK-norm": "yes (RMSNorm per query and key head)"}
    rows = dict(_family_rows(model_config_from_hf(tiny.hf_config("llama3.1"), "t")))
    assert rows["RoPE scaling"] == "llama3: factor 8, low/high frequency factors 1/4, original context 64"
    assert dict(_family_rows(model_config_from_hf(tiny.hf_config("mistral"), "t")))["Attention window"] == "128 tokens"
    assert _family_rows(model_config_from_hf(tiny.hf_config("llama"), "t")) == []
    assert dict(_family_rows(model_config_from_hf(tiny.hf_config("mixtral"), "t")))["Experts"] == "4 of FFN 160, top 2"


# --- mixtures of experts ---------------------------------------------------------------------

def test_qwen3_moe_router_weights_over_all_experts(world_of_one):
    """norm_topk_prob false: the chosen experts weighted by their softmax over all experts
    (megatron-core's pre-softmax router); the default weighting would give another result."""
    config = tiny.hf_config("qwen3-moe")
    config.norm_topk_prob = False
    hf = tiny.make_model(config)
    ours = model_config_from_hf(hf.config, "t")
    assert ours.moe_router_pre_softmax and ours.num_experts == 4 and ours.moe_router_topk == 2
    tokens = tiny.random_tokens()
    ref = hf_nll(hf, tokens)
    torch.testing.assert_close(megatron_nll(converted(hf, ours), tokens), ref, rtol=0, atol=1e-5)
    other = megatron_nll(converted(hf, ours.replace(moe_router_pre_softmax=False)), tokens)
    assert (other - ref).abs().max() > 1e-3


def test_qwen3_moe_top_1_with_the_softmax_over_all_experts(world_of_one):
    """Top-1 routing weighted by the softmax over all experts (norm_topk_prob false) is megatron-core's
    pre-softmax router: converted, not refused (renormalised top-1 is refused, above)."""
    config = tiny.hf_config("qwen3-moe")
    config.num_experts_per_tok, config.norm_topk_prob = 1, False
    hf = tiny.make_model(config)
    ours = model_config_from_hf(hf.config, "t")
    assert ours.moe_router_topk == 1 and ours.moe_router_pre_softmax
    tokens = tiny.random_tokens()
    torch.testing.assert_close(megatron_nll(converted(hf, ours), tokens), hf_nll(hf, tokens), rtol=0, atol=1e-5)


def test_qwen3_moe_window_is_carried(world_of_one):
    """Qwen3-MoE with use_sliding_window slides every layer (transformers reads config.sliding_window
    in each): the window is taken, refused past, exact within, and exported again."""
    spec = dict(tiny.MODELS["qwen3-moe"])
    hf = tiny.make_model(tiny.variant_config(spec.pop("arch"), use_sliding_window=True, sliding_window=16, **spec))
    ours = model_config_from_hf(hf.config, "t")
    assert ours.sliding_window == 16
    with pytest.raises(ValueError, match="sequence length 96 exceeds the 16-token sliding attention window"):
        ours.check_attention_window(96)
    model = converted(hf, ours)
    fits, longer = tiny.random_tokens(seq=16), tiny.random_tokens()
    torch.testing.assert_close(megatron_nll(model, fits), hf_nll(hf, fits), rtol=0, atol=1e-5)
    assert (megatron_nll(model, longer) - hf_nll(hf, longer)).abs().max() > 1e-3  # the window counts past it
    exported = hf_config_from_model_config(ours, "qwen3_moe")
    assert exported.sliding_window == 16 and exported.use_sliding_window
    assert model_config_from_hf(exported, "t").sliding_window == 16


def test_flops_count_the_active_experts():
    from megatron_miniplm.training.flops import training_flops_per_token

    config = model_config_from_hf(tiny.hf_config("qwen3-moe"), "t")
    h, q, kv, s = 64, 4 * 24, 2 * 24, 10
    per_layer = h * (q + 2 * kv) + q * s + q * h + 3 * h * 32 * 2 + h * 4
    assert training_flops_per_token(config, s) == 6.0 * (2 * per_layer + h * config.padded_vocab_size())


def test_export_refuses_experts_in_a_dense_layout():
    config = model_config_from_hf(tiny.hf_config("qwen3-moe"), "t")
    with pytest.raises(ConversionError, match="--hf-architecture qwen3 cannot hold the model's experts"):
        hf_config_from_model_config(config, "qwen3")
    with pytest.raises(ConversionError, match="--hf-architecture qwen3_moe cannot hold the model's dense MLP"):
        hf_config_from_model_config(model_config_from_hf(tiny.hf_config("qwen3"), "t"), "qwen3_moe")
