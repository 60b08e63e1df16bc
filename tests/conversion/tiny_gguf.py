"""A tiny HF model written as a GGUF file the way llama.cpp's convert_hf_to_gguf.py writes it.

Written with the ``gguf`` package (the one transformers reads GGUF with), unquantized (F32), so a
conversion from it can be compared with the HF model at fp32 tolerance:
- the metadata llama.cpp states (widths, heads, RoPE base, norm epsilon, experts);
- tensor names from gguf's own name map; the experts stacked per layer (ffn_{gate,up,down}_exps);
- no output matrix where the embeddings are tied;
- the llama architecture's Q and K rows interleaved per head (llama.cpp's permute); Mistral and
  Mixtral are written as the llama architecture, as llama.cpp writes them;
- Llama 3.1's RoPE scaling as the per-frequency divisors (rope_freqs) llama.cpp writes;
- a byte-level vocabulary of the tiny models' tokens (EOD a control token).
"""

from __future__ import annotations

import math

import numpy as np

import tiny_hf_models as tiny

# transformers model_type -> gguf's architecture name
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen3": "qwen3", "qwen3_moe": "qwen3moe"}
CONTROL, NORMAL = 3, 1  # gguf token types


def interleave_rotary_halves(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's permute: each head's rows from HF's (first half, second half) rotary layout to
    interleaved pairs."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def rope_factors(config) -> list[float]:
    """Llama 3.1's RoPE scaling as llama.cpp stores it: the divisor of each inverse frequency."""
    rope = config.rope_parameters
    head = config.head_dim or config.hidden_size // config.num_attention_heads
    factors = []
    for i in range(0, head, 2):
        wavelength = 2 * math.pi * rope["rope_theta"] ** (i / head)
        if wavelength < rope["original_max_position_embeddings"] / rope["high_freq_factor"]:
            factors.append(1.0)
        elif wavelength > rope["original_max_position_embeddings"] / rope["low_freq_factor"]:
            factors.append(rope["factor"])
        else:
            smooth = ((rope["original_max_position_embeddings"] / wavelength - rope["low_freq_factor"])
                      / (rope["high_freq_factor"] - rope["low_freq_factor"]))
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return factors


def _metadata(writer, config, name: str) -> None:
    import gguf

    head = config.head_dim or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head)
    writer.add_value_length(head)
    writer.add_rope_dimension_count(head)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        if getattr(config, "moe_intermediate_size", None):
            writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)


def _vocabulary(writer) -> None:
    tokens = [tiny.EOD, "[UNK]"] + [f"w{i}" for i in range(2, tiny.VOCAB)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([CONTROL] + [NORMAL] * (len(tokens) - 1))
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_eos_token_id(0)
    writer.add_bos_token_id(0)


def _tensors(model, architecture: str):
    """(GGUF name, array) of every weight, as llama.cpp names and lays them out."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == architecture),
                                     config.num_hidden_layers)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp writes no output matrix for tied embeddings
        array = tensor.detach().float().numpy()
        block = key.split(".")[2] if key.startswith("model.layers.") else None
        if key.endswith("mlp.experts.gate_up_proj"):  # (experts, gate rows then up rows, hidden)
            inner = array.shape[1] // 2
            yield f"blk.{block}.ffn_gate_exps.weight", array[:, :inner]
            yield f"blk.{block}.ffn_up_exps.weight", array[:, inner:]
            continue
        if key.endswith("mlp.experts.down_proj"):
            yield f"blk.{block}.ffn_down_exps.weight", array
            continue
        if architecture == "llama" and key.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in key else config.num_key_value_heads
            array = interleave_rotary_halves(array, heads)
        yield names.get_name(key, try_suffixes=(".weight", ".bias")), array


def write_gguf(model, path: str, name: str, drop: tuple[str, ...] = ()) -> None:
    """``model`` (a tiny_hf_models model) as an F32 GGUF file; ``drop``: tensor names left out."""
    import gguf

    config = model.config
    architecture = ARCHITECTURES[config.model_type]
    writer = gguf.GGUFWriter(path, architecture)
    _metadata(writer, config, name)
    _vocabulary(writer)
    for gguf_name, array in _tensors(model, architecture):
        if gguf_name not in drop:
            writer.add_tensor(gguf_name, np.ascontiguousarray(array, dtype=np.float32))
    if config.rope_parameters.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", np.asarray(rope_factors(config), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
