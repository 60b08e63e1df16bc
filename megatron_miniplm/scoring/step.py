"""The forward-only scoring step, with no host synchronisation per batch.

Why: on a GPU a batch of a small teacher takes milliseconds, so anything that makes the
host wait for the device each batch (a boolean-mask index on a device tensor, whose
result size the host must read; a ``.cpu()``; a copy from pageable memory) leaves the
GPU idle while the host prepares the next one. So:

- what depends only on the batch is prepared on the host before the step: the counted
  positions as gather indices into the sequence-first hidden states, padded to whole
  tiles (nll.TILE_ROWS, so the NLL needs no copy to pad), and their targets; the batch
  is pinned (``platform.pin``) and copied with ``non_blocking``;
- the token NLLs are copied back without blocking into page-locked memory behind an
  event (``platform.copy_to_host``) and turned into per-instance sums and recorded one
  step later, while the device runs the next step (``Pending``, ``DeferredRecorder``). On
  the CPU both are plain tensors;
- the ranks' vote on stopping (SIGTERM) is an asynchronous all-reduce read ``StopVote.LAG``
  steps later, when the device is long done with it (``StopVote``), instead of a blocking
  all-reduce and ``.tolist()`` before every step.

The per-instance sums are computed on the host in float64 over the fixed [b, s] layout,
exactly as before, so the scores do not depend on the overlap.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from megatron_miniplm import platform
from megatron_miniplm.scoring.model import hidden_states_only, output_weight
from megatron_miniplm.scoring.nll import padded_rows, per_instance_sums, vocab_parallel_nll


def with_rows(batch: dict) -> dict:
    """``batch`` (collated, on the host) with ``rows`` (indices of the counted positions,
    row-major over [b, s], into the [s * b] flattened hidden states), ``targets`` (their
    labels), both padded to whole tiles, and ``counted``; pinned where that helps."""
    mask = batch["loss_mask"] > 0
    b, s = mask.shape
    flat = mask.reshape(-1).nonzero().squeeze(1)
    n = flat.numel()
    rows = torch.zeros(padded_rows(n), dtype=torch.int64)
    rows[:n] = (flat % s) * b + flat // s
    targets = torch.zeros(padded_rows(n), dtype=torch.int64)
    targets[:n] = batch["labels"].reshape(-1)[flat]
    return platform.pin({**batch, "rows": rows, "targets": targets, "counted": n})


@dataclass
class Pending:
    """One batch's token NLLs on their way to the host."""

    nll: torch.Tensor  # host tensor, complete once ``ready`` is
    ready: object  # an event
    loss_mask: torch.Tensor

    def scores(self) -> np.ndarray:
        """[b, 2] float64 (NLL sum, counted tokens); waits for this batch's copy only."""
        self.ready.synchronize()
        return per_instance_sums(self.nll, self.loss_mask).numpy()


class BatchScorer:
    """Turns the last stage's hidden states into this batch's token NLLs (``Pending``)."""

    def __init__(self, model, vocab_size: int, chunk_tokens: int):
        from megatron.core import parallel_state as ps

        self.model = model
        self.weight = output_weight(model)
        self.vocab_size = vocab_size
        self.chunk_tokens = chunk_tokens
        self.group = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
        local = self.weight.shape[0] if self.weight is not None else 0
        self.vocab_start = ps.get_tensor_model_parallel_rank() * local

    def __call__(self, batch: dict, hidden: torch.Tensor) -> Pending:
        rows = batch["rows"].to(hidden.device, non_blocking=True)
        targets = batch["targets"].to(hidden.device, non_blocking=True)
        states = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)  # [tiles, h]
        nll = vocab_parallel_nll(states, self.weight, targets, vocab_size=self.vocab_size,
                                 vocab_start=self.vocab_start, chunk_tokens=self.chunk_tokens,
                                 group=self.group)[: batch["counted"]]
        host, ready = platform.copy_to_host(nll)
        return Pending(host, ready, batch["loss_mask"])


def run_step(model, scorer: BatchScorer, batches: list[dict]) -> list[Pending]:
    """One schedule call over ``batches`` (``with_rows`` micro-batches of any shapes): one
    ``Pending`` per batch on the last pipeline stage, [] elsewhere."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = platform.device()

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        with hidden_states_only(chunk):
            hidden = chunk(batch["tokens"].to(device, non_blocking=True),
                           batch["position_ids"].to(device, non_blocking=True), None)

        def loss_func(output):
            return output.new_zeros(()), {"scores": scorer(batch, output)}

        return hidden, loss_func

    with torch.no_grad():
        reports = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
            num_microbatches=len(batches), seq_length=batches[0]["tokens"].shape[1],
            micro_batch_size=batches[0]["tokens"].shape[0], forward_only=True,
        )
    return [r["scores"] for r in reports]


class StopVote:
    """Whether any rank received a stop signal, agreed on by all ranks without stalling the
    device. Every rank calls it at the same steps (the steps every replica takes); the vote
    of a step is read ``LAG`` calls later, so all ranks stop at the same step, ``LAG`` steps
    after the signal. A world of one needs no vote."""

    LAG = 2

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.votes: deque = deque()

    def __call__(self, received: bool) -> bool:
        if self.world == 1:
            return received
        dist = self.dist
        flag = torch.full((1,), int(received), dtype=torch.int32, device=platform.device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True).wait()  # the stream waits, not the host
        self.votes.append(platform.copy_to_host(flag))
        if len(self.votes) <= self.LAG:
            return False
        host, ready = self.votes.popleft()
        ready.synchronize()
        return bool(host[0])


class DeferredRecorder:
    """Appends each batch's scores to a progress shard (``resume.ShardWriter``) one step after
    the step that computed them: reading a ``Pending`` waits for its copy to the host, which
    by then the device has finished, so the host never waits for the step it just queued."""

    def __init__(self, writer):
        self.writer = writer
        self._pending: list[tuple[int, Pending]] = []  # the previous step's (batch index, scores)

    def submit(self, batch_indices: list[int], results: list[Pending]) -> None:
        """Records the previous step's scores and holds these until the next call (or ``close``)."""
        self._record()
        self._pending = list(zip(batch_indices, results))

    def close(self) -> None:
        """Records what is held and closes the shard (flushed, and fsynced if it syncs)."""
        self._record()
        self.writer.close()

    def _record(self) -> None:
        for index, result in self._pending:
            self.writer.append(index, result.scores())
        self._pending = []
