"""The scoring run's settings: tools/score_docs.py's flags (a config module: no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron_miniplm import host_memory
from megatron_miniplm.models.config import LayerImpl
from megatron_miniplm.settings import setting


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
    expert_model_parallel_size: int = setting(
        1, group="parallelism and batching",
        help="ranks the experts of a mixture-of-experts teacher are split over, as in Megatron-LM: data-parallel "
             "ranks, each holding 1/EP of every layer's experts and scoring its own batches; the ranks of an "
             "expert-parallel group step together (a replica short of batches runs a dummy one)")
    bf16: bool = setting(False, group="numerics and speed",
                         help="bf16 weights and activations, the logits rounded to bf16 (fp32 log-softmax; "
                              "the official MiniPLM scores in fp16)")
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
    fsync: bool = setting(True, group="run", flag="--no-fsync", fingerprinted=False, help="do not fsync progress records")
    fsync_interval_s: float = setting(
        5.0, group="run", fingerprinted=False, help="fsync progress records at most every this many seconds (and at the end); each "
                               "record is written to its file at once, which is what survives a killed process")
    progress: bool = setting(True, group="run", flag="--no-progress", help="no tqdm progress bar")
    keep_freed_memory: bool = host_memory.keep_freed_memory_setting("run")
    seed: int = setting(1234, group="run", help="Megatron-LM's seeding (no randomness in scoring itself)")

    @property
    def dtype_name(self) -> str:
        return "bf16" if self.bf16 else "fp32"
