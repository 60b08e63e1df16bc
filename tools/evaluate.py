#!/usr/bin/env python
"""Evaluate checkpoints: held-out LM loss (the paper's metric) and zero-shot tasks.

    # LM loss on an indexed test set, at any TP/PP (torchrun for several processes)
    torchrun --nproc-per-node N tools/evaluate.py --load CKPT [CKPT ...] --data-path TEST_PREFIX \\
        [--tensor-model-parallel-size T] [--pipeline-model-parallel-size P] [--bf16] [--output-dir DIR]

    # zero-shot tasks through lm-evaluation-harness (HF export + lm-eval's HF model)
    python tools/evaluate.py --load CKPT --tasks hellaswag,piqa [--include-path LOCAL_TASKS] \\
        [--num-fewshot 0] [--limit N]

LM loss is the mean over instances of the per-instance mean NLL under MiniPLM's
loss mask, as in the paper; the token-weighted mean and perplexity are printed too.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", nargs="+", required=True, help="megatron checkpoint(s) or --save dirs")
    p.add_argument("--name", nargs="+", help="a label per checkpoint for the table (default: dir names)")
    g = p.add_argument_group("LM loss")
    g.add_argument("--data-path", help="indexed test set (tools/preprocess_data.py)")
    g.add_argument("--output-dir", default="eval_results", help="per-instance scores are kept here")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--micro-batch-size", type=int, default=8)
    g.add_argument("--bf16", action="store_true")
    g = p.add_argument_group("zero-shot tasks (lm-evaluation-harness)")
    g.add_argument("--tasks", help="comma-separated lm-eval task names")
    g.add_argument("--include-path", help="directory of local lm-eval task YAMLs")
    g.add_argument("--num-fewshot", type=int, default=0)
    g.add_argument("--limit", type=int)
    g.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", help="also write the results as JSON here")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.data_path and not args.tasks:
        parser.error("give --data-path (LM loss) and/or --tasks (zero-shot)")
    names = args.name or [os.path.basename(os.path.normpath(c)) for c in args.load]
    if len(names) != len(args.load):
        parser.error("--name needs one label per --load")
    results = {name: {} for name in names}
    for name, ckpt in zip(names, args.load):
        flops = train_flops(ckpt)
        if flops is not None:
            results[name]["train_flops"] = flops
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if args.data_path:
        from megatron_miniplm import parallel
        from megatron_miniplm.evaluation.lm_loss import evaluate_lm_loss
        from megatron_miniplm.scoring.dataset import ScoringError

        data_name = os.path.basename(args.data_path)
        try:
            for name, ckpt in zip(names, args.load):
                out = evaluate_lm_loss(
                    ckpt, args.data_path, os.path.join(args.output_dir, f"{name}-{data_name}"),
                    micro_batch_size=args.micro_batch_size, bf16=args.bf16,
                    tensor_model_parallel_size=args.tensor_model_parallel_size,
                    pipeline_model_parallel_size=args.pipeline_model_parallel_size, progress=False,
                )
                if out is not None:
                    results[name].update(out)
        except (ScoringError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        finally:
            parallel.destroy()
    if args.tasks and rank0:
        from megatron_miniplm.evaluation.harness import evaluate_checkpoint

        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        for name, ckpt in zip(names, args.load):
            results[name]["tasks"] = evaluate_checkpoint(
                ckpt, tasks, include_path=args.include_path, num_fewshot=args.num_fewshot,
                limit=args.limit, batch_size=args.batch_size,
            )
    if rank0:
        from megatron_miniplm.evaluation.table import format_table

        print("\n" + format_table(results))
        if args.json:
            from megatron_miniplm.atomic_io import write_json_atomic

            write_json_atomic(args.json, results)
    return 0


def train_flops(checkpoint: str):
    """The training FLOPs a trainer's checkpoint records (the KD teacher's forward included);
    None for other checkpoints (a converted model)."""
    from megatron.core import dist_checkpointing

    from megatron_miniplm.checkpointing import resolve_checkpoint_dir

    try:
        state = dist_checkpointing.load_common_state_dict(resolve_checkpoint_dir(checkpoint))
    except Exception:  # not a dist checkpoint of ours: no record to read
        return None
    return state.get("train_state", {}).get("consumed_flops")


if __name__ == "__main__":
    sys.exit(main())
