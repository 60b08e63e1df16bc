"""How large a scoring batch and a logits chunk are: from free memory and a tokens-per-batch target.

Why automatic: the right sizes differ by orders of magnitude between machines. On a CPU
8 x 1024 tokens already keep the matmuls at full speed; on a GPU a 135M teacher at that
size is launch-bound, and a fixed 32 MB of logits is ~55 positions at a 152K vocabulary:
~150 chunks per batch, each with two TP all-reduces. So, unless given explicitly:

- micro-batch: ``--target-tokens-per-batch`` over the longest instance's predictions,
  fewer if the batch's activations would take more than half of the usable memory;
- logits chunk: what the batch's activations leave of the usable memory, divided by the
  bytes of one row of logits, at most the largest batch (then one chunk per batch) and
  at most 2^31 logits (beyond that, kernels leave their 32-bit indexing), in whole tiles
  (nll.TILE_ROWS).

Usable memory is ``USABLE_FRACTION`` of ``free_memory()``, measured after the model
is loaded and taken as the least over all ranks, so that every rank chooses the same sizes
(TP ranks must agree on the chunks, all ranks on the batches). The per-token estimates
bound one layer's transients (forward-only: nothing is kept across layers), doubled for the
allocator's slack; a mixture of experts' count the rows its experts can be sent on this rank
(top-k copies, gathered over TP and, under expert parallelism, from the other ranks), not the
dense FFN width. The weights (a rank's share of the experts: E / EP) are in the free memory,
measured once the model is loaded.

The micro-batch size changes the batches, hence the numbers. The chunk size does not on the
CPU (nll.py, tested) but may on a GPU, whose reductions are tuned to the shape. Both are
part of the run's identity, and a rerun asked for the same sizes reuses the ones recorded by
the run it resumes or repeats (``identity.recorded_sizes``): free memory at start-up is not
a setting and must not change a resumed run's numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_miniplm import host_memory
from megatron_miniplm.scoring.dataset import ScoringError
from megatron_miniplm.scoring.nll import padded_rows, tile_rows

USABLE_FRACTION = 0.8  # of the free memory: room for cuBLAS/NCCL workspaces and fragmentation
SLACK = 2  # on the activation estimate
MAX_CHUNK_LOGITS = 2**31 - 1


@dataclass(frozen=True)
class Sizes:
    micro_batch_size: int
    logits_chunk_tokens: int
    why: str

    def record(self, request: dict) -> dict:
        """What the run's identity keeps: the request (the flags) and what it came to."""
        return {"request": request, "micro_batch_size": self.micro_batch_size,
                "logits_chunk_tokens": self.logits_chunk_tokens, "why": self.why}

    @classmethod
    def from_record(cls, record: dict) -> "Sizes":
        return cls(int(record["micro_batch_size"]), int(record["logits_chunk_tokens"]),
                   f"recorded by the run this one continues ({record.get('why', '')})")


def request_of(cfg) -> dict:
    """The settings the sizes are chosen from (None: automatic)."""
    return {"micro_batch_size": cfg.micro_batch_size, "logits_chunk_mb": cfg.logits_chunk_mb,
            "target_tokens_per_batch": cfg.target_tokens_per_batch,
            "max_tokens_per_batch": cfg.max_tokens_per_batch}


def check_request(cfg) -> None:
    for flag, value, least in (("--micro-batch-size", cfg.micro_batch_size, 1),
                               ("--target-tokens-per-batch", cfg.target_tokens_per_batch, 1),
                               ("--max-tokens-per-batch", cfg.max_tokens_per_batch, 1),
                               ("--logits-chunk-mb", cfg.logits_chunk_mb, 0)):
        if value is not None and value < least:
            raise ScoringError(f"{flag} must be >= {least}, got {value}")


def longest_predictions(lengths: np.ndarray) -> int:
    """Predictions of the longest instance (an instance of n tokens gives n - 1)."""
    return max(1, int(np.max(lengths, initial=0)) - 1)


def activation_bytes_per_token(config, tp: int, dtype_bytes: int, seq: int, attention_scores: bool,
                               ep: int = 1) -> int:
    """Upper bound of one layer's forward transients per token on one rank: residual stream,
    norm output and gathered rows (4h), QKV and attention output (split by TP), the MLP's
    (mlp_elements_per_token); with an attention that materialises scores, fp32 [heads, s]
    per token."""
    h, kv = config.hidden_size, config.kv_heads * config.head_dim
    per = dtype_bytes * (4 * h + (2 * h + 2 * kv) // tp) + mlp_bytes_per_token(config, tp, ep, dtype_bytes)
    if attention_scores:
        per += config.num_attention_heads // tp * seq * (4 + 2 * dtype_bytes)
    return SLACK * per


def routed_copies_per_token(config, tp: int, ep: int) -> int:
    """Most rows an expert layer of this rank computes per token of its own sequence.

    megatron-core's dispatchers gather the tokens of the TP ranks (the same tokens: TP copies)
    and, under expert parallelism, bring each rank the tokens of the EP ranks that chose its
    experts. A token goes to k distinct experts, of which a rank holds E / EP, so at most
    min(k, E / EP) copies of each token of the TP x EP ranks reach it: k x TP at EP 1, and
    at EP > 1 the bound when every rank's tokens choose this rank's experts (routing drops
    none, so nothing less is sure)."""
    return tp * ep * min(config.moe_router_topk, config.num_experts // ep)


def mlp_bytes_per_token(config, tp: int, ep: int, dtype_bytes: int) -> int:
    """A dense SwiGLU: its fc1 output and product (3 ffn, split by TP). A mixture of experts:
    the gathered input and the combined output (TP rows of h each), the router's fp32 logits
    and probabilities and the probabilities gathered over TP (E each), and per routed copy
    (routed_copies_per_token) the permuted row and the expert's output row (2h) and its fc1
    output and product (3 moe_ffn, split by TP)."""
    if not config.num_experts:
        return dtype_bytes * 3 * config.ffn_hidden_size // tp
    h, m = config.hidden_size, config.expert_ffn_hidden_size
    copies = routed_copies_per_token(config, tp, ep)
    return (dtype_bytes * (2 * tp * h + copies * (2 * h + 3 * m // tp))
            + 4 * config.num_experts * (2 + tp))


def logit_bytes_per_row(vocab_local: int, dtype_bytes: int) -> int:
    """One row of a chunk: the GEMM output in the weights' dtype (when not fp32), its fp32
    copy, and the softmax's fp32 output (or, at TP > 1, its exp)."""
    return vocab_local * (8 + (dtype_bytes if dtype_bytes != 4 else 0))


# No working buffer may outgrow the heap glibc is told to keep (host_memory): past it, a freed
# buffer is unmapped and page-faulted in again at its next use.
CPU_WORKING_BUDGET = host_memory.THRESHOLD


def free_memory() -> tuple[int, str]:
    """Bytes this process may still use for working buffers on its device, and where the
    figure comes from. The one place that asks the device: sizing code takes the number.

    GPU: what the driver reports free on this process's device (``torch.cuda.mem_get_info``),
    i.e. after the weights and the caching allocator's reserve: that is the real limit.
    CPU: a fixed budget per process (CPU_WORKING_BUDGET), never more than the available RAM
    divided among the machine's local ranks; deliberately not the available RAM itself. On a CPU the
    memory is not the limit but the caches are: once the matmuls run at full speed, bigger
    buffers only add memory traffic (the logits-chunk sweep in benchmarks/RESULTS.md,
    "Scoring"). The RAM is also shared by every rank of the machine and the page cache, and a
    buffer past the kept heap (CPU_WORKING_BUDGET's comment) would be page-faulted in again
    on every use.
    """
    import os

    import torch

    from megatron_miniplm import platform

    if platform.cuda_available():
        device_index = torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(device_index)
        return int(free), (f"GPU {torch.cuda.get_device_name(device_index)}: {free / 2**30:.1f} of "
                           f"{total / 2**30:.1f} GiB free")
    import psutil

    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    available = psutil.virtual_memory().available // ranks
    budget = min(CPU_WORKING_BUDGET, available)
    return int(budget), (f"CPU: fixed {CPU_WORKING_BUDGET / 2**30:g} GiB working budget per process "
                         f"(available RAM per local rank: {available / 2**30:.1f} GiB)")


def least_free_memory() -> tuple[int, str]:
    """``free_memory()`` of this rank with the least over all ranks (collective)."""
    import torch
    import torch.distributed as dist

    from megatron_miniplm import platform

    free, why = free_memory()
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([free], dtype=torch.int64, device=platform.device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        if int(t.item()) < free:
            why += f"; least over {dist.get_world_size()} ranks: {int(t.item()) / 2**30:.1f} GiB"
        free = int(t.item())
    return free, why


def choose_sizes(cfg, config, *, tp: int, longest: int, attention_scores: bool,
                 free_bytes: int, free_why: str, ep: int = 1) -> Sizes:
    """The micro-batch size and logits chunk rows for ``cfg`` (a ScoreConfig) and the model
    ``config`` at tensor parallelism ``tp`` and expert parallelism ``ep``; explicit settings
    are kept as given."""
    dtype_bytes = 2 if cfg.bf16 else 4
    usable = int(free_bytes * USABLE_FRACTION)
    act = activation_bytes_per_token(config, tp, dtype_bytes, longest, attention_scores, ep)
    if cfg.micro_batch_size is not None:
        mbs, mbs_why = cfg.micro_batch_size, "--micro-batch-size"
    else:
        want = max(1, cfg.target_tokens_per_batch // longest)
        fits = max(1, usable // 2 // (act * longest))
        mbs = min(want, fits)
        mbs_why = f"--target-tokens-per-batch {cfg.target_tokens_per_batch} / {longest}"
        if fits < want:
            mbs_why += f", fewer so that activations (~{act} B/token) take at most half the usable memory"
    batch_tokens = max(mbs * longest, cfg.max_tokens_per_batch or 0)
    vocab_local = config.padded_vocab_size(tp) // tp
    row = logit_bytes_per_row(vocab_local, dtype_bytes)
    if cfg.logits_chunk_mb is not None:
        chunk = tile_rows(int(cfg.logits_chunk_mb * 2**20) // (4 * vocab_local))
        chunk_why = f"--logits-chunk-mb {cfg.logits_chunk_mb:g} of fp32 logits"
    else:
        left = max(0, usable - act * batch_tokens)
        cap = min(padded_rows(batch_tokens), MAX_CHUNK_LOGITS // vocab_local)
        chunk = tile_rows(min(cap, left // row))
        chunk_why = ("the whole largest batch" if chunk >= batch_tokens
                     else "2^31 logits" if left // row > cap
                     else "what the activations leave of the usable memory")
    need = act * batch_tokens + chunk * row
    why = (f"micro-batch {mbs} ({mbs_why}); logits chunk {chunk} rows, {chunk * row / 2**20:,.0f} MiB "
           f"({chunk_why}; {-(-batch_tokens // chunk)} per batch of {batch_tokens} tokens); "
           f"memory: {free_why}, {USABLE_FRACTION:.0%} usable = {usable / 2**30:.2f} GiB, "
           f"estimated need {need / 2**30:.2f} GiB")
    if need > usable:
        why += " (more than usable: lower --micro-batch-size or --logits-chunk-mb if it runs out of memory)"
    return Sizes(mbs, chunk, why)
