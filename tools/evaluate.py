#!/usr/bin/env python
"""Evaluate checkpoints: held-out LM loss (the paper's metric) per model and domain, the
paired difference of the first model to each other one, and zero-shot tasks.

    # LM loss on an indexed test set, at any TP/PP (torchrun for several processes);
    # checkpoints with the same --name are seeds of one model (mean ± spread, pooled pairs)
    torchrun --nproc-per-node N tools/evaluate.py --load CKPT [CKPT ...] --name A [B ...] \\
        --data-path TEST_PREFIX [--report-dir DIR [--metrics-file M ...]] [--json FILE] \\
        [--tensor-model-parallel-size T] [--pipeline-model-parallel-size P] [--bf16]

    # zero-shot tasks through lm-evaluation-harness (HF export + lm-eval's HF model);
    # "miniplm" is the paper's nine tasks with its metric for each and their average
    python tools/evaluate.py --load CKPT --tasks miniplm [--include-path LOCAL_TASKS] [--limit N]

LM loss is the mean over instances of the per-instance mean NLL under MiniPLM's
loss mask, as in the paper; the token-weighted mean and perplexity are printed too.
With a test set that has domains (PREFIX.domains.npy, as preprocessing writes) the
loss is also given per domain. The first model is compared with each other one by
the mean paired difference over test instances and its bootstrap interval (seeded);
the table marks intervals that exclude zero, and one sentence per comparison says
what the numbers support.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", nargs="+", required=True, help="megatron checkpoint(s) or --save dirs")
    p.add_argument("--name", nargs="+",
                   help="a label per checkpoint for the table (default: dir names); checkpoints with the same "
                        "label are seeds of one model")
    g = p.add_argument_group("LM loss")
    g.add_argument("--data-path", help="indexed test set (tools/preprocess_data.py)")
    g.add_argument("--output-dir", default="eval_results", help="per-instance scores are kept here")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--micro-batch-size", type=int, default=8)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--bootstrap-samples", type=int, default=10_000, help="resamples of the test instances")
    g.add_argument("--bootstrap-seed", type=int, default=0)
    g.add_argument("--confidence", type=float, default=0.95, help="level of the paired difference's interval")
    g.add_argument("--report-dir", help="write evaluation_report.md here (and curves.png with --metrics-file)")
    g.add_argument("--metrics-file", nargs="+",
                   help="the trainer's metrics file of each checkpoint, in --load order ('-' for none): "
                        "validation loss against tokens and FLOPs in DIR/curves.png")
    g = p.add_argument_group("zero-shot tasks (lm-evaluation-harness)")
    g.add_argument("--tasks", help="comma-separated lm-eval task names; 'miniplm': the paper's nine "
                                   "(acc_norm where the task has it, else acc) and their average")
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
    if args.metrics_file and len(args.metrics_file) != len(args.load):
        parser.error("--metrics-file needs one file (or '-') per --load")
    if not 0 < args.confidence < 1:
        parser.error("--confidence must be in (0, 1)")
    rank0 = int(os.environ.get("RANK", "0")) == 0
    results = {"models": {}}
    if args.data_path:
        try:
            results = lm_loss_results(args, names)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    models = results["models"]
    for name in dict.fromkeys(names):
        models.setdefault(name, {})
        flops = [f for n, c in zip(names, args.load) if n == name for f in [train_flops(c)] if f is not None]
        if flops:
            models[name]["train_flops"] = sum(flops) / len(flops)
    if args.tasks and rank0:
        from megatron_miniplm.evaluation.harness import evaluate_checkpoint

        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        for name, ckpt in zip(names, args.load):  # the first seed of each model
            if "tasks" not in models[name]:
                models[name]["tasks"] = evaluate_checkpoint(
                    ckpt, tasks, include_path=args.include_path, num_fewshot=args.num_fewshot,
                    limit=args.limit, batch_size=args.batch_size,
                )
    if rank0:
        finish(args, names, results)
    return 0


def lm_loss_results(args, names: list) -> dict:
    """Every checkpoint scored on the test set (collective), summarized on rank 0."""
    from megatron_miniplm import parallel
    from megatron_miniplm.evaluation.lm_loss import score_test_set
    from megatron_miniplm.evaluation.report import summarize, test_domains

    data_name = os.path.basename(args.data_path)
    runs: dict = {}
    try:
        for k, (name, ckpt) in enumerate(zip(names, args.load)):
            seed = sum(1 for n in names[:k] if n == name)
            label = name if seed == 0 else f"{name}-seed{seed + 1}"
            scores = score_test_set(
                ckpt, args.data_path, os.path.join(args.output_dir, f"{label}-{data_name}"),
                micro_batch_size=args.micro_batch_size, bf16=args.bf16,
                tensor_model_parallel_size=args.tensor_model_parallel_size,
                pipeline_model_parallel_size=args.pipeline_model_parallel_size, progress=False,
            )
            if scores is not None:
                runs.setdefault(name, []).append((ckpt, scores))
    finally:
        parallel.destroy()
    if not runs:  # not rank 0
        return {"models": {}}
    domains, domain_names = test_domains(args.data_path)
    return summarize(runs, domains, domain_names, bootstrap_samples=args.bootstrap_samples,
                     seed=args.bootstrap_seed, level=args.confidence)


def finish(args, names: list, results: dict) -> None:
    """The table on stdout; the report, the curves and the JSON where asked."""
    from megatron_miniplm.evaluation.table import format_table

    if args.report_dir:
        from megatron_miniplm.evaluation.report import write_report

        curves = None
        if args.metrics_file:
            from megatron_miniplm.evaluation.curves import plot_curves

            runs: dict = {}
            for name, path in zip(names, args.metrics_file):
                if path != "-":
                    runs.setdefault(name, []).append(path)
            if runs:
                curves = plot_curves(runs, os.path.join(args.report_dir, "curves.png"))
                results["curves"] = curves
        if results["models"] and "comparisons" in results:
            path = os.path.join(args.report_dir, "evaluation_report.md")
            write_report(path, results, curves=os.path.basename(curves) if curves else None)
            results["report"] = path
    print("\n" + format_table(results))
    for key, what in (("report", "report"), ("curves", "curves")):
        if results.get(key):
            print(f"{what}: {results[key]}")
    if args.json:
        from megatron_miniplm.atomic_io import write_json_atomic

        write_json_atomic(args.json, results)


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
