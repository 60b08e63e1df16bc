"""Token NLL from final hidden states, vocab-parallel and in chunks of tokens.

Why not the model's own loss (``GPTModel.forward(labels=...)``): it runs the
output layer over every position of the batch at once, so it holds the logits
of the whole batch ([b, s, V/tp], upcast to fp32 inside megatron's cross
entropy). For a 152K vocabulary at 8 x 1024 that is 5 GB per TP rank. Here the
output projection and the softmax run on at most ``chunk_tokens`` positions at
a time, and only on positions that count (loss mask 1): padding and
predictions from an EOD never reach the output layer.

Why tiles: a GEMM library picks its kernel from the matrix shape, and kernels
round differently (measured on the CPU: chunks of a few rows and a short last chunk
give other fp32 bits than full ones, and oneDNN's bf16 AMX kernel changes at 384 rows), so a position's NLL would
depend on how many positions share its chunk. The output projection therefore
always runs as GEMMs of exactly ``TILE_ROWS`` rows (the rows padded up to whole
tiles, chunks rounded to whole tiles), whatever the chunk size: on the CPU the
scores are bit-identical at any chunk size, in fp32 and bf16 (tested). Chunks
only decide how much memory the logits take and how many softmax passes and
TP all-reduces run.

Each TP rank holds a slice of the vocabulary (the output layer is column
parallel); the log-sum-exp and the target logit are combined across the TP
group with two small all-reduces per chunk, never gathering the vocabulary.
Megatron's padding of the vocabulary (rows past ``vocab_size``) is masked out:
the distribution is over the model's real vocabulary, as in HF transformers.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

TILE_ROWS = 256  # rows of every output-projection GEMM: large enough for full-speed kernels on GPUs


def chunk_tokens_for(budget_bytes: int, vocab_per_rank: int) -> int:
    """Positions per chunk so that the fp32 logits of a chunk fit in ``budget_bytes``."""
    return max(1, budget_bytes // (4 * vocab_per_rank))


def tile_rows(rows: int) -> int:
    """``rows`` rounded down to whole tiles, at least one tile: the chunk size actually used."""
    return max(TILE_ROWS, rows // TILE_ROWS * TILE_ROWS)


def padded_rows(n: int) -> int:
    """``n`` rounded up to whole tiles."""
    return -(-n // TILE_ROWS) * TILE_ROWS


def _tiled_logits(hidden: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """``hidden @ weight_t`` in fp32, computed as GEMMs of TILE_ROWS rows (``hidden``'s rows
    are a multiple of it)."""
    logits = hidden.new_empty((hidden.shape[0], weight_t.shape[1]))
    for t in range(0, hidden.shape[0], TILE_ROWS):
        torch.mm(hidden[t:t + TILE_ROWS], weight_t, out=logits[t:t + TILE_ROWS])
    return logits.float()


def vocab_parallel_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_size: int,
    vocab_start: int = 0,
    chunk_tokens: int = 1024,
    group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """fp32 NLL ``-log p(target)`` of each row of ``hidden`` [n, h].

    ``weight`` [V_local, h] is this rank's slice of the output layer, covering
    vocabulary ids ``vocab_start .. vocab_start + V_local``; ids at or past
    ``vocab_size`` are padding. With ``group`` of size > 1 the slices of the
    group's ranks are combined (every rank must call with the same rows).
    ``chunk_tokens`` is rounded down to whole tiles (at least one); rows that do
    not fill the last tile are padded here (callers that pad themselves avoid a copy).
    """
    n = hidden.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.float32, device=hidden.device)
    full = padded_rows(n)
    if full != n:
        hidden = torch.cat([hidden, hidden.new_zeros((full - n, hidden.shape[1]))])
        targets = torch.cat([targets, targets.new_zeros(full - n)])
    chunk = tile_rows(chunk_tokens)
    out = torch.empty(full, dtype=torch.float32, device=hidden.device)
    tp = dist.get_world_size(group) if group is not None else 1
    local = weight.shape[0]
    real = max(0, min(local, vocab_size - vocab_start))  # rows that are real tokens
    if tp == 1:
        # The whole vocabulary is here: drop the padding rows, fused log-softmax + NLL.
        weight_t = weight[:real].t()
        for lo in range(0, full, chunk):
            hi = min(full, lo + chunk)
            logits = _tiled_logits(hidden[lo:hi], weight_t)  # [c, V] fp32: the only big tensor
            out[lo:hi] = F.cross_entropy(logits, targets[lo:hi], reduction="none")
        return out[:n]
    weight_t = weight.t()
    for lo in range(0, full, chunk):
        hi = min(full, lo + chunk)
        logits = _tiled_logits(hidden[lo:hi], weight_t)  # [c, V/tp] fp32
        if real < local:
            logits[:, real:] = float("-inf")
        tgt = targets[lo:hi] - vocab_start
        mine = (tgt >= 0) & (tgt < real)
        target_logit = logits.gather(1, tgt.clamp(0, local - 1)[:, None]).squeeze(1)
        target_logit = torch.where(mine, target_logit, torch.zeros_like(target_logit))
        # log-sum-exp over the whole vocabulary: global max, then the sum of exp across ranks.
        row_max = logits.max(dim=1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        logits.sub_(row_max[:, None]).exp_()
        sums = torch.stack([logits.sum(dim=1), target_logit])
        dist.all_reduce(sums, group=group)
        out[lo:hi] = torch.log(sums[0]) + row_max - sums[1]
        del logits
    return out[:n]


def per_instance_sums(nll: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """[b, 2] float64 (NLL sum, counted tokens) from the NLLs of the counted positions.

    ``nll`` holds one value per nonzero of ``loss_mask`` [b, s], in row-major
    order. The sum runs over a fixed [b, s] layout, so an instance's result does
    not depend on how the other rows are split into chunks.
    """
    mask = loss_mask.reshape(-1) > 0
    full = torch.zeros(mask.numel(), dtype=torch.float64, device=nll.device)
    full[mask] = nll.double()
    b = loss_mask.shape[0]
    sums = full.view(b, -1).sum(dim=1)
    counts = (loss_mask > 0).sum(dim=1).double()
    return torch.stack([sums, counts], dim=1)
