"""GPT models: typed configs, presets, the megatron-core builder, parameter counts."""

from megatron_miniplm.models.config import PRESETS, ModelConfig, get_preset

__all__ = ["ModelConfig", "PRESETS", "get_preset"]
