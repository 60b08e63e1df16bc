"""Vanilla KD: online token-level distillation, the baseline MiniPLM is measured against.

Each counted token's loss is ``(1 - r) * CE + r * T^2 * KL(p_teacher^T || p_student^T)``
over the full vocabulary, where ``p^T`` is the softmax at temperature ``T`` (the ``T^2``
of Hinton et al. keeps the gradient's scale; at ``T = 1`` it is the plain KL). The
teacher is a checkpoint of this project, frozen, in eval mode, in the student's
precision and tensor-parallel layout; pipeline parallelism is not supported with KD.

The KL is computed vocabulary-parallel and in chunks of tokens: each TP rank holds its
slice of the student's logits and projects the teacher's final hidden states onto the
same slice of the teacher's output layer (regathered once at start-up into the
student's vocabulary partition, which the teacher's may not share), so neither
model's full logits are ever gathered, and the teacher's logits exist one chunk at a
time, in the forward and again (recomputed) in the backward pass. The distribution
is over the student's real vocabulary: megatron's padding rows are left out.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_miniplm.training.config import KDSettings


def _lse(logits: torch.Tensor, group) -> torch.Tensor:
    """log-sum-exp of each row over the whole (vocab-parallel) vocabulary."""
    row_max = logits.max(dim=1).values
    if group is not None:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    sums = (logits - row_max[:, None]).exp().sum(dim=1)
    if group is not None:
        dist.all_reduce(sums, group=group)
    return sums.log() + row_max


class _VocabParallelKL(torch.autograd.Function):
    """Per-row T^2 * KL(softmax(t / T) || softmax(s / T)); t = teacher_hidden @ teacher_weight^T."""

    @staticmethod
    def forward(ctx, student_logits, teacher_hidden, teacher_weight, real, temperature, chunk, group):
        n = student_logits.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=student_logits.device)
        lse_s = torch.empty_like(out)
        lse_t = torch.empty_like(out)
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            s, t = _scaled(student_logits[lo:hi], teacher_hidden[lo:hi], teacher_weight, real, temperature)
            lse_s[lo:hi], lse_t[lo:hi] = _lse(s, group), _lse(t, group)
            log_pt = t - lse_t[lo:hi, None]
            log_ps = s - lse_s[lo:hi, None]
            part = torch.where(torch.isfinite(log_pt), log_pt.exp() * (log_pt - log_ps), torch.zeros_like(log_pt))
            out[lo:hi] = part.sum(dim=1)
        if group is not None:
            dist.all_reduce(out, group=group)
        ctx.save_for_backward(student_logits, teacher_hidden, teacher_weight, lse_s, lse_t)
        ctx.real, ctx.temperature, ctx.chunk = real, temperature, chunk
        return out * temperature ** 2

    @staticmethod
    def backward(ctx, grad_out):
        student_logits, teacher_hidden, teacher_weight, lse_s, lse_t = ctx.saved_tensors
        T = ctx.temperature
        grad = torch.empty_like(student_logits)
        for lo in range(0, student_logits.shape[0], ctx.chunk):
            hi = min(student_logits.shape[0], lo + ctx.chunk)
            s, t = _scaled(student_logits[lo:hi], teacher_hidden[lo:hi], teacher_weight, ctx.real, T)
            p_s = (s - lse_s[lo:hi, None]).exp()
            p_t = (t - lse_t[lo:hi, None]).exp()
            # d(T^2 KL)/d(student logit) = T^2 * (p_s - p_t) / T
            grad[lo:hi] = ((p_s - p_t) * (grad_out[lo:hi, None] * T)).to(grad.dtype)
        return grad, None, None, None, None, None, None


def _scaled(student, teacher_hidden, teacher_weight, real, temperature):
    """fp32 logits / T of a chunk, padding rows of the vocabulary at -inf."""
    s = student.float() / temperature
    t = (teacher_hidden @ teacher_weight.t()).float() / temperature
    if real < s.shape[1]:
        s[:, real:] = float("-inf")
        t[:, real:] = float("-inf")
    return s, t


def vocab_parallel_kl(student_logits: torch.Tensor, teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, *,
                      real: int, temperature: float = 1.0, chunk_tokens: int = 1024,
                      group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """T^2 * KL(teacher || student) per row, fp32 [n].

    ``student_logits`` [n, V_local]: this rank's vocabulary slice; ``teacher_hidden`` [n, h]
    and ``teacher_weight`` [V_local, h] give the teacher's logits of the same slice;
    ``real``: how many of the slice's rows are real vocabulary (the rest is padding).
    Differentiable in ``student_logits`` only.
    """
    return _VocabParallelKL.apply(student_logits, teacher_hidden, teacher_weight, real, temperature,
                                  chunk_tokens, group)


class Teacher:
    """The frozen teacher beside the student: its final hidden states for a batch, and its
    output layer regathered into the student's vocabulary partition."""

    def __init__(self, settings: KDSettings, student, *, bf16: bool, data_tokenizer: dict, data_path: str,
                 impl=None, chunk_mb: int = 32):
        from megatron.core import parallel_state as ps

        from megatron_miniplm.scoring.model import (
            build_scoring_model, check_tokenizer, output_weight, resolve_checkpoint,
        )
        from megatron_miniplm.scoring.nll import chunk_tokens_for

        if ps.get_pipeline_model_parallel_world_size() > 1:
            raise ValueError("Vanilla KD (kd_teacher_load, --kd-teacher-load) does not support pipeline "
                             "parallelism: use --pipeline-model-parallel-size 1")
        self.source = resolve_checkpoint(settings.kd_teacher_load)
        check_tokenizer(self.source, data_tokenizer, data_path)  # same tokenizer, vocabulary covers the data
        if self.source.config.vocab_size < student.vocab_size:
            raise ValueError(f"the teacher's vocabulary ({self.source.config.vocab_size}, "
                             f"{settings.kd_teacher_load}) is smaller than the student's ({student.vocab_size})")
        self.config = self.source.config
        self.model = build_scoring_model(self.source, bf16=bf16, impl=impl)
        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        local = student.padded_vocab_size(tp) // tp
        start = rank * local
        weight = output_weight(self.model)
        if tp > 1:
            full = weight.new_empty((weight.shape[0] * tp, weight.shape[1]))
            dist.all_gather_into_tensor(full, weight.contiguous(), group=ps.get_tensor_model_parallel_group())
        else:
            full = weight
        rows = full[start:start + local]
        if rows.shape[0] < local:  # the student's padding reaches past the teacher's rows
            rows = torch.cat([rows, rows.new_zeros(local - rows.shape[0], rows.shape[1])])
        self.weight = rows.detach().clone()
        self.real = max(0, min(local, student.vocab_size - start))
        self.group = ps.get_tensor_model_parallel_group() if tp > 1 else None
        self.chunk_tokens = chunk_tokens_for(chunk_mb << 20, local)

    def identity(self) -> dict:
        """What the student's checkpoints record of the teacher (it is not saved with them)."""
        return self.source.identity()

    @torch.no_grad()
    def hidden_states(self, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        from megatron_miniplm.scoring.model import hidden_states_only

        with hidden_states_only(self.model):
            return self.model(tokens, position_ids, None)  # [s, b, h], after the final norm


def counted_rows(loss_mask: torch.Tensor) -> torch.Tensor:
    """Flat indices (int64, ascending) of the tokens the loss counts: loss mask > 0.

    Give it the host copy of the mask, as the data loader made it: the number of rows
    depends on the mask's values, so computed on the device it would make the host wait
    for the device (and copy the count back) every micro-batch."""
    return (loss_mask.reshape(-1) > 0).nonzero().squeeze(1)


def kd_loss(teacher: Teacher, settings: KDSettings, labels, loss_mask, rows, teacher_hidden, logits):
    """Schedule loss function of a KD micro-batch: (sum of the mixed loss over counted tokens,
    their count, logged [sum, count] of the LM loss, the KD loss and the mixed loss).

    ``rows``: ``counted_rows`` of the micro-batch, on the device. Rows are gathered by these
    indices rather than selected by a boolean mask on the device, whose output size the host
    would have to wait for."""
    from megatron.core import tensor_parallel

    # index_select copies: megatron's CE below works in place on the logits
    student = logits.reshape(-1, logits.shape[-1]).index_select(0, rows)
    hidden = teacher_hidden.transpose(0, 1).reshape(-1, teacher_hidden.shape[-1]).index_select(0, rows)
    kl = vocab_parallel_kl(student, hidden, teacher.weight, real=teacher.real, temperature=settings.kd_temperature,
                           chunk_tokens=teacher.chunk_tokens, group=teacher.group)
    # megatron's vocab-parallel CE, as the model's own loss computes it (rows are independent,
    # so the [b, s] layout gives the same values as its [s, b] one)
    ce = tensor_parallel.vocab_parallel_cross_entropy(logits, labels)  # [b, s]
    ce_sum = (ce.reshape(-1).float() * loss_mask.reshape(-1).float()).sum()
    kl_sum = kl.sum()
    r = settings.kd_ratio
    total = (1.0 - r) * ce_sum + r * kl_sum
    count = (loss_mask.reshape(-1) > 0).sum()  # on the device: no wait
    n = count.float()
    return total, count.to(torch.int), {"lm loss": torch.stack([ce_sum.detach(), n]),
                                        "kd loss": torch.stack([kl_sum.detach(), n]),
                                        "total loss": torch.stack([total.detach(), n])}


def kd_forward_step(teacher: Teacher, settings: KDSettings, data_iterator, model):
    """Schedule forward step: the teacher's hidden states (no grad), the student's logits.

    The batch is the data loader's, on the host: the counted rows' indices are computed
    there and copied to the device like the batch's tensors (pinned on a GPU, so that the
    copy does not wait either). A batch already on the device is read back once for them."""
    from functools import partial

    from megatron_miniplm import platform

    batch = next(data_iterator)
    device = platform.device()
    rows = platform.pin({"rows": counted_rows(batch["loss_mask"].cpu())})["rows"]
    tokens = batch["tokens"].to(device, non_blocking=True)
    position_ids = batch["position_ids"].to(device, non_blocking=True)
    teacher_hidden = teacher.hidden_states(tokens, position_ids)
    logits = model(tokens, position_ids, None)  # [b, s, V/tp]
    return logits, partial(kd_loss, teacher, settings, batch["labels"].to(device, non_blocking=True),
                           batch["loss_mask"].to(device, non_blocking=True), rows.to(device, non_blocking=True),
                           teacher_hidden)
