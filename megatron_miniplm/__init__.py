"""megatron-miniplm: MiniPLM knowledge distillation as a step of Megatron-style pre-training.

The data path: preprocess -> score -> select -> train -> evaluate.
"""

__version__ = "0.1.0"
