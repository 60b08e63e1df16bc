"""One training step on megatron-core: DDP, the megatron optimizer, pipeline schedules.

The loss is the mean NLL over every counted token of the global batch, whatever
the split into micro-batches, data-parallel ranks and pipeline stages
(``calculate_per_token_loss``): summed per micro-batch, token counts
all-reduced, gradients divided once in ``finalize_model_grads``. That is what
makes DP=2, TP=2 and PP=2 runs give the same losses as one process.

Precision is Megatron-LM's on every device: ``bf16`` means bf16 parameters and
activations with fp32 main parameters and fp32 gradient reduction in
megatron-core's mixed-precision (or distributed) optimizer; otherwise fp32
throughout. The CPU runs the same objects as a GPU (``megatron_miniplm.platform``
lets megatron-core's optimizers accept CPU tensors).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Optional

import torch

from megatron_miniplm import platform
from megatron_miniplm.training.config import DDPSettings, OptimizerSettings


def wrap_ddp(model: torch.nn.Module, settings: DDPSettings = DDPSettings()):
    """megatron-core DDP: bucketed gradient reduction over the data-parallel group, in fp32."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    # Read by DDP at construction: with per-token loss it sums gradients over DP
    # (no 1/DP factor) and finalize_model_grads divides by the global token count.
    model.config.calculate_per_token_loss = True
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,  # Megatron-LM forces it for bf16; moot for fp32
        overlap_grad_reduce=settings.overlap_grad_reduce,
        overlap_param_gather=settings.overlap_param_gather,
        use_distributed_optimizer=settings.use_distributed_optimizer,
        bucket_size=settings.ddp_bucket_size,
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def build_model_chunks(config, *, bf16: bool = False, ddp: DDPSettings = DDPSettings(), recompute=None,
                       impl=None, sequence_parallel: bool = False) -> list:
    """This rank's ``GPTModel`` slice on its device, DDP-wrapped, schedule hooks attached;
    ``impl``: a resolved ``models.gpt.Implementation`` (default: Megatron-LM's defaults here)."""
    from megatron_miniplm.models.gpt import build_model
    from megatron_miniplm.models.config import RecomputeSettings

    model = build_model(config, params_dtype=torch.bfloat16 if bf16 else torch.float32, bf16=bf16,
                        recompute=recompute or RecomputeSettings(), impl=impl, sequence_parallel=sequence_parallel)
    chunks = [wrap_ddp(model, ddp)]
    attach_schedule_hooks(chunks)
    return chunks


def build_optimizer(model_chunks: list, settings: OptimizerSettings, *, bf16: bool = False):
    """``get_megatron_optimizer``: Adam with fp32 main parameters for bf16 models, sharded
    over data-parallel ranks when the chunks' DDP uses the distributed optimizer."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam",
        lr=settings.lr,
        min_lr=settings.final_lr,
        weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2,
        adam_eps=settings.adam_eps,
        clip_grad=settings.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=model_chunks[0].ddp_config.use_distributed_optimizer,
    )
    return get_megatron_optimizer(config, model_chunks)


def attach_schedule_hooks(model_chunks: list) -> None:
    """Point the model config at DDP's grad sync and megatron's grad finalization (as
    Megatron-LM's training loop does: with overlap, the schedule starts each chunk's
    gradient reduction itself)."""
    from megatron.core.distributed import finalize_model_grads

    for chunk in model_chunks:
        config = chunk.config
        assert config.calculate_per_token_loss, "wrap the model with wrap_ddp first"
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = chunk.no_sync
        config.grad_sync_func = chunk.start_grad_sync if chunk.ddp_config.overlap_grad_reduce else None
        config.param_sync_func = chunk.start_param_sync if chunk.ddp_config.overlap_param_gather else None


@contextlib.contextmanager
def params_gathered(model_chunks: list):
    """Every rank's parameters complete inside the block (a save, an evaluation).

    With --overlap-param-gather the all-gather of the updated parameters is left
    in flight after a step and finished by forward pre-hooks; as Megatron-LM does,
    the hooks are taken off and the gather is completed first, then put back.
    """
    overlapped = [c for c in model_chunks if c.ddp_config.overlap_param_gather]
    for chunk in overlapped:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in overlapped:
            chunk.enable_forward_pre_hook()


def masked_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Schedule loss function: (sum of masked NLL, counted tokens, logged [sum, count])."""
    mask = loss_mask.reshape(-1).float()
    total = torch.sum(per_token_loss.reshape(-1).float() * mask)
    count = mask.sum().to(torch.int)
    report = torch.stack([total.detach(), mask.sum()])
    return total, count, {"lm loss": report}


def gpt_forward_step(data_iterator: Iterator[dict], model):
    """Schedule forward step for batches of {tokens, labels, loss_mask, position_ids}."""
    batch = next(data_iterator)
    device = platform.device()
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    position_ids = batch["position_ids"].to(device, non_blocking=True)
    output = model(tokens, position_ids, None, labels=labels)
    return output, partial(masked_loss, batch["loss_mask"].to(device, non_blocking=True))


@dataclass
class StepResult:
    """One step's outcome. The logged losses stay on the device: reading them waits for the
    step to finish, so the trainer reads many steps' at once, at its logging interval."""

    values: torch.Tensor  # float64 [len(loss_names) + 1] on the device: each logged loss's mean per
    #                       counted token, then the counted tokens of the global batch (zeros off
    #                       the last pipeline stage)
    grad_norm: Optional[float]
    skipped: bool


def train_step(
    model_chunks: list,
    optimizer,
    data_iterator: Iterator[dict],
    *,
    num_microbatches: int,
    micro_batch_size: int,
    seq_length: int,
    forward_step: Callable = gpt_forward_step,
    loss_names: tuple = ("lm loss",),
) -> StepResult:
    """Forward/backward over ``num_microbatches`` micro-batches, then one optimizer step.
    ``loss_names``: the losses the forward step logs, in the order of ``StepResult.values``."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=model_chunks,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    ok, grad_norm, _ = optimizer.step()
    return StepResult(values=reduce_loss_reports(reports, loss_names), grad_norm=grad_norm, skipped=not ok)


def reduce_loss_reports(reports: list, names: tuple) -> torch.Tensor:
    """Global mean of each logged loss from the per-micro-batch [sum, count] reports, then the
    counted tokens, as one device tensor (one all-reduce for all of them; no host sync).
    Stages without reports (not the last pipeline stage) give zeros."""
    from megatron.core import parallel_state as ps

    if not reports:
        return torch.zeros(len(names) + 1, dtype=torch.float64, device=platform.device())
    totals = torch.stack([torch.stack([r[k] for k in names]) for r in reports]).sum(dim=0).double()  # [k, 2]
    torch.distributed.all_reduce(totals, group=ps.get_data_parallel_group())
    return torch.cat([totals[:, 0] / totals[:, 1].clamp(min=1), totals[:1, 1]])


def forward_losses(model_chunks: list, data_iterator, *, num_microbatches: int,
                   micro_batch_size: int, seq_length: int) -> list:
    """Forward only: per-token losses [b, s] of each micro-batch (last stage; [] elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = platform.device()

    def step(it, model):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(it).items()}
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, lambda out: (out.sum(), {"per_token": out.detach().clone()})

    with torch.no_grad():
        reports = get_forward_backward_func()(
            forward_step_func=step, data_iterator=data_iterator, model=model_chunks,
            num_microbatches=num_microbatches, seq_length=seq_length,
            micro_batch_size=micro_batch_size, forward_only=True,
        )
    return [r["per_token"] for r in reports]
