"""Megatron checkpoint -> HF model directory (student export).

Loads the checkpoint, of any TP/PP layout, at TP=1 in one process (the dist
checkpoint reshards on load), maps the tensors to a Qwen2, Llama, Qwen3 or Mistral layout and
writes ``config.json`` + ``model.safetensors`` + the tokenizer, a directory
that ``AutoModelForCausalLM`` / ``AutoTokenizer`` load as they are, and, when
asked, files of the caller's (tools/convert_checkpoint.py adds a model card, evaluation/model_card.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megatron_miniplm.atomic_io import disk_space
from megatron_miniplm.conversion import checkpoint_info, mapping
from megatron_miniplm.conversion.dtypes import HF_NAME, torch_dtype
from megatron_miniplm.conversion.errors import ConversionError
from megatron_miniplm.conversion.hf_config import ARCHITECTURES, hf_config_from_model_config
from megatron_miniplm.conversion.session import single_process
from megatron_miniplm.conversion.tokenizer_files import (
    TOKENIZER_DIR, TOKENIZER_JSON, copy_tokenizer, ensure_tokenizer_config, tokenizer_record,
)
from megatron_miniplm.models.config import ModelConfig

LAYOUTS = ("auto", *mapping.LAYOUTS)
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class ExportResult:
    directory: str
    layout: str
    model_config: ModelConfig
    eod_id: Optional[int]


def choose_layout(requested: str, config: ModelConfig, info: Optional[dict]) -> str:
    """``auto``: the architecture the checkpoint was imported from, else the layout of the model's
    features: with experts Qwen3-MoE (QK-norm) or Mixtral; Qwen3 with QK-norm, Qwen2 with QKV bias
    (MiniPLM's students), Mistral with an attention window, Llama otherwise."""
    if requested not in LAYOUTS:
        raise ConversionError(f"--hf-architecture {requested}: choose from {', '.join(LAYOUTS)}")
    if requested != "auto":
        return requested
    if info and info.get("architecture") in ARCHITECTURES:
        return ARCHITECTURES[info["architecture"]]
    if config.num_experts:
        return mapping.QWEN3_MOE if config.qk_layernorm else mapping.MIXTRAL
    if config.qk_layernorm:
        return mapping.QWEN3
    if config.qkv_bias:
        return mapping.QWEN2
    return mapping.LLAMA if config.sliding_window is None else mapping.MISTRAL


def find_tokenizer(load: str, resolved: str, tokenizer: Optional[str]) -> Optional[str]:
    if tokenizer is not None:
        if not os.path.exists(tokenizer):
            raise ConversionError(f"--tokenizer {tokenizer}: no such file or directory")
        return tokenizer
    for directory in (resolved, load):
        candidate = os.path.join(directory, TOKENIZER_DIR)
        if os.path.isfile(os.path.join(candidate, TOKENIZER_JSON)):
            return candidate
    return None


def load_megatron_state(directory: str, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Whole tensors of a checkpoint saved at any layout, read at TP=1/PP=1 in fp32."""
    from megatron_miniplm.dist_checkpoint import load_model
    from megatron_miniplm.models.gpt import PLAIN_LOCAL, build_model

    with single_process():
        # whole tensors on the host, where any model fits (a GPU need not hold it)
        model = build_model(config, params_dtype=torch.float32, impl=PLAIN_LOCAL, initialize=False, device="cpu")
        load_model([model], directory)
        return {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}


def convert_megatron_to_hf(
    load: str,
    save: str,
    *,
    layout: str = "auto",
    dtype: str = "fp32",
    tokenizer: Optional[str] = None,
    eod_token: Optional[str] = None,
    overwrite: bool = False,
    add_files: Optional[Callable[[str, str], None]] = None,
) -> ExportResult:
    """``add_files(directory, layout)``: writes what a caller adds to the export (the tool: a
    model card) into the export's temporary directory, before it is published whole."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from megatron_miniplm.dist_checkpoint import load_model_config

    target = torch_dtype(dtype)
    checkpoint_info.check_destination(save, overwrite)
    resolved = checkpoint_info.resolve_megatron_checkpoint(load)
    try:
        config = load_model_config(resolved)
    except ValueError as e:
        raise ConversionError(f"{resolved}: bad model_config.json ({e})") from e
    info = checkpoint_info.read_info(resolved)
    layout = choose_layout(layout, config, info)
    tokenizer_src = find_tokenizer(load, resolved, tokenizer)

    with checkpoint_info.atomic_directory(save, overwrite) as tmp:
        eod_id = None
        if tokenizer_src is not None:
            copy_tokenizer(tokenizer_src, tmp)
            eod = eod_token or ((info or {}).get("tokenizer") or {}).get("eod_token")
            record = tokenizer_record(os.path.join(tmp, TOKENIZER_JSON), eod)
            ensure_tokenizer_config(tmp, eod_token=record["eod_token"], model_max_length=config.max_position_embeddings)
            eod_id = record["eod_id"]
        state = load_megatron_state(resolved, config)
        hf_state = mapping.megatron_to_hf(state, config, layout)
        del state
        hf_state = {k: v.to(target).contiguous() for k, v in hf_state.items()}
        hf_config = hf_config_from_model_config(config, layout, dtype=HF_NAME[dtype], eod_id=eod_id)
        hf_config.save_pretrained(tmp)
        GenerationConfig(bos_token_id=eod_id, eos_token_id=eod_id).save_pretrained(tmp)
        weights = sum(v.numel() * v.element_size() for v in hf_state.values())
        with disk_space(os.path.join(save, WEIGHTS_FILE), weights):
            save_file(hf_state, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        if add_files is not None:
            add_files(tmp, layout)
    return ExportResult(os.path.abspath(save), layout, config, eod_id)
