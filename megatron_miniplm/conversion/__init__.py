"""Checkpoint conversion: HF / GGUF teachers in, HF students out.

- ``hf_to_megatron``: a transformers directory or GGUF file -> megatron dist checkpoint
- ``megatron_to_hf``: a megatron checkpoint (any TP/PP) -> transformers directory
- ``mapping``: the tensor layout correspondence; ``hf_config``: the config correspondence
"""

from megatron_miniplm.conversion.errors import ConversionError
from megatron_miniplm.conversion.gguf import find_packaged_gguf
from megatron_miniplm.conversion.hf_to_megatron import convert_hf_to_megatron
from megatron_miniplm.conversion.megatron_to_hf import convert_megatron_to_hf

__all__ = ["ConversionError", "convert_hf_to_megatron", "convert_megatron_to_hf", "find_packaged_gguf"]
