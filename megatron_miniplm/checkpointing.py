"""Model checkpoints with megatron-core's dist_checkpointing, resharded on load.

A checkpoint saved at one TP/PP layout loads at any other: each rank writes
and reads only its own shards of the global tensors. The model config is kept
beside the shards (``model_config.json``), so loading needs no model flags.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from megatron_miniplm.models.config import ModelConfig

MODEL_CONFIG_FILE = "model_config.json"
LATEST_FILE = "latest_checkpointed_iteration.txt"


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def latest_checkpoint(save_dir: str, marker: str = LATEST_FILE) -> Optional[str]:
    """The checkpoint directory that ``save_dir``'s marker file names; None without one.

    The one reader of that file. It holds the iteration number, as Megatron-LM writes
    it ("100" names iter_0000100), or a directory name ("iter_0000100", "release").
    """
    path = os.path.join(save_dir, marker)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    return os.path.join(save_dir, checkpoint_name(int(text)) if text.isdigit() else text)


def resolve_checkpoint_dir(path: str) -> str:
    """A checkpoint directory, or a training run's --save directory (its latest checkpoint)."""
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    return path


def save_model(model_chunks: list, directory: str, config: ModelConfig | None = None) -> None:
    """Collective: every rank calls it. ``directory`` must exist and be empty."""
    from megatron.core import dist_checkpointing

    state = sharded_model_state(model_chunks)
    dist_checkpointing.save(state, directory)
    if config is not None and torch.distributed.get_rank() == 0:
        config.save(os.path.join(directory, MODEL_CONFIG_FILE))
    torch.distributed.barrier()


def load_model(model_chunks: list, directory: str, strict: bool = True) -> None:
    """Collective: fills ``model_chunks`` (this rank's slices) from a checkpoint of any layout."""
    from megatron.core import dist_checkpointing

    directory = resolve_checkpoint_dir(directory)
    loaded = dist_checkpointing.load(sharded_model_state(model_chunks), directory)
    for i, chunk in enumerate(_unwrap(model_chunks)):
        chunk.load_state_dict(loaded[_chunk_key(i, len(model_chunks))], strict=strict)


def load_model_config(directory: str) -> ModelConfig:
    path = os.path.join(resolve_checkpoint_dir(directory), MODEL_CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no model config beside the checkpoint")
    return ModelConfig.load(path)


def _unwrap(model_chunks: list) -> list:
    return [getattr(chunk, "module", chunk) for chunk in model_chunks]


def _chunk_key(index: int, count: int) -> str:
    return "model" if count == 1 else f"model{index}"


def sharded_model_state(model_chunks: list) -> dict:
    chunks = _unwrap(model_chunks)
    return {_chunk_key(i, len(chunks)): c.sharded_state_dict() for i, c in enumerate(chunks)}
