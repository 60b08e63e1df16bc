"""The generation run behind tools/generate_corpus.py: SeqKD's corpus from a teacher.

Every instance (or the first ``--max-instances``) gives a prompt, its first
``--prompt-length`` tokens; the teacher continues it, sampling, up to EOD or ``--max-length``
tokens in all (decode.py, sampling.py). A fixed plan groups prompts of equal length into
batches of ``--micro-batch-size`` (sorted by prompt length, then instance id), so that no
batch needs padding; one model replica is TP ranks, and replicas take the plan's batches
round robin. The first TP rank of each replica appends each finished batch to its progress
file (progress.py). When every batch is recorded, rank 0 writes the dataset, batch after
batch in plan order, each sequence with its prompt instance's domain, and removes the
progress. A rerun after a kill redoes only the unrecorded batches: a batch's rows, and so
its kernels, and each instance's random stream do not depend on the run, so the output
is byte-identical. On SIGTERM every rank stops at a batch that all replicas take, and the
run returns ``interrupted``: rerun the same command to continue.

``Generator`` has the scorer's shape: construction is the set-up, ``run`` the loop and the
finalisation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch.distributed as dist

from megatron_miniplm import host_memory
from megatron_miniplm.data.dataset_writer import DatasetWriter
from megatron_miniplm.data.instances import Instances
from megatron_miniplm.data.meta import meta_path, read_dataset_meta
from megatron_miniplm.generation import GENERATION_VERSION, progress
from megatron_miniplm.generation.config import GenerateConfig
from megatron_miniplm.generation.decode import generate_batch
from megatron_miniplm.generation.sampling import instance_generators
from megatron_miniplm.scoring import resume
from megatron_miniplm.scoring.dataset import ScoringError, open_dataset
from megatron_miniplm.scoring.identity import check_progress
from megatron_miniplm.scoring.model import build_scoring_model, check_tokenizer, resolve_checkpoint
from megatron_miniplm.scoring.scorer import on_rank0, scoring_implementation, verify_dataset
from megatron_miniplm.scoring.step import StopVote
from megatron_miniplm.signals import SignalFlag
from megatron_miniplm.training.flops import kd_teacher_flops_per_token

log = logging.getLogger("generate_corpus")


@dataclass
class GenerationSummary:
    output_prefix: str
    already_complete: bool
    num_sequences: int
    interrupted: bool = False
    meta: Optional[dict] = None  # the generated dataset's meta, once written


@dataclass(frozen=True)
class Plan:
    """Batches of instance ids: batch k is ``order[starts[k]:starts[k + 1]]``, one prompt length each."""

    order: np.ndarray  # int64 [M]
    starts: np.ndarray  # int64 [K + 1]
    prompt_lengths: np.ndarray  # int64 [K]

    def __len__(self) -> int:
        return len(self.starts) - 1

    def ids(self, k: int) -> np.ndarray:
        return self.order[self.starts[k]: self.starts[k + 1]]


def plan_batches(lengths: np.ndarray, prompt_length: int, micro_batch_size: int) -> Plan:
    """The prompts sorted by length, then id; cut into batches of one length, at most
    ``micro_batch_size`` each."""
    prompt = np.minimum(lengths.astype(np.int64), prompt_length)
    order = np.lexsort((np.arange(len(prompt)), prompt)).astype(np.int64)
    starts, lens = [0], []
    for length in np.unique(prompt):
        count = int((prompt == length).sum())
        for lo in range(0, count, micro_batch_size):
            starts.append(starts[-1] + min(micro_batch_size, count - lo))
            lens.append(int(length))
    return Plan(order, np.array(starts, dtype=np.int64), np.array(lens, dtype=np.int64))


def source_domains(dataset) -> tuple[np.ndarray, list[str]]:
    """Each instance's domain id, in the union of the shards' domain lists (in order of
    first appearance), and that list."""
    names: list[str] = []
    parts = []
    for prefix, meta in zip(dataset.shard_prefixes, dataset.shard_metas):
        shard_names = list(meta.get("domains") or ["default"])
        for name in shard_names:
            if name not in names:
                names.append(name)
        mapping = np.array([names.index(n) for n in shard_names], dtype=np.int32)
        path = prefix + ".domains.npy"
        local = np.load(path) if os.path.exists(path) else np.zeros(int(meta["num_instances"]), np.int32)
        parts.append(mapping[local])
    return (np.concatenate(parts) if parts else np.zeros(0, np.int32)), names


def generate(cfg: GenerateConfig) -> GenerationSummary:
    """Collective over the torchrun world (or a single process)."""
    return Generator(cfg).run()


class Generator:
    """One generation run: set up on construction (everything that can refuse the run comes
    before any batch), ``run`` decodes the batches not yet recorded and writes the dataset."""

    def __init__(self, cfg: GenerateConfig):
        from megatron_miniplm import parallel

        self.cfg = cfg
        self.info = parallel.initialize(parallel.ParallelConfig(cfg.tensor_model_parallel_size, 1, seed=cfg.seed))
        self.host_memory = host_memory.apply(cfg.keep_freed_memory, self.info.device.type)
        self.dataset, self.source = self._open_inputs()
        self.impl = scoring_implementation(cfg.layers)
        self.max_length = cfg.max_length or int(self.dataset.meta["seq_length"]) + 1
        if self.max_length <= cfg.prompt_length and cfg.max_length is None:
            raise ScoringError(f"--prompt-length {cfg.prompt_length} leaves nothing to generate in the dataset's "
                               f"instances of {self.max_length} tokens: give --max-length")
        try:  # the last token is predicted from the max_length - 1 before it, attended causally
            self.source.config.check_attention_window(self.max_length - 1)
        except ValueError as e:
            raise ScoringError(f"--max-length {self.max_length}: {e}") from None
        count = min(cfg.max_instances or self.dataset.num_instances, self.dataset.num_instances)
        self.plan = plan_batches(self.dataset.lengths[:count], cfg.prompt_length, cfg.micro_batch_size)
        self.progress_dir = resume.progress_dir(cfg.output_prefix)
        self.identity = self._identity()
        self.complete, self.done = on_rank0(self._resume_state)

    # ---- set-up ------------------------------------------------------------------------------
    def _open_inputs(self):
        cfg = self.cfg
        out_dir = os.path.dirname(os.path.abspath(cfg.output_prefix))
        if not os.path.isdir(out_dir):
            raise ScoringError(f"--output-prefix {cfg.output_prefix}: directory {out_dir} does not exist")
        on_rank0(verify_dataset, cfg.data_path)
        dataset = open_dataset(cfg.data_path, verify=False)
        source = resolve_checkpoint(cfg.load)
        check_tokenizer(source, dataset.tokenizer, cfg.data_path)
        try:
            source.config.check_tensor_parallel(cfg.tensor_model_parallel_size)
        except ValueError as e:
            raise ScoringError(str(e)) from None
        return dataset, source

    def _identity(self) -> dict:
        """Everything a resumed run must share with the killed one to reproduce it byte for byte."""
        cfg, plan = self.cfg, self.plan
        h = hashlib.sha256(plan.order.tobytes() + plan.starts.tobytes()).hexdigest()
        settings = {k: v for k, v in asdict(cfg).items() if k not in ("data_path", "load", "output_prefix",
                                                                       "fsync", "progress")}
        return json.loads(json.dumps({"dataset": self.dataset.identity(), "model": self.source.identity(),
                "settings": {**settings, "generation_version": GENERATION_VERSION, "max_length": self.max_length,
                             "attention_backend": self.impl.attention},
                "plan": {"digest": h, "num_batches": len(plan)}}))

    def _resume_state(self) -> tuple[bool, Optional[np.ndarray]]:
        """On rank 0: (True, None) when the output already holds this run, else (False, which
        batches the progress has recorded) once the progress is checked or started."""
        path = meta_path(self.cfg.output_prefix)
        if os.path.exists(path) and read_dataset_meta(self.cfg.output_prefix).get("generation", {}).get(
                "identity") == self.identity:
            resume.remove(self.progress_dir)
            return True, None
        if check_progress(self.progress_dir, self.identity, self.cfg.output_prefix) is None:
            resume.write_run(self.progress_dir, self.identity)
        return False, progress.done_batches(resume.shard_files(self.progress_dir), len(self.plan))

    # ---- loop --------------------------------------------------------------------------------
    def run(self) -> GenerationSummary:
        if self.complete:
            if self.info.rank == 0:
                log.info("%s: already complete (same dataset, teacher and settings); nothing to do",
                         self.cfg.output_prefix)
            return GenerationSummary(self.cfg.output_prefix, True, len(self.plan.order))
        model = build_scoring_model(self.source, bf16=self.cfg.bf16, impl=self.impl)
        self._log_startup()
        start = time.perf_counter()
        stopped_by = self._decode(model)
        if stopped_by is not None:
            if self.info.rank == 0:
                log.warning("stopped by %s: the progress so far is kept in %s; rerun the same command to "
                            "continue", stopped_by, self.progress_dir)
            return GenerationSummary(self.cfg.output_prefix, False, len(self.plan.order), interrupted=True)
        meta = on_rank0(self._write_output, time.perf_counter() - start)
        return GenerationSummary(self.cfg.output_prefix, False, len(self.plan.order), meta=meta)

    def _mine(self) -> np.ndarray:
        """This replica's batches still to do, and how many every replica has (the vote's steps)."""
        info = self.info
        todo = [np.flatnonzero((np.arange(len(self.plan)) % info.dp_size == r) & ~self.done)
                for r in range(info.dp_size)]
        self.common_steps = min(len(t) for t in todo)
        return todo[info.dp_rank]

    def _decode(self, model) -> Optional[str]:
        """This replica's batches, each recorded as it finishes; the name of the signal that
        stopped the loop, or None when it ran to the end. Every rank meets at the end."""
        cfg, info = self.cfg, self.info
        mine = self._mine()
        writer = None
        if info.tp_rank == 0:
            writer = progress.RecordWriter(resume.shard_path(self.progress_dir, info.dp_rank), fsync=cfg.fsync)
        bar = _ProgressBar(cfg, sum(len(self.plan.ids(int(k))) for k in mine), info.dp_size)
        vote, stopped = StopVote(), False
        with SignalFlag() as sigterm:
            for i, k in enumerate(mine):
                if i < self.common_steps and vote(sigterm.received):
                    stopped = True
                    break
                sequences = self._batch(model, int(k))
                if writer is not None:
                    writer.append(int(k), sequences)
                bar.update(sequences)
            if writer is not None:
                writer.close()
            bar.close()
            dist.barrier()
        return sigterm.name if stopped else None

    def _batch(self, model, k: int) -> list[np.ndarray]:
        ids, n = self.plan.ids(k), int(self.plan.prompt_lengths[k])
        prompts = np.stack([x[:n] for x in self.dataset.instances(ids)])
        return generate_batch(model, prompts, instance_generators(self.cfg.seed, ids), max_length=self.max_length,
                              eod=int(self.dataset.tokenizer["eod_id"]), vocab=int(self.dataset.tokenizer["vocab_size"]),
                              temperature=self.cfg.temperature, top_p=self.cfg.top_p)

    def _log_startup(self) -> None:
        if self.info.rank != 0:
            return
        cfg, info = self.cfg, self.info
        log.info("%d prompts of up to %d tokens in %d batches (%d to do%s); sequences of up to %d tokens; "
                 "temperature %g, top-p %g, seed %d; TP=%d DP=%d, %s", len(self.plan.order), cfg.prompt_length,
                 len(self.plan), int((~self.done).sum()), ", resuming" if self.done.any() else "", self.max_length,
                 cfg.temperature, cfg.top_p, cfg.seed, info.tp_size, info.dp_size, cfg.dtype_name)
        if self.host_memory:
            log.info("host memory: %s", self.host_memory)

    # ---- finalisation ------------------------------------------------------------------------
    def _write_output(self, elapsed_s: float) -> dict:
        """The dataset from every replica's records, in plan order (rank 0); the progress removed."""
        domains, names = source_domains(self.dataset)
        where = progress.record_offsets(resume.shard_files(self.progress_dir))
        missing = [k for k in range(len(self.plan)) if k not in where]
        if missing:
            raise ScoringError(f"{self.progress_dir}: {len(missing)} of {len(self.plan)} batches have no record")
        tok = self.dataset.tokenizer
        flops, tokens = 0.0, 0
        with DatasetWriter(self.cfg.output_prefix, int(tok["vocab_size"]), int(tok["eod_id"])) as writer:
            for k in range(len(self.plan)):
                sequences = progress.read_record(*where[k])
                writer.add(Instances.concat(sequences, list(domains[self.plan.ids(k)])))
                for s in sequences:
                    flops += kd_teacher_flops_per_token(self.source.config, len(s)) * len(s)
                    tokens += len(s)
            meta = writer.commit(self._common_meta(flops, tokens), names)
        resume.remove(self.progress_dir)
        log.info("wrote %s: %d sequences, %d tokens (teacher forward: %.3g FLOPs); this session %.1f s",
                 self.cfg.output_prefix, meta["num_instances"], meta["num_tokens"], flops, elapsed_s)
        return meta

    def _common_meta(self, flops: float, tokens: int) -> dict:
        """What the meta records beside the counts: nothing of the session, so that a resumed run
        writes the same bytes as an uninterrupted one."""
        source = self.dataset.meta
        return {
            "format_version": source["format_version"],
            "instance_mode": source.get("instance_mode", "miniplm"),
            "seq_length": self.max_length - 1,
            "tokenizer": source["tokenizer"],
            "inputs": [], "skipped": {},
            "generation": {
                "identity": self.identity,
                "source": os.path.abspath(self.dataset.prefix),
                "teacher": self.source.path,
                "num_prompts": len(self.plan.order),
                "generated_tokens": tokens,
                # one forward pass over each generated sequence: what its KV-cached decoding computes
                "teacher_forward_flops": flops,
                "tool": "tools/generate_corpus.py",
            },
        }


class _ProgressBar:
    """tqdm over this replica's prompts with the generated tokens/s, on rank 0 with --progress."""

    def __init__(self, cfg: GenerateConfig, total: int, dp_size: int):
        self.bar, self.tokens, self.start = None, 0, time.perf_counter()
        if cfg.progress and dist.get_rank() == 0:
            from tqdm import tqdm

            desc = "generating" if dp_size == 1 else f"generating (replica 1 of {dp_size})"
            self.bar = tqdm(total=total, desc=desc, unit="seq", dynamic_ncols=True, smoothing=0.05)

    def update(self, sequences: list) -> None:
        if self.bar is None:
            return
        self.tokens += sum(len(s) for s in sequences)
        self.bar.update(len(sequences))
        self.bar.set_postfix_str(f"{self.tokens / max(time.perf_counter() - self.start, 1e-9):,.0f} tok/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
