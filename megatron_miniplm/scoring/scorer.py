"""The scoring run behind tools/score_docs.py: every instance's masked NLL sum and token count.

One model replica is TP x PP ranks; replicas (DP) take batches of a fixed,
length-bucketed plan round robin. Under expert parallelism EP replicas share each
layer's experts and exchange tokens in every expert layer, so all replicas run as
many batches as the busiest one, padding with dummy batches whose scores are dropped. Each replica drives megatron's pipeline
schedule forward-only (``get_forward_backward_func``), a few micro-batches per
call; its last stage turns final hidden states into NLLs in vocab-parallel
chunks and appends each finished batch to the replica's progress shard. When
every batch is recorded, rank 0 assembles the score file(s) atomically and
removes the progress. Rerunning the same command after a kill redoes only the
unrecorded batches (under expert parallelism from the first step some replica has
not recorded, so that every batch runs beside the same batches: replica_runs);
since a batch's instances, padding and kernels do not depend on the run, the
result is bit-identical. Batch and logits-chunk sizes are
chosen from free memory unless given (sizing.py) and recorded, so a resumed run
uses the same ones; a batch's scores reach the host while the next batch runs
(step.py), and are recorded then. On SIGTERM (what clusters send
before a kill) every rank stops at the next step that all replicas take, the
progress is flushed, and the run returns ``interrupted``: rerun to continue.

``Scorer`` has the trainer's shape: construction is the set-up (parallel state,
dataset and model checks, sizes, batch plan, resume state), ``run`` the loop over
this replica's steps, and finalisation (``_finish``) assembles and writes the
score files. ``score`` is the function over it that tools and tests call.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_miniplm import host_memory
from megatron_miniplm.models.gpt import resolve_implementation
from megatron_miniplm.models.config import LayerImpl
from megatron_miniplm.scoring import resume
from megatron_miniplm.signals import SignalFlag
from megatron_miniplm.scoring.bucketing import Batch, plan_batches, replica_batches, replica_runs, steps
from megatron_miniplm.scoring.dataset import ScoringError, open_dataset
from megatron_miniplm.scoring.identity import (
    check_final, check_progress, output_prefixes, recorded_sizes, run_identity,
)
from megatron_miniplm.scoring.model import build_scoring_model, check_tokenizer, resolve_checkpoint
from megatron_miniplm.scoring.sizing import (
    Sizes, check_request, choose_sizes, least_free_memory, longest_predictions, request_of,
)
from megatron_miniplm.scoring.step import BatchScorer, DeferredRecorder, StopVote, run_step, with_rows
from megatron_miniplm.scoring.config import ScoreConfig

log = logging.getLogger("score_docs")

LOSS_MASK_RULE = "a prediction counts unless its input token is the pad token (pad = EOD)"


@dataclass
class RunSummary:
    outputs: list[str]
    already_complete: bool
    num_instances: int
    tokens_this_session: int
    elapsed_s: float
    tokens_per_s: float
    interrupted: bool = False  # stopped by SIGTERM: progress kept, no score file yet


@dataclass(frozen=True)
class Session:
    """What this session of a run did: the score files record it beside the scores."""

    tokens: int  # predictions of the batches this session had to do
    elapsed_s: float  # the loop's wall-clock time, the final barrier included
    rank0_cpu_s: float  # process CPU time of rank 0 in the loop (all its threads)
    resumed: bool  # some batches were recorded by an earlier session

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


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


def score(cfg: ScoreConfig) -> RunSummary:
    """Collective over the torchrun world (or a single process)."""
    return Scorer(cfg).run()


class Scorer:
    """One scoring run: set up on construction (everything that can refuse the run comes
    before any batch is scored), ``run`` scores the batches not yet recorded and writes the
    score files. Collective: every rank of the world constructs one and runs it."""

    def __init__(self, cfg: ScoreConfig):
        check_request(cfg)
        self.cfg = cfg
        self.info = self._initialize()
        self.host_memory = host_memory.apply(cfg.keep_freed_memory, self.info.device.type)
        self._check_output_dir()
        self.dataset, self.source = self._open_inputs()
        self.impl = scoring_implementation(cfg.layers)
        self.prefixes = output_prefixes(cfg.output_prefix, len(self.dataset.shard_prefixes))
        self.progress_dir = resume.progress_dir(cfg.output_prefix)
        self.model = None
        self.sizes: Optional[Sizes] = on_rank0(recorded_sizes, self.prefixes, self.progress_dir,
                                               request_of(cfg))
        if self.sizes is None:  # a new run: sized from the memory left once the model is loaded
            self.model = self._build_model()
            self.sizes = self._sizes_from_free_memory()
        self.plan = plan_batches(self.dataset.lengths, self.sizes.micro_batch_size, cfg.max_tokens_per_batch)
        self.identity = run_identity(cfg, self.dataset, self.source, self.plan, self.sizes,
                                     self.impl.attention)
        self.complete, self.done = on_rank0(self._resume_state)
        if not self.complete:
            self._prepare_loop()

    # ---- set-up ------------------------------------------------------------------------------
    def _initialize(self):
        """The parallel state, and on the CPU glibc's thresholds for the activations' memory."""
        from megatron_miniplm import parallel

        cfg = self.cfg
        try:
            info = parallel.initialize(parallel.ParallelConfig(
                cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size,
                expert_model_parallel_size=cfg.expert_model_parallel_size, seed=cfg.seed))
        except ValueError as e:  # a layout the world cannot be split into
            raise ScoringError(str(e)) from None
        return info

    def _check_output_dir(self) -> None:
        out_dir = os.path.dirname(os.path.abspath(self.cfg.output_prefix))
        if not os.path.isdir(out_dir):
            raise ScoringError(f"output prefix {self.cfg.output_prefix}: directory {out_dir} does not exist")

    def _open_inputs(self):
        """The dataset and the checkpoint, refused unless they fit each other and the layout."""
        cfg = self.cfg
        if cfg.verify_fingerprint:
            on_rank0(verify_dataset, cfg.data_path)  # hashes every .idx: once, not on every rank
        dataset = open_dataset(cfg.data_path, verify=False)
        source = resolve_checkpoint(cfg.load)
        check_tokenizer(source, dataset.tokenizer, cfg.data_path)
        try:
            source.config.check_tensor_parallel(cfg.tensor_model_parallel_size)
            source.config.check_expert_parallel(cfg.expert_model_parallel_size)
            # the model's input: the longest instance less its last token
            source.config.check_attention_window(int(dataset.lengths.max(initial=1)) - 1)
        except ValueError as e:
            raise ScoringError(str(e)) from None
        if source.config.num_layers % cfg.pipeline_model_parallel_size:
            raise ScoringError(f"--pipeline-model-parallel-size {cfg.pipeline_model_parallel_size} does not "
                               f"divide the model's {source.config.num_layers} layers")
        return dataset, source

    def _build_model(self):
        return build_scoring_model(self.source, bf16=self.cfg.bf16, impl=self.impl)

    def _sizes_from_free_memory(self) -> Sizes:
        """Sizes chosen anew, from the least free memory over the ranks (collective)."""
        free, free_why = least_free_memory()
        return choose_sizes(self.cfg, self.source.config, tp=self.info.tp_size, ep=self.info.ep_size,
                            longest=longest_predictions(self.dataset.lengths),
                            attention_scores=self.impl.attention == "local",
                            free_bytes=free, free_why=free_why)

    def _resume_state(self) -> tuple[bool, Optional[np.ndarray]]:
        """On rank 0: (True, None) when the score files already hold this run, else (False,
        which batches the progress has recorded) once the progress is checked or started."""
        if check_final(self.prefixes, self.dataset, self.identity):
            resume.remove(self.progress_dir)  # a kill between the final rename and this cleanup
            return True, None
        self._open_progress()
        return False, resume.done_batches(self.progress_dir, len(self.plan))

    def _open_progress(self) -> None:
        """Refuses progress of another run, else starts the progress directory or continues it.
        The thread count is recorded because CPU kernels may round differently with another."""
        threads = torch.get_num_threads()
        old = check_progress(self.progress_dir, self.identity, self.cfg.output_prefix)
        if old is None:
            resume.write_run(self.progress_dir, {**self.identity, "torch_threads": threads})
        elif old.get("torch_threads") != threads:
            log.warning("resuming with %d threads per process where the run began with %s: CPU "
                        "kernels may round differently, so the result may not be bit-identical "
                        "to an uninterrupted run", threads, old.get("torch_threads"))

    def _prepare_loop(self) -> None:
        """The model, this replica's batches still to do, and the recorder of their scores on
        the rank that keeps this replica's progress shard (last stage, first TP rank)."""
        cfg, info = self.cfg, self.info
        self.resumed = bool(self.done.any())
        if self.model is None:
            self.model = self._build_model()
        self.batch_scorer = BatchScorer(self.model, self.source.config.vocab_size,
                                        self.sizes.logits_chunk_tokens)
        self.per_step = cfg.microbatches_per_step or (1 if info.pp_size == 1 else 4 * info.pp_size)
        runs = replica_runs(self.plan, self.done, info.dp_size, lockstep=info.ep_size > 1)
        self.mine, self.run_lengths = runs[info.dp_rank], [len(r) for r in runs]
        self.recorder = None
        if info.is_last_stage and info.tp_rank == 0:
            self.recorder = DeferredRecorder(resume.ShardWriter(
                resume.shard_path(self.progress_dir, info.dp_rank), fsync=cfg.fsync,
                sync_interval_s=cfg.fsync_interval_s))
        scored = np.concatenate(runs)
        self.todo_tokens = int(self.plan.batch_tokens[scored[scored >= 0]].sum())

    def _batch(self, k: int) -> Batch:
        """Batch ``k`` of the plan; a dummy (-1) is the plan's shortest instance alone."""
        if k >= 0:
            return self.plan.batch(k)
        ids = self.plan.order[-1:]
        return Batch(index=-1, ids=ids, seq_length=int(self.dataset.lengths[ids[0]]) - 1, tokens=0)

    # ---- loop --------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        """Scores the batches not yet recorded and writes the score files; returns at once when
        they already hold this run, and without them when a stop signal ends the loop first."""
        if self.complete:
            return self._already_complete()
        self._log_startup()
        stopped_by, session = self._score_batches()
        if stopped_by is not None:
            return self._interrupted(stopped_by, session)
        return self._finish(session)

    def _score_batches(self) -> tuple[Optional[str], Session]:
        """This replica's steps, then its progress flushed and every rank met; the name of the
        signal that stopped the loop (None when it ran to the end) and what the session did."""
        bar = _Progress(self.cfg, self.progress_dir, self._replica_instances(), self.info.dp_size)
        common = self._common_steps()
        start, cpu_start = time.perf_counter(), time.process_time()
        with SignalFlag() as sigterm:
            stopped = self._run_steps(sigterm, common, bar)
            if self.recorder is not None:
                self.recorder.close()  # the last step's scores recorded, flushed and fsynced
            bar.close()
            cpu_s = time.process_time() - cpu_start
            dist.barrier()
        session = Session(self.todo_tokens, time.perf_counter() - start, cpu_s, self.resumed)
        return (sigterm.name if stopped else None), session

    def _replica_instances(self) -> tuple[int, int]:
        """This replica's instances that this session does not score, and all of them."""
        sizes = self.plan.batch_sizes()
        total = int(sizes[replica_batches(self.plan, self.info.dp_rank, self.info.dp_size)].sum())
        return total - int(sizes[self.mine[self.mine >= 0]].sum()), total

    def _common_steps(self) -> int:
        """Steps that every replica takes: where the ranks can agree to stop on a signal."""
        return min(-(-n // self.per_step) for n in self.run_lengths)

    def _run_steps(self, sigterm: SignalFlag, common_steps: int, bar: "_Progress") -> bool:
        """One step per group of ``per_step`` batches; True when the ranks agreed to stop. The
        vote is taken only at the steps every replica takes, so that all ranks take part."""
        vote = StopVote()
        for i, group in enumerate(steps(self.mine, self.per_step)):
            if i < common_steps and vote(sigterm.received):
                return True
            bar.update(self._step(group))
        return False

    def _step(self, group: np.ndarray) -> list:
        """One pipeline-schedule call over the batches ``group``; returns the batches. Their
        scores are recorded during the next step, while the device runs it."""
        from megatron_miniplm.data.samples import collate_instances

        batches = [self._batch(int(k)) for k in group]
        inputs = [with_rows(collate_instances(self.dataset.instances(b.ids), self.dataset.pad_id))
                  for b in batches]
        results = run_step(self.model, self.batch_scorer, inputs)
        real = [i for i, b in enumerate(batches) if b.index >= 0]
        if self.recorder is not None:
            self.recorder.submit([batches[i].index for i in real], [results[i] for i in real])
        return [batches[i] for i in real]

    def _log_startup(self) -> None:
        """The run's extent and layout, the sizes and why, the layers."""
        if self.info.rank != 0:
            return
        info, todo = self.info, int((~self.done).sum())
        log.info("%d instances in %d batches; %d batches to do%s; TP=%d PP=%d DP=%d EP=%d, %s",
                 self.dataset.num_instances, len(self.plan), todo, " (resuming)" if self.resumed else "",
                 info.tp_size, info.pp_size, info.dp_size, info.ep_size, self.cfg.dtype_name)
        if self.source.config.num_experts:
            log.info("%s", self.source.config.describe_experts(info.ep_size))
        log.info("sizes: %s", self.sizes.why)
        log.info("%s", self.impl.describe())
        if self.host_memory:
            log.info("host memory: %s", self.host_memory)

    # ---- finalisation ------------------------------------------------------------------------
    def _already_complete(self) -> RunSummary:
        if self.info.rank == 0:
            log.info("%s: already complete (same dataset, model and settings); nothing to do",
                     ", ".join(self.prefixes))
        return RunSummary(self.prefixes, True, self.dataset.num_instances, 0, 0.0, 0.0)

    def _interrupted(self, signal_name: str, session: Session) -> RunSummary:
        if self.info.rank == 0:
            log.warning("stopped by %s: the progress so far is kept in %s; rerun the same command "
                        "to continue", signal_name, self.progress_dir)
        return RunSummary(self.prefixes, False, self.dataset.num_instances, 0, session.elapsed_s, 0.0,
                          interrupted=True)

    def _finish(self, session: Session) -> RunSummary:
        """The score files from every replica's progress, written by rank 0; the progress removed."""
        on_rank0(self._write_outputs, session)
        if self.info.rank == 0:
            log.info("wrote %s: %d instances, %d tokens this session in %.1f s (%.0f tokens/s)",
                     ", ".join(p + ".npy" for p in self.prefixes), self.dataset.num_instances,
                     session.tokens, session.elapsed_s, session.tokens_per_s)
        return RunSummary(self.prefixes, False, self.dataset.num_instances, session.tokens,
                          session.elapsed_s, session.tokens_per_s)

    def _write_outputs(self, session: Session) -> None:
        scores = resume.assemble(self.progress_dir, self.plan.order, self.plan.starts,
                                 self.dataset.num_instances)
        self._write_score_files(scores, session)
        resume.remove(self.progress_dir)

    def _write_score_files(self, scores: np.ndarray, session: Session) -> None:
        """One score file per dataset shard: its rows of ``scores`` and the run's meta."""
        from megatron_miniplm.scoring.score_file import save_scores

        dataset, common = self.dataset, self._common_meta(session)
        for i, (prefix, shard_prefix, shard_meta) in enumerate(
                zip(self.prefixes, dataset.shard_prefixes, dataset.shard_metas)):
            lo, hi = int(dataset.offsets[i]), int(dataset.offsets[i + 1])
            meta = {
                **common,
                "dataset_fingerprint": shard_meta["fingerprint"],
                "num_instances": hi - lo,
                "dataset": {"prefix": os.path.abspath(shard_prefix), "shard_index": i,
                            "num_shards": len(self.prefixes), "top_prefix": os.path.abspath(dataset.prefix),
                            "top_fingerprint": dataset.meta["fingerprint"]},
                "num_tokens_counted": int(scores[lo:hi, 1].sum()),
            }
            save_scores(prefix, scores[lo:hi], meta)

    def _common_meta(self, session: Session) -> dict:
        """The meta every score file of the run shares: identity, layout, batching and session."""
        cfg, info, identity = self.cfg, self.info, self.identity
        tokenizer = self.dataset.tokenizer
        return {
            "model": identity["model"],
            "settings": identity["settings"],
            "tokenizer": {k: tokenizer.get(k) for k in ("sha256", "vocab_size", "eod_id", "pad_id")},
            "dtype": cfg.dtype_name,
            "parallel": {"tensor_model_parallel_size": info.tp_size,
                         "pipeline_model_parallel_size": info.pp_size,
                         "expert_model_parallel_size": info.ep_size,
                         "data_parallel_size": info.dp_size, "backend": info.backend},
            "batching": {"micro_batch_size": identity["settings"]["micro_batch_size"],
                         "max_tokens_per_batch": cfg.max_tokens_per_batch,
                         "num_batches": len(self.plan), "plan_digest": identity["plan"]["digest"]},
            "sizing": identity["sizing"],  # what was asked for and what it came to (reused on a rerun)
            "loss_mask": LOSS_MASK_RULE,
            "accumulation": "per-token NLL in fp32 from fp32 logits; per-instance sums in float64",
            "elapsed_s": round(session.elapsed_s, 3),
            "tokens_this_session": session.tokens,
            "tokens_per_s": round(session.tokens_per_s, 1) if session.elapsed_s > 0 else None,
            "rank0_cpu_s": round(session.rank0_cpu_s, 3),
            "resumed": session.resumed,
            "torch_threads": torch.get_num_threads(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "tool": "tools/score_docs.py",
            "config": asdict(cfg),
        }


class _Progress:
    """Rank 0's view of its replica's progress: a tqdm bar with the tokens/s since the loop
    began (with --progress), and the progress directory's status file for the pipeline's
    --status (every ``interval_s`` and at the end). A no-op on the other ranks."""

    def __init__(self, cfg: ScoreConfig, directory: str, instances: tuple[int, int], dp_size: int,
                 interval_s: float = 10.0, clock: Callable[[], float] = time.perf_counter):
        self.on = dist.get_rank() == 0
        self.directory, self.dp_size, self.interval_s, self.clock = directory, dp_size, interval_s, clock
        self.done, self.total = instances  # this replica's: recorded before this session, all
        self.tokens = self.session_instances = 0
        self.bar = None
        if cfg.progress and self.on:
            from tqdm import tqdm

            desc = "scoring" if dp_size == 1 else f"scoring (replica 1 of {dp_size})"
            self.bar = tqdm(total=self.total, initial=self.done, desc=desc, unit="inst", dynamic_ncols=True,
                            smoothing=0.05)
        self.start = self.last_write = clock()

    def update(self, batches: list) -> None:
        if not self.on:
            return
        instances = sum(len(b.ids) for b in batches)
        self.done += instances
        self.session_instances += instances
        self.tokens += sum(b.tokens for b in batches)
        if self.bar is not None:
            self.bar.update(instances)
            self.bar.set_postfix_str(f"{self._rate():,.0f} tok/s")
        if self.clock() - self.last_write >= self.interval_s:
            self._write()

    def _rate(self) -> float:
        return self.tokens / max(self.clock() - self.start, 1e-9)

    def _write(self) -> None:
        self.last_write = self.clock()
        elapsed, left = self.clock() - self.start, self.total - self.done
        resume.write_status(self.directory, {
            "instances_done": self.done, "instances": self.total, "replicas": self.dp_size,
            "tokens_per_s": self._rate() * self.dp_size,
            "seconds_left": left * elapsed / self.session_instances if self.session_instances else None,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def close(self) -> None:
        if self.on:
            self._write()
        if self.bar is not None:
            self.bar.close()
