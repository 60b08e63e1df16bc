"""One training step on megatron-core: DDP, the megatron optimizer, pipeline schedules.

The loss is the mean NLL over every counted token of the global batch, whatever
the split into micro-batches, data-parallel ranks and pipeline stages
(``calculate_per_token_loss``): summed per micro-batch, token counts
all-reduced, gradients divided once in ``finalize_model_grads``. That is what
makes DP=2, TP=2 and PP=2 runs give the same losses as one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Optional

import torch

from megatron_miniplm import platform


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW with the paper's defaults (β 0.9 / 0.98, weight decay 0.1, clip 1.0)."""

    lr: float = 6e-4
    min_lr: float = 6e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    bf16: bool = False


def wrap_ddp(model: torch.nn.Module, *, bf16: bool = False):
    """megatron-core DDP: bucketed grad all-reduce over the data-parallel group."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    # Read by DDP at construction: with per-token loss it sums gradients over DP
    # (no 1/DP factor) and finalize_model_grads divides by the global token count.
    model.config.calculate_per_token_loss = True
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        # The distributed optimizer's checkpoints do not resume on CPU: GPU only.
        use_distributed_optimizer=bf16 and platform.cuda_available(),
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def build_model_chunks(config, *, bf16: bool = False) -> list:
    """This rank's ``GPTModel`` slice on its device, DDP-wrapped, schedule hooks attached.

    bf16 on GPU: bf16 parameters (fp32 master weights in the optimizer). bf16 on
    CPU: fp32 parameters under bf16 autocast (run them with ``forward_step_for(bf16)``),
    since megatron's mixed-precision wrappers accept only CUDA tensors.
    """
    from megatron_miniplm.models.gpt import build_model

    on_gpu = platform.cuda_available()
    mixed = bf16 and on_gpu
    model = build_model(config, params_dtype=torch.bfloat16 if mixed else torch.float32, bf16=mixed)
    if on_gpu:
        model.cuda()
    chunks = [wrap_ddp(model, bf16=bf16)]
    attach_schedule_hooks(chunks)
    return chunks


def build_optimizer(model_chunks: list, settings: OptimizerSettings):
    """``get_megatron_optimizer``; mixed precision (bf16 params, fp32 master) on GPU.

    On CPU, megatron's mixed-precision wrappers accept only CUDA tensors, so bf16
    training there keeps fp32 parameters (see ``megatron_miniplm.platform``).
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    mixed = settings.bf16 and platform.cuda_available()
    config = OptimizerConfig(
        optimizer="adam",
        lr=settings.lr,
        min_lr=settings.min_lr,
        weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2,
        adam_eps=settings.adam_eps,
        clip_grad=settings.clip_grad,
        bf16=mixed,
        params_dtype=torch.bfloat16 if mixed else torch.float32,
        use_distributed_optimizer=mixed,
    )
    return get_megatron_optimizer(config, model_chunks)


def attach_schedule_hooks(model_chunks: list) -> None:
    """Point the model config at DDP's grad sync and megatron's grad finalization."""
    from megatron.core.distributed import finalize_model_grads

    for chunk in model_chunks:
        config = chunk.config
        assert config.calculate_per_token_loss, "wrap the model with wrap_ddp first"
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = chunk.no_sync
        config.grad_sync_func = None


def masked_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Schedule loss function: (sum of masked NLL, counted tokens, logged [sum, count])."""
    mask = loss_mask.reshape(-1).float()
    total = torch.sum(per_token_loss.reshape(-1).float() * mask)
    count = mask.sum().to(torch.int)
    report = torch.stack([total.detach(), mask.sum()])
    return total, count, {"lm loss": report}


def gpt_forward_step(data_iterator: Iterator[dict], model, autocast_bf16: bool = False):
    """Schedule forward step for batches of {tokens, labels, loss_mask, position_ids}.

    ``autocast_bf16``: bf16 compute over fp32 parameters (the CPU's bf16 path).
    """
    batch = next(data_iterator)
    device = platform.device()
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    position_ids = batch["position_ids"].to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
        output = model(tokens, position_ids, None, labels=labels)
    return output, partial(masked_loss, batch["loss_mask"].to(device, non_blocking=True))


def forward_step_for(bf16: bool):
    """The schedule's forward step matching build_model_chunks(bf16=...): bf16 parameters
    on GPU, bf16 autocast over fp32 parameters on CPU."""
    return partial(gpt_forward_step, autocast_bf16=bf16 and not platform.cuda_available())


@dataclass
class StepResult:
    loss: Optional[float]  # mean NLL per counted token; None off the last pipeline stage
    tokens: int  # counted tokens in the global batch (this DP rank's share on other stages: 0)
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
) -> StepResult:
    """Forward/backward over ``num_microbatches`` micro-batches, then one optimizer step."""
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
    loss, tokens = reduce_loss_reports(reports)
    return StepResult(loss=loss, tokens=tokens, grad_norm=grad_norm, skipped=not ok)


def reduce_loss_reports(reports: list) -> tuple[Optional[float], int]:
    """Global mean loss from the per-micro-batch [sum, count] reports (last stage only)."""
    from megatron.core import parallel_state as ps

    if not reports:
        return None, 0
    totals = torch.stack([r["lm loss"] for r in reports]).sum(dim=0).double()
    torch.distributed.all_reduce(totals, group=ps.get_data_parallel_group())
    return (totals[0] / totals[1].clamp(min=1)).item(), int(totals[1].item())


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
