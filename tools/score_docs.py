#!/usr/bin/env python
"""Score every instance of a dataset with a model: masked NLL sum and token count.

    torchrun --nproc-per-node N tools/score_docs.py --data-path PREFIX --load CKPT \\
        --output SCORES_PREFIX [--micro-batch-size B] [--tensor-model-parallel-size T] \\
        [--pipeline-model-parallel-size P] [--bf16]

Writes SCORES_PREFIX.npy (float64 [N, 2]: NLL sum, counted tokens; dataset order)
and SCORES_PREFIX.meta.json; a sharded dataset gets SCORES_PREFIX_00000.* ... one
pair per shard. A prediction counts unless its input token is the pad token
(MiniPLM: pad = EOD). Instances are sharded across data-parallel replicas
(world size / (T x P)). Progress is kept in SCORES_PREFIX.progress/: after a kill,
rerun the same command to continue; the result is bit-identical to an
uninterrupted run. The score files appear only when every instance is scored.

Refuses (exit 2) a model whose tokenizer or vocabulary differs from the
dataset's, and an --output holding (partial) scores of another dataset, another
model, or other settings.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data and model")
    g.add_argument("--data-path", required=True, metavar="PREFIX",
                   help="dataset prefix written by tools/preprocess_data.py (a sharded dataset's top level)")
    g.add_argument("--load", required=True, metavar="CKPT",
                   help="megatron checkpoint directory (converted, or a trainer's save dir: latest iteration)")
    g.add_argument("--output", required=True, metavar="SCORES_PREFIX", help="score file prefix")
    g = p.add_argument_group("parallelism and batching")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--micro-batch-size", type=int, default=8,
                   help="instances per batch at full length (length-bucketed batches)")
    g.add_argument("--max-tokens-per-batch", type=int, default=None,
                   help="token budget of a batch: short instances are batched more densely "
                        "(default: micro-batch-size x longest instance)")
    g.add_argument("--microbatches-per-step", type=int, default=None,
                   help="batches per pipeline-schedule call and per progress save "
                        "(default 1, or 4 x pipeline size)")
    g = p.add_argument_group("numerics and speed")
    g.add_argument("--bf16", action="store_true", help="bf16 weights and activations (fp32 softmax)")
    g.add_argument("--attention-backend", choices=["auto", "local", "sdpa", "te"], default="auto")
    g.add_argument("--logits-chunk-mb", type=int, default=32,
                   help="memory for the fp32 logits of one chunk of positions, per TP rank")
    g = p.add_argument_group("run")
    g.add_argument("--no-verify-fingerprint", action="store_true",
                   help="skip re-hashing the dataset's .idx files against their meta")
    g.add_argument("--no-fsync", action="store_true", help="do not fsync progress records")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    g.add_argument("--no-keep-freed-memory", action="store_true",
                   help="CPU: leave glibc's mmap/trim thresholds as they are (by default raised, "
                        "so that big activations are not page-faulted in at every layer)")
    g.add_argument("--seed", type=int, default=1234)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("megatron.core.datasets").setLevel(logging.WARNING)
    from megatron_miniplm import parallel
    from megatron_miniplm.scoring.dataset import ScoringError
    from megatron_miniplm.scoring.scorer import ScoreConfig, score

    cfg = ScoreConfig(
        data_path=args.data_path, load=args.load, output=args.output,
        micro_batch_size=args.micro_batch_size, max_tokens_per_batch=args.max_tokens_per_batch,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        bf16=args.bf16, attention_backend=args.attention_backend,
        logits_chunk_mb=args.logits_chunk_mb, microbatches_per_step=args.microbatches_per_step,
        verify_fingerprint=not args.no_verify_fingerprint, fsync=not args.no_fsync,
        progress=not args.no_progress, keep_freed_memory=not args.no_keep_freed_memory,
        seed=args.seed,
    )
    try:
        score(cfg)
    except (ScoringError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
