"""Model checkpoints with megatron-core's dist_checkpointing, resharded on load.

A checkpoint saved at one TP/PP layout loads at any other: each rank writes
and reads only its own shards of the global tensors. The model config is kept
beside the shards (``model_config.json``), so loading needs no model flags.

Transformer Engine layers carry ``_extra_state`` entries (FP8 metadata) that
megatron's local layers lack, so checkpoints of the two layer specs differ in
exactly those keys. Loads tolerate that one difference in both directions
(a CPU-trained or converted checkpoint into a TE model, a TE checkpoint into a
local model) and refuse any other.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from megatron_miniplm.errors import UserError
from megatron_miniplm.models.config import ModelConfig

MODEL_CONFIG_FILE = "model_config.json"
EXTRA_STATE_SUFFIX = "_extra_state"
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


def save_sharded(state: dict, directory: str) -> None:
    """Collective: megatron-core's ``dist_checkpointing.save`` of a sharded state dict, synchronous."""
    from megatron.core import dist_checkpointing

    from megatron_miniplm import megatron_compat

    megatron_compat.use_in_process_write_results()
    dist_checkpointing.save(state, directory)


def save_model(model_chunks: list, directory: str, config: ModelConfig | None = None) -> None:
    """Collective: every rank calls it. ``directory`` must exist and be empty."""
    state = sharded_model_state(model_chunks)
    save_sharded(state, directory)
    if config is not None and torch.distributed.get_rank() == 0:
        config.save(os.path.join(directory, MODEL_CONFIG_FILE))
    torch.distributed.barrier()


def load_model(model_chunks: list, directory: str) -> None:
    """Collective: fills ``model_chunks`` (this rank's slices) from a checkpoint of any layout."""
    directory = resolve_checkpoint_dir(directory)
    model_state = sharded_model_state(model_chunks)
    load_model_state(model_chunks, load_sharded(model_state, directory), directory)


class CheckpointMismatch(UserError, ValueError):
    """A checkpoint does not hold what the model needs."""


def _is_extra_state(key: str) -> bool:
    return key.split("/")[0].endswith(EXTRA_STATE_SUFFIX)


def load_sharded(request: dict, directory: str) -> dict:
    """``dist_checkpointing.load`` of ``request``; entries that the checkpoint lacks are
    dropped from the request when they are ``_extra_state`` and refused otherwise."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    loaded, _, absent = dist_checkpointing.load(request, directory, strict=StrictHandling.RETURN_UNEXPECTED)
    absent = sorted(k for k in absent if not _is_extra_state(k))
    if absent:
        raise CheckpointMismatch(f"{directory}: the checkpoint lacks {len(absent)} entries the model "
                                 f"needs: {', '.join(absent[:6])}{' ...' if len(absent) > 6 else ''}")
    return loaded


def load_model_state(model_chunks: list, loaded: dict, directory: str) -> None:
    """Copy the loaded model entries into the modules; only ``_extra_state`` may be absent."""
    for i, chunk in enumerate(_unwrap(model_chunks)):
        result = chunk.load_state_dict(loaded[_chunk_key(i, len(model_chunks))], strict=False)
        bad = [k for k in (*result.missing_keys, *result.unexpected_keys) if not _is_extra_state(k)]
        if bad:
            raise CheckpointMismatch(f"{directory}: model entries do not match the checkpoint: "
                                     f"{', '.join(sorted(bad)[:6])}")


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
