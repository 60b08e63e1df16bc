"""The scoring run behind tools/score_docs.py: every instance's masked NLL sum and token count.

One model replica is TP x PP ranks; replicas (DP) take batches of a fixed,
length-bucketed plan round robin. Each replica drives megatron's pipeline
schedule forward-only (``get_forward_backward_func``), a few micro-batches per
call; its last stage turns final hidden states into NLLs in vocab-parallel
chunks and appends each finished batch to the replica's progress shard. When
every batch is recorded, rank 0 assembles the score file(s) atomically and
removes the progress. Rerunning the same command after a kill redoes only the
unrecorded batches; since a batch's instances, padding and kernels do not
depend on the run, the result is bit-identical. Batch and logits-chunk sizes are
chosen from free memory unless given (sizing.py) and recorded, so a resumed run
uses the same ones; a batch's scores reach the host while the next batch runs
(step.py), and are recorded then. On SIGTERM (what clusters send
before a kill) every rank stops at the next step that all replicas take, the
progress is flushed, and the run returns ``interrupted``: rerun to continue.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_miniplm.models.gpt import LayerImpl, resolve_implementation
from megatron_miniplm.scoring import resume
from megatron_miniplm.settings import setting
from megatron_miniplm.signals import SignalFlag
from megatron_miniplm.scoring.bucketing import plan_batches, replica_batches, steps
from megatron_miniplm.scoring.dataset import ScoringError, open_dataset
from megatron_miniplm.scoring.identity import (
    check_final, check_progress, output_prefixes, recorded_sizes, run_identity,
)
from megatron_miniplm.scoring.model import build_scoring_model, check_tokenizer, resolve_checkpoint
from megatron_miniplm.scoring.sizing import (
    check_request, choose_sizes, least_free_memory, longest_predictions, request_of,
)
from megatron_miniplm.scoring.step import BatchScorer, StopVote, run_step, with_rows

log = logging.getLogger("score_docs")

LOSS_MASK_RULE = "a prediction counts unless its input token is the pad token (pad = EOD)"


@dataclass(frozen=True)
class ScoreConfig:
    """A scoring run; its settings are tools/score_docs.py's flags."""

    data_path: str = setting(group="data and model", metavar="PREFIX",
                             help="dataset prefix written by tools/preprocess_data.py (a sharded dataset's top level)")
    load: str = setting(group="data and model", metavar="CKPT",
                        help="megatron checkpoint directory (converted, or a trainer's save dir: latest iteration)")
    output_prefix: str = setting(group="data and model", metavar="SCORES_PREFIX", flag="--output-prefix",
                                 help="score file prefix")
    micro_batch_size: Optional[int] = setting(
        None, group="parallelism and batching",
        help="instances per batch at full length (length-bucketed batches); default: "
             "--target-tokens-per-batch / the longest instance, fewer if free memory is short")
    target_tokens_per_batch: int = setting(
        65536, group="parallelism and batching",
        help="tokens per batch the automatic --micro-batch-size aims at (a GPU needs large batches "
             "to run a small teacher at full speed)")
    max_tokens_per_batch: Optional[int] = setting(
        None, group="parallelism and batching",
        help="token budget of a batch: short instances are batched more densely "
             "(default: micro-batch-size x longest instance)")
    tensor_model_parallel_size: int = setting(1, group="parallelism and batching", help="tensor-parallel ranks")
    pipeline_model_parallel_size: int = setting(1, group="parallelism and batching", help="pipeline stages")
    bf16: bool = setting(False, group="numerics and speed", help="bf16 weights and activations (fp32 softmax)")
    layers: LayerImpl = field(default_factory=LayerImpl)  # --transformer-impl, --attention-backend, ...
    logits_chunk_mb: Optional[float] = setting(
        None, group="numerics and speed",
        help="memory for the fp32 logits of one chunk of positions, per TP rank, in whole 256-row tiles "
             "(default: what free memory leaves beside the batch, at most one chunk per batch)")
    microbatches_per_step: Optional[int] = setting(
        None, group="parallelism and batching",
        help="batches per pipeline-schedule call and per progress save (default 1, or 4 x pipeline size)")
    verify_fingerprint: bool = setting(True, group="run", flag="--no-verify-fingerprint",
                                       help="skip re-hashing the dataset's .idx files against their meta")
    fsync: bool = setting(True, group="run", flag="--no-fsync", help="do not fsync progress records")
    fsync_interval_s: float = setting(
        5.0, group="run", help="fsync progress records at most every this many seconds (and at the end); each "
                               "record is written to its file at once, which is what survives a killed process")
    progress: bool = setting(True, group="run", flag="--no-progress", help="no tqdm progress bar")
    keep_freed_memory: bool = setting(
        True, group="run", flag="--no-keep-freed-memory",
        help="CPU: leave glibc's mmap/trim thresholds as they are (by default raised, so that big "
             "activations are not page-faulted in at every layer)")
    seed: int = setting(1234, group="run", help="Megatron-LM's seeding (no randomness in scoring itself)")

    @property
    def dtype_name(self) -> str:
        return "bf16" if self.bf16 else "fp32"


@dataclass
class RunSummary:
    outputs: list[str]
    already_complete: bool
    num_instances: int
    tokens_this_session: int
    elapsed_s: float
    tokens_per_s: float
    interrupted: bool = False  # stopped by SIGTERM: progress kept, no score file yet


# --- collective helpers --------------------------------------------------------

def on_rank0(fn: Callable, *args):
    """Run ``fn`` on rank 0 and give its result (or its error) to every rank, so that a
    refusal ends all ranks with the same message instead of leaving them waiting."""
    payload = [None]
    error: Optional[BaseException] = None
    if dist.get_rank() == 0:
        try:
            payload = [("ok", fn(*args))]
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
            kind = "refusal" if isinstance(e, ScoringError) else "error"
            payload = [(kind, f"{type(e).__name__}: {e}" if kind == "error" else str(e))]
    dist.broadcast_object_list(payload, src=0)
    kind, value = payload[0]
    if error is not None:
        raise error
    if kind == "refusal":
        raise ScoringError(value)
    if kind == "error":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


# --- the run -------------------------------------------------------------------

def scoring_implementation(layers: LayerImpl):
    """The layers and attention a scoring model gets: as for training, except that ``auto``
    attention on the CPU is PyTorch SDPA (its CPU flash kernel, causal and GQA-aware), faster
    there for forward-only scoring than megatron-core's attention, which materialises fp32
    [b, heads, s, s] scores (measured in bench_score.py)."""
    try:
        return resolve_implementation(layers, forward_only=True)
    except ValueError as e:
        raise ScoringError(str(e)) from None


def verify_dataset(prefix: str) -> None:
    open_dataset(prefix, verify=True)

def _progress_bar(cfg: ScoreConfig, total_instances: int, dp_size: int):
    if not cfg.progress or dist.get_rank() != 0:
        return None
    from tqdm import tqdm

    desc = "scoring" if dp_size == 1 else f"scoring (replica 1 of {dp_size})"
    return tqdm(total=total_instances, desc=desc, unit="inst", dynamic_ncols=True, smoothing=0.05)


def score(cfg: ScoreConfig) -> RunSummary:
    """Collective over the torchrun world (or a single process)."""
    from megatron_miniplm import parallel
    from megatron_miniplm.data.samples import collate_instances
    check_request(cfg)
    info = parallel.initialize(parallel.ParallelConfig(
        cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, seed=cfg.seed))
    if cfg.keep_freed_memory and info.device.type == "cpu":
        # The activations live in the host heap only when the host computes; on a GPU the
        # host allocates little and glibc's defaults are the right ones.
        from megatron_miniplm.scoring.memory import keep_freed_memory

        keep_freed_memory()

    out_dir = os.path.dirname(os.path.abspath(cfg.output_prefix))
    if not os.path.isdir(out_dir):
        raise ScoringError(f"output prefix {cfg.output_prefix}: directory {out_dir} does not exist")
    if cfg.verify_fingerprint:
        on_rank0(verify_dataset, cfg.data_path)  # hashes every .idx: once, not on every rank
    dataset = open_dataset(cfg.data_path, verify=False)
    source = resolve_checkpoint(cfg.load)
    check_tokenizer(source, dataset.tokenizer, cfg.data_path)
    try:
        source.config.check_tensor_parallel(cfg.tensor_model_parallel_size)
    except ValueError as e:
        raise ScoringError(str(e)) from None
    if source.config.num_layers % cfg.pipeline_model_parallel_size:
        raise ScoringError(f"--pipeline-model-parallel-size {cfg.pipeline_model_parallel_size} does not "
                           f"divide the model's {source.config.num_layers} layers")

    impl = scoring_implementation(cfg.layers)
    prefixes = output_prefixes(cfg.output_prefix, len(dataset.shard_prefixes))
    pdir = resume.progress_dir(cfg.output_prefix)
    model = None
    sizes = on_rank0(recorded_sizes, prefixes, pdir, request_of(cfg))
    if sizes is None:  # a new run: sized from the memory left once the model is loaded
        model = build_scoring_model(source, bf16=cfg.bf16, impl=impl)
        free, free_why = least_free_memory()
        sizes = choose_sizes(cfg, source.config, tp=info.tp_size, longest=longest_predictions(dataset.lengths),
                             attention_scores=impl.attention == "local", free_bytes=free, free_why=free_why)
    plan = plan_batches(dataset.lengths, sizes.micro_batch_size, cfg.max_tokens_per_batch)
    identity = run_identity(cfg, dataset, source, plan, sizes, impl.attention)

    def prepare():
        complete = check_final(prefixes, dataset, identity)
        if complete:
            resume.remove(pdir)  # a kill between the final rename and this cleanup
            return True, None
        old = check_progress(pdir, identity, cfg.output_prefix)
        if old is None:
            resume.write_run(pdir, {**identity, "torch_threads": torch.get_num_threads()})
        elif old.get("torch_threads") != torch.get_num_threads():
            log.warning("resuming with %d threads per process where the run began with %s: CPU "
                        "kernels may round differently, so the result may not be bit-identical "
                        "to an uninterrupted run", torch.get_num_threads(), old.get("torch_threads"))
        return False, resume.done_batches(pdir, len(plan))

    complete, done = on_rank0(prepare)
    if complete:
        if info.rank == 0:
            log.info("%s: already complete (same dataset, model and settings); nothing to do",
                     ", ".join(prefixes))
        return RunSummary(prefixes, True, dataset.num_instances, 0, 0.0, 0.0)
    resumed = bool(done.any())

    if model is None:
        model = build_scoring_model(source, bf16=cfg.bf16, impl=impl)
    scorer = BatchScorer(model, source.config.vocab_size, sizes.logits_chunk_tokens)
    per_step = cfg.microbatches_per_step or (1 if info.pp_size == 1 else 4 * info.pp_size)
    mine = replica_batches(plan, info.dp_rank, info.dp_size)
    mine = mine[~done[mine]]
    writer = None
    if info.is_last_stage and info.tp_rank == 0:
        writer = resume.ShardWriter(resume.shard_path(pdir, info.dp_rank), fsync=cfg.fsync,
                                    sync_interval_s=cfg.fsync_interval_s)
    todo_tokens = int(plan.batch_tokens[~done].sum())
    if info.rank == 0:
        log.info("%d instances in %d batches; %d batches to do%s; TP=%d PP=%d DP=%d, %s",
                 dataset.num_instances, len(plan), int((~done).sum()),
                 " (resuming)" if resumed else "", info.tp_size, info.pp_size, info.dp_size,
                 cfg.dtype_name)
        log.info("sizes: %s", sizes.why)
        log.info("%s", impl.describe())
    bar = _progress_bar(cfg, int(plan.batch_sizes()[mine].sum()), info.dp_size)

    # Steps that every replica takes: where the ranks can agree to stop on a signal.
    common_steps = min(-(-int((~done[replica_batches(plan, r, info.dp_size)]).sum()) // per_step)
                       for r in range(info.dp_size))
    start, cpu_start = time.perf_counter(), time.process_time()
    tokens_done = 0
    stopped = False
    vote = StopVote()
    pending: list = []  # (batch index, step.Pending) of the previous step, recorded during this one

    def record(items):
        for index, result in items:
            writer.append(index, result.scores())

    with SignalFlag() as sigterm:
        for i, group in enumerate(steps(mine, per_step)):
            if i < common_steps and vote(sigterm.received):
                stopped = True
                break
            batches = [plan.batch(int(k)) for k in group]
            inputs = [with_rows(collate_instances(dataset.instances(b.ids), dataset.pad_id)) for b in batches]
            results = run_step(model, scorer, inputs)
            if writer is not None:
                record(pending)  # the previous step's scores, while the device runs this one
                pending = [(b.index, r) for b, r in zip(batches, results)]
            if bar is not None:
                tokens_done += sum(b.tokens for b in batches)
                bar.update(sum(len(b.ids) for b in batches))
                bar.set_postfix_str(f"{tokens_done / max(time.perf_counter() - start, 1e-9):,.0f} tok/s")
        if writer is not None:
            record(pending)
            writer.close()  # flushed and fsynced
        if bar is not None:
            bar.close()
        cpu_s = time.process_time() - cpu_start
        dist.barrier()
    elapsed = time.perf_counter() - start
    if stopped:
        if info.rank == 0:
            log.warning("stopped by %s: the progress so far is kept in %s; rerun the same command "
                        "to continue", sigterm.name, pdir)
        return RunSummary(prefixes, False, dataset.num_instances, 0, elapsed, 0.0, interrupted=True)

    def finish():
        scores = resume.assemble(pdir, plan.order, plan.starts, dataset.num_instances)
        _write_score_files(cfg, dataset, prefixes, scores, identity, info, plan, elapsed,
                           cpu_s, todo_tokens, resumed)
        resume.remove(pdir)

    on_rank0(finish)
    rate = todo_tokens / elapsed if elapsed > 0 else 0.0
    if info.rank == 0:
        log.info("wrote %s: %d instances, %d tokens this session in %.1f s (%.0f tokens/s)",
                 ", ".join(p + ".npy" for p in prefixes), dataset.num_instances, todo_tokens,
                 elapsed, rate)
    return RunSummary(prefixes, False, dataset.num_instances, todo_tokens, elapsed, rate)


def _write_score_files(cfg, dataset, prefixes, scores, identity, info, plan, elapsed, cpu_s, tokens,
                       resumed):
    from megatron_miniplm.scoring.score_file import save_scores

    common = {
        "model": identity["model"],
        "settings": identity["settings"],
        "tokenizer": {k: dataset.tokenizer.get(k) for k in ("sha256", "vocab_size", "eod_id", "pad_id")},
        "dtype": cfg.dtype_name,
        "parallel": {"tensor_model_parallel_size": info.tp_size,
                     "pipeline_model_parallel_size": info.pp_size,
                     "data_parallel_size": info.dp_size, "backend": info.backend},
        "batching": {"micro_batch_size": identity["settings"]["micro_batch_size"],
                     "max_tokens_per_batch": cfg.max_tokens_per_batch,
                     "num_batches": len(plan), "plan_digest": identity["plan"]["digest"]},
        "sizing": identity["sizing"],  # what was asked for and what it came to (reused on a rerun)
        "loss_mask": LOSS_MASK_RULE,
        "accumulation": "per-token NLL in fp32 from fp32 logits; per-instance sums in float64",
        "elapsed_s": round(elapsed, 3),
        "tokens_this_session": tokens,
        "tokens_per_s": round(tokens / elapsed, 1) if elapsed > 0 else None,
        "rank0_cpu_s": round(cpu_s, 3),  # process CPU time of rank 0 in the loop (all its threads)
        "resumed": resumed,
        "torch_threads": torch.get_num_threads(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tool": "tools/score_docs.py",
        "config": asdict(cfg),
    }
    for i, (prefix, shard_prefix, shard_meta) in enumerate(
            zip(prefixes, dataset.shard_prefixes, dataset.shard_metas)):
        lo, hi = int(dataset.offsets[i]), int(dataset.offsets[i + 1])
        meta = {
            **common,
            "dataset_fingerprint": shard_meta["fingerprint"],
            "num_instances": hi - lo,
            "dataset": {"prefix": os.path.abspath(shard_prefix), "shard_index": i,
                        "num_shards": len(prefixes), "top_prefix": os.path.abspath(dataset.prefix),
                        "top_fingerprint": dataset.meta["fingerprint"]},
            "num_tokens_counted": int(scores[lo:hi, 1].sum()),
        }
        save_scores(prefix, scores[lo:hi], meta)
