"""Checkpoint conversion: HF / GGUF teachers in, HF students out.

The package imports nothing itself: finding a teacher (``gguf.find_packaged_gguf``) costs
no torch import; the converters are imported from their modules.

- ``hf_to_megatron``: a transformers directory or GGUF file -> megatron dist checkpoint
- ``megatron_to_hf``: a megatron checkpoint (any TP/PP) -> transformers directory
- ``mapping``: the tensor layout correspondence; ``hf_config``: the config correspondence
"""
