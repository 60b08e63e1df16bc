"""Training checkpoints: model, optimizer, LR scheduler, data position, RNG.

Layout under ``--save``: ``iter_0000100/`` (megatron dist checkpoint, loadable
at any TP/PP, with ``model_config.json``) and ``latest_checkpointed_iteration.txt``.
A checkpoint is written under ``iter_0000100.partial`` and renamed when every
rank has finished, and the latest-file is replaced atomically after that, so a
kill at any moment leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist

from megatron_miniplm.atomic_io import write_text_atomic
from megatron_miniplm.checkpointing import (
    LATEST_FILE, MODEL_CONFIG_FILE, checkpoint_name, latest_checkpoint, load_model_state,
    load_sharded, sharded_model_state,
)
from megatron_miniplm.models.config import ModelConfig


def resume_dir(save_dir: str) -> Optional[str]:
    """The checkpoint to resume training from; None if ``save_dir`` has none yet."""
    directory = latest_checkpoint(save_dir)
    if directory is None:
        return None
    name = os.path.basename(directory)
    if not (name.startswith("iter_") and name[5:].isdigit()):
        raise ValueError(f"{os.path.join(save_dir, LATEST_FILE)}: names '{name}', not a training iteration to resume")
    return directory


def _rng_state() -> dict:
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def save_checkpoint(
    save_dir: str,
    iteration: int,
    model_chunks: list,
    optimizer,
    scheduler,
    train_state: dict,
    model_config: ModelConfig,
    tokenizer: Optional[dict] = None,
) -> str:
    """Collective. Returns the published checkpoint directory.

    ``tokenizer``: the training data's tokenizer record (dataset meta); kept in
    ``checkpoint_info.json`` with the tokenizer files, so that scoring can check
    the model against a dataset and the HF export ships the right tokenizer.
    """
    from megatron.core import dist_checkpointing

    final = os.path.join(save_dir, checkpoint_name(iteration))
    partial = final + ".partial"
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed mid-save
        os.makedirs(partial)
    dist.barrier()
    model_state = sharded_model_state(model_chunks)
    state = dict(model_state)
    has_optimizer_state = iteration > 0  # Adam's moments exist only after a first step
    if has_optimizer_state:
        state["optimizer"] = optimizer.sharded_state_dict(model_state)
    state["scheduler"] = scheduler.state_dict()
    state["train_state"] = dict(train_state, iteration=iteration,
                                has_optimizer_state=has_optimizer_state)
    dist_checkpointing.save(state, partial)
    # RNG streams are per rank: restored only when the layout is unchanged.
    torch.save(_rng_state(), os.path.join(partial, f"rng_rank{rank:05d}.pt"))
    dist.barrier()
    if rank == 0:
        model_config.save(os.path.join(partial, MODEL_CONFIG_FILE))
        _write_info(partial, tokenizer)
        if os.path.exists(final):  # a re-save of the same iteration
            shutil.rmtree(final)
        os.replace(partial, final)
        write_text_atomic(os.path.join(save_dir, LATEST_FILE), str(iteration))  # as Megatron-LM writes it
    dist.barrier()
    return final


def _write_info(directory: str, tokenizer: Optional[dict]) -> None:
    from megatron_miniplm.conversion.checkpoint_dir import write_info
    from megatron_miniplm.conversion.errors import ConversionError
    from megatron_miniplm.conversion.tokenizer_files import copy_tokenizer

    record = dict(tokenizer) if tokenizer else None
    source = (tokenizer or {}).get("path")
    if source and os.path.exists(source):
        try:
            copy_tokenizer(source, os.path.join(directory, "tokenizer"))
            record["path"] = "tokenizer/tokenizer.json"
        except ConversionError:  # e.g. a sentencepiece .model: keep pointing at the original
            pass
    write_info(directory, {"source": "tools/pretrain_gpt.py", "source_format": "megatron",
                           "architecture": None, "dtype": "fp32", "tokenizer": record})


def load_checkpoint(load_dir: str, model_chunks: list, optimizer, scheduler) -> Optional[dict]:
    """Collective. Restores everything from the latest checkpoint; None if there is none."""
    from megatron.core import dist_checkpointing

    directory = resume_dir(load_dir)
    if directory is None:
        return None
    common = dist_checkpointing.load_common_state_dict(directory)
    model_state = sharded_model_state(model_chunks)
    request = dict(model_state)
    if common["train_state"]["has_optimizer_state"]:
        request["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=True)
    loaded = load_sharded(request, directory)
    load_model_state(model_chunks, loaded, directory)
    if "optimizer" in loaded:
        optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(common["scheduler"])
    rng_path = os.path.join(directory, f"rng_rank{dist.get_rank():05d}.pt")
    same_layout = len([f for f in os.listdir(directory) if f.startswith("rng_rank")]) == dist.get_world_size()
    if same_layout and os.path.exists(rng_path):
        _set_rng_state(torch.load(rng_path, weights_only=False))
    return common["train_state"]
