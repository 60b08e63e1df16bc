"""HF / GGUF model -> megatron dist checkpoint (teacher import).

Done in one process at TP=1/PP=1: build the GPT model, copy the mapped
weights in, ``save_model``. The dist checkpoint reshards on load, so the
requested TP/PP only has to divide the model; it is checked and recorded.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_miniplm.conversion import checkpoint_info, mapping
from megatron_miniplm.conversion.dtypes import torch_dtype
from megatron_miniplm.conversion.errors import ConversionError
from megatron_miniplm.conversion.hf_config import CLASS_OF_LAYOUT, layout_of, model_config_from_hf
from megatron_miniplm.conversion.session import single_process
from megatron_miniplm.conversion.sources import open_source
from megatron_miniplm.conversion.tokenizer_files import TOKENIZER_DIR, TOKENIZER_JSON, tokenizer_record
from megatron_miniplm.models.config import ModelConfig


@dataclass(frozen=True)
class ImportResult:
    directory: str
    model_config: ModelConfig
    info: dict


def check_layout(config: ModelConfig, tensor_parallel: int, pipeline_parallel: int) -> None:
    """The requested layout must split heads, layers and the (padded) vocabulary evenly."""
    if tensor_parallel < 1 or pipeline_parallel < 1:
        raise ConversionError("parallel sizes must be >= 1")
    try:
        config.check_tensor_parallel(tensor_parallel)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    if config.num_layers % pipeline_parallel != 0:
        raise ConversionError(
            f"pipeline-model-parallel-size {pipeline_parallel} does not divide the {config.num_layers} layers"
        )
    if config.padded_vocab_size(tensor_parallel) != config.padded_vocab_size(1):
        raise ConversionError(
            f"tensor-model-parallel-size {tensor_parallel} does not divide the vocabulary padding multiple "
            f"{config.make_vocab_size_divisible_by}: the checkpoint would not load at that size"
        )


def copy_into(model: torch.nn.Module, tensors) -> None:
    """Fill every parameter of ``model`` from (key, tensor) pairs; shapes and coverage are checked."""
    targets = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    filled = set()
    with torch.no_grad():
        for key, value in tensors:
            if key not in targets:
                raise ConversionError(f"mapped tensor '{key}' has no place in the megatron model")
            if targets[key].shape != value.shape:
                raise ConversionError(f"{key}: shape {tuple(value.shape)} != model's {tuple(targets[key].shape)}")
            targets[key].copy_(value)
            filled.add(key)
    missing = sorted(set(targets) - filled)
    if missing:
        raise ConversionError(f"megatron parameters not filled by the conversion: {missing[:8]}")


def convert_hf_to_megatron(
    load: str,
    save: str,
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    dtype: str = "fp32",
    gguf_file: Optional[str] = None,
    name: Optional[str] = None,
    eod_token: Optional[str] = None,
    overwrite: bool = False,
) -> ImportResult:
    from megatron_miniplm.dist_checkpoint import save_model
    from megatron_miniplm.models.gpt import PLAIN_LOCAL, build_model

    params_dtype = torch_dtype(dtype)
    checkpoint_info.check_destination(save, overwrite)
    source = open_source(load, gguf_file)
    hf_config = source.load_config()
    layout = layout_of(hf_config)
    config = model_config_from_hf(hf_config, name or source.default_name)
    check_layout(config, tensor_model_parallel_size, pipeline_model_parallel_size)

    with checkpoint_info.atomic_directory(save, overwrite) as tmp:
        # The tokenizer first (a missing EOD fails fast), staged beside the shards
        # because dist_checkpointing wants an empty directory.
        staged = f"{tmp}-{TOKENIZER_DIR}"
        tokenizer = None
        try:
            if source.export_tokenizer(staged):
                tokenizer = tokenizer_record(os.path.join(staged, TOKENIZER_JSON), eod_token)
                if tokenizer["vocab_size"] > config.vocab_size:
                    raise ConversionError(
                        f"the tokenizer has {tokenizer['vocab_size']} tokens, the model's embedding only "
                        f"{config.vocab_size} rows")
            state = source.load_state_dict(params_dtype, hf_config)
            with single_process():
                # whole tensors on the host, where any model fits (a GPU need not hold it)
                model = build_model(config, params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16,
                                    impl=PLAIN_LOCAL, initialize=False, device="cpu")
                copy_into(model, mapping.hf_to_megatron(state, config))
                del state
                save_model([model], tmp, config)
            if tokenizer is not None:
                os.replace(staged, os.path.join(tmp, TOKENIZER_DIR))
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        info = {
            "source": source.path,
            "source_format": source.format,
            "architecture": CLASS_OF_LAYOUT[layout],
            "dtype": dtype,
            "tokenizer": tokenizer,
            "parallel": {
                "tensor_model_parallel_size": tensor_model_parallel_size,
                "pipeline_model_parallel_size": pipeline_model_parallel_size,
            },
        }
        checkpoint_info.write_info(tmp, info)
    return ImportResult(os.path.abspath(save), config, info)
