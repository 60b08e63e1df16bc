"""Training checkpoints: model, optimizer, LR scheduler, data position, RNG.

Layout under ``--save``: ``iter_0000100/`` (megatron dist checkpoint, loadable
at any TP/PP, with ``model_config.json``) and ``latest_checkpointed_iteration.txt``.
A checkpoint is written under ``iter_0000100.partial`` and renamed when every
rank has finished, and the latest-file is replaced atomically after that, so a
kill at any moment leaves the previous checkpoint loadable.

Model weights reshard across any TP/PP/DP layout. Optimizer state of the plain
and mixed-precision optimizers does too; the distributed optimizer's is saved
in megatron-core's ``dp_reshardable`` format by default (each rank writes its
shard: fast, reloadable at another DP size only) or ``fully_reshardable``
(gathered per parameter: reloadable at any layout), as Megatron-LM does with
``--dist-ckpt-optim-fully-reshardable``. The format and the layout are recorded,
so a load that cannot work is refused before it starts.

Each rank's RNG states are saved with the device kind they are of (GPU or CPU). A load
restores them (unless ``--no-load-rng``, as in Megatron-LM) where they can continue their
streams: at the same TP/PP/DP layout, and, for the device generator and megatron-core's
RNG tracker, on the same device kind. Otherwise these keep what this run's --seed gave
them, and a note says so.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist

from megatron_miniplm import platform
from megatron_miniplm.atomic_io import DiskFullError, disk_space, space_ran_out, write_json_atomic, write_text_atomic
from megatron_miniplm.dist_checkpoint import (
    LATEST_FILE, MODEL_CONFIG_FILE, CheckpointMismatch, checkpoint_name, latest_checkpoint,
    load_model_state, load_sharded, save_sharded, sharded_model_state,
)
from megatron_miniplm.models.config import ModelConfig

RUN_CONFIG_FILE = "run_config.json"

log = logging.getLogger(__name__)


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
        "cuda": platform.device_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
        "device": platform.rng_device_kind(),  # which generators "cuda" and "tracker" are of
    }


def _saved_rng_device(state: dict) -> str:
    """The device kind a rank's saved RNG states are of: its record; in a file written before
    the record, its CUDA generator state, which only a GPU saves."""
    return state.get("device") or ("cuda" if state.get("cuda") is not None else "cpu")


def _set_rng_state(state: dict, device_states: bool = True) -> None:
    """Restore what ``_rng_state`` saved. ``device_states=False``: Python's, numpy's and torch's
    CPU generators only; the device generator and megatron-core's RNG tracker keep this run's
    seeding."""
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device_states:
        platform.set_device_rng_state(state["cuda"])
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
    dtype: str = "fp32",
    optimizer_format: Optional[str] = None,
    run_config: Optional[dict] = None,
) -> str:
    """Collective. Returns the published checkpoint directory.

    ``tokenizer``: the training data's tokenizer record (dataset meta); kept in
    ``checkpoint_info.json`` with the tokenizer files, so that scoring can check
    the model against a dataset and the HF export ships the right tokenizer.
    ``optimizer_format``: the distributed optimizer's sharding type (None for the others).
    ``run_config``: everything the run was made with, kept as ``run_config.json``.
    """
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
        state["optimizer"] = optimizer.sharded_state_dict(model_state, metadata=_format_metadata(optimizer_format))
    state["scheduler"] = scheduler.state_dict()
    state["train_state"] = dict(train_state, iteration=iteration, has_optimizer_state=has_optimizer_state,
                                optimizer_format=optimizer_format, layout=_layout())
    _save_state(state, partial, rank)
    dist.barrier()
    if rank == 0:
        with disk_space(partial):
            model_config.save(os.path.join(partial, MODEL_CONFIG_FILE))
            if run_config is not None:
                write_json_atomic(os.path.join(partial, RUN_CONFIG_FILE), run_config)
            _write_info(partial, tokenizer, dtype)
        if os.path.exists(final):  # a re-save of the same iteration
            shutil.rmtree(final)
        os.replace(partial, final)
        write_text_atomic(os.path.join(save_dir, LATEST_FILE), str(iteration))  # as Megatron-LM writes it
    dist.barrier()
    return final


def _save_state(state: dict, partial: str, rank: int) -> None:
    """This rank's shards and RNG streams into `partial`. A full disk is a DiskFullError,
    and rank 0 removes the .partial directory (never loaded, and replaced by the next save
    anyway) to give the space back."""
    try:
        save_sharded(state, partial)
        # RNG streams are per rank: restored only when the layout is unchanged.
        torch.save(_rng_state(), os.path.join(partial, f"rng_rank{rank:05d}.pt"))
    except BaseException as e:  # torch's CheckpointException derives from BaseException
        needed = _tensor_bytes(state)
        if isinstance(e, (KeyboardInterrupt, SystemExit)) or not space_ran_out(e, partial, needed):
            raise
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise DiskFullError(partial, needed) from e


def _tensor_bytes(state) -> int:
    """Bytes of the tensors in a (sharded) state dict: what a save writes at the least."""
    if isinstance(state, dict):
        return sum(_tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_tensor_bytes(v) for v in state)
    data = state if isinstance(state, torch.Tensor) else getattr(state, "data", None)
    return data.numel() * data.element_size() if isinstance(data, torch.Tensor) else 0


def _format_metadata(optimizer_format: Optional[str]) -> Optional[dict]:
    return {"distrib_optim_sharding_type": optimizer_format} if optimizer_format else None


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
            "data_parallel_size": ps.get_data_parallel_world_size()}


def _check_optimizer_state(directory: str, train_state: dict, model_chunks: list) -> None:
    """Refuse optimizer state this run cannot read, saying what would work instead."""
    saved = train_state.get("optimizer_format")
    distributed = model_chunks[0].ddp_config.use_distributed_optimizer
    if (saved is not None) != distributed:
        raise CheckpointMismatch(
            f"{directory}: its optimizer state is from the {'distributed' if saved else 'plain'} optimizer, "
            f"this run uses the {'distributed' if distributed else 'plain'} one; use the same optimizer, "
            f"or load the weights only (no_load_optim)")
    if saved == "dp_reshardable":
        old, new = train_state["layout"], _layout()
        changed = [k for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size") if old[k] != new[k]]
        if changed:
            raise CheckpointMismatch(
                f"{directory}: distributed-optimizer state saved as dp_reshardable loads only at the "
                f"same tensor/pipeline parallel sizes ({', '.join(f'{k} {old[k]} -> {new[k]}' for k in changed)}); "
                f"save with the fully_reshardable format (dist_ckpt_optim_fully_reshardable), or load the "
                f"weights only (no_load_optim)")


# megatron-core 0.16.1's distributed optimizer over torch's Adam (what it uses without
# Transformer Engine or Apex: the CPU, or a GPU image without them) cannot resume as it is:
# building a load request reads a 'step' that a fresh optimizer lacks; the fully
# reshardable format then copies a 'step' that its saved state does not hold; and the step
# count is lost on load (every parameter gets one shared 'step' tensor, overwritten by the
# request's placeholder). With TE's or Apex's Adam, which keep the step in the param
# groups, none of this arises and these helpers do nothing.

def _torch_adams(optimizer) -> list:
    """(distributed optimizer, its torch Adam) pairs inside megatron's (chained) optimizer."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return [(o, o.optimizer) for o in inner
            if isinstance(o, DistributedOptimizer) and isinstance(o.optimizer, torch.optim.Adam)]


def _prepare_torch_adam_load(optimizer) -> None:
    """Give each parameter Adam's initial state (step 0, zero moments), which the load
    overwrites, and let the parameter-state copy skip what the saved state does not hold."""
    for dist_opt, adam in _torch_adams(optimizer):
        for group in adam.param_groups:
            for p in group["params"]:
                if not adam.state[p]:
                    adam.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                     "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        copy_states = type(dist_opt)._set_main_param_and_optimizer_states

        def copy_saved(model_param, tensors, __copy=copy_states, __opt=dist_opt):
            group_index, group_order = __opt.model_param_group_index_map[model_param]
            main_param = __opt.optimizer.param_groups[group_index]["params"][group_order]
            kept = {k: v for k, v in __opt.optimizer.state[main_param].items() if k not in tensors and k != "param"}
            for key in kept:
                del __opt.optimizer.state[main_param][key]
            try:
                __copy(__opt, model_param, tensors)
            finally:
                __opt.optimizer.state[main_param].update(kept)

        dist_opt._set_main_param_and_optimizer_states = copy_saved


def _saved_adam_steps(state) -> set:
    """The 'step' values of every optimizer param group in a loaded optimizer state."""
    if isinstance(state, dict):
        steps = {g["step"] for g in state.get("param_groups", []) if "step" in g}
        return steps.union(*(_saved_adam_steps(v) for k, v in state.items() if k != "param_groups"))
    if isinstance(state, (list, tuple)):
        return set().union(*(_saved_adam_steps(v) for v in state))
    return set()


def _finish_torch_adam_load(optimizer, loaded_state) -> None:
    """Each parameter gets its own 'step' tensor holding the saved step count."""
    pairs = _torch_adams(optimizer)
    if not pairs:
        return
    steps = _saved_adam_steps(loaded_state)
    if len(steps) != 1:
        raise CheckpointMismatch(f"the checkpoint's optimizer state holds steps {sorted(steps)}, not one")
    step = float(steps.pop())
    for dist_opt, adam in pairs:
        del dist_opt._set_main_param_and_optimizer_states
        for state in adam.state.values():
            state["step"] = torch.tensor(step, dtype=torch.float32)


def _write_info(directory: str, tokenizer: Optional[dict], dtype: str) -> None:
    from megatron_miniplm.conversion.checkpoint_info import write_info
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
                           "architecture": None, "dtype": dtype, "tokenizer": record})


def load_checkpoint(load_dir: str, model_chunks: list, optimizer, scheduler, *,
                    load_optim: bool = True, load_rng: bool = True) -> Optional[dict]:
    """Collective. Restores the latest checkpoint under ``load_dir``; None if there is none.

    A directory that is itself a model checkpoint (a converted model, ``save_model``)
    gives the weights and iteration 0. Without optimizer state (such a model, a
    checkpoint saved at iteration 0, ``load_optim=False``) the optimizer's fp32 main
    parameters are re-read from the loaded weights, as Megatron-LM does: otherwise
    they keep their initial values and the first step overwrites the loaded model.
    With ``load_optim=False`` the LR schedule is stepped to the loaded iteration.
    ``load_rng=False`` (Megatron-LM's --no-load-rng) leaves every RNG as this run's seed made it.
    """
    directory = resume_dir(load_dir)
    if directory is None:
        if not os.path.isfile(os.path.join(load_dir, MODEL_CONFIG_FILE)):
            return None
        load_model_state(model_chunks, load_sharded(sharded_model_state(model_chunks), load_dir), load_dir)
        optimizer.reload_model_params()
        return {"iteration": 0, "consumed_samples": 0, "consumed_tokens": 0, "optimizer_loaded": False}
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(directory)
    train_state = common["train_state"]
    model_state = sharded_model_state(model_chunks)
    request = dict(model_state)
    with_optimizer = load_optim and train_state["has_optimizer_state"]
    if with_optimizer:
        _check_optimizer_state(directory, train_state, model_chunks)
        _prepare_torch_adam_load(optimizer)
        request["optimizer"] = optimizer.sharded_state_dict(
            model_state, is_loading=True, metadata=_format_metadata(train_state.get("optimizer_format")))
    loaded = load_sharded(request, directory)
    load_model_state(model_chunks, loaded, directory)
    if with_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
        _finish_torch_adam_load(optimizer, loaded["optimizer"])
    else:
        optimizer.reload_model_params()
    if load_optim:
        scheduler.load_state_dict(common["scheduler"])
    else:
        scheduler.step(increment=train_state["iteration"])
    if load_rng:
        _load_rng_state(directory, train_state)
    return dict(train_state, optimizer_loaded=with_optimizer)


def _load_rng_state(directory: str, train_state: dict) -> None:
    """Restore this rank's RNG states where they can continue its streams; else leave them as
    this run's --seed made them, with a note, as Megatron-LM does at another TP/PP.

    RNG states are per rank: they are restored only at the layout they were saved at. The
    device generator's and megatron-core's RNG tracker's are moreover of one device kind (a
    GPU's CUDA generator, or the CPU generator on a CPU): on the other kind they would fail
    at the first draw, so there only the CPU generators' (Python, numpy, torch) are restored.
    """
    rng_path = os.path.join(directory, f"rng_rank{dist.get_rank():05d}.pt")
    if not _same_layout(directory, train_state) or not os.path.exists(rng_path):
        return
    state = torch.load(rng_path, weights_only=False)
    saved, here = _saved_rng_device(state), platform.rng_device_kind()
    if saved != here:
        kinds = platform.RNG_DEVICE_KINDS
        _note(f"{directory}: its RNG states were saved on a {kinds[saved]}, this run is on a {kinds[here]}: "
              f"Python's, numpy's and torch's CPU generators are restored; the device generator and "
              f"megatron-core's model-parallel RNG tracker keep the states this run's --seed gave them, "
              f"so random draws on the device (dropout) differ from an uninterrupted run on a {kinds[saved]}")
    _set_rng_state(state, device_states=saved == here)


def _same_layout(directory: str, train_state: dict) -> bool:
    """Whether this run has the TP/PP/DP layout the checkpoint's per-rank RNG states were saved
    at (a checkpoint without the record: as many ranks); a note where it has not."""
    saved, layout = train_state.get("layout"), _layout()
    if saved is None:
        return len([f for f in os.listdir(directory) if f.startswith("rng_rank")]) == dist.get_world_size()
    if saved != layout:
        _note(f"{directory}: saved at {_describe(saved)}, this run is {_describe(layout)}: its per-rank "
              f"RNG states are not restored; they keep the states this run's --seed gave them")
    return saved == layout


def _describe(layout: dict) -> str:
    return (f"TP {layout['tensor_model_parallel_size']} PP {layout['pipeline_model_parallel_size']} "
            f"DP {layout['data_parallel_size']}")


def _note(message: str) -> None:
    """A note on the load, once per job: every rank takes the same decision."""
    if dist.get_rank() == 0:
        log.warning("%s", message)
