"""The checkpoint dtypes the converter writes, by their flag names."""

from __future__ import annotations

import torch

from megatron_miniplm.conversion.errors import ConversionError

TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16}
HF_NAME = {"fp32": "float32", "bf16": "bfloat16"}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return TORCH[name]
    except KeyError:
        raise ConversionError(f"--dtype {name}: choose from {', '.join(TORCH)}") from None
