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

A size sweep: label checkpoints METHOD@SIZE (student-miniplm@qwen-200M, ...). Per method
the tool fits L(C) = l_inf + a * (C / c0)^-alpha to test loss against training FLOPs (the
compute form of Kaplan et al. 2020's scaling law with Hoffmann et al. 2022's irreducible
term; MiniPLM, Gu et al. ICLR 2025, fits such curves for its computation-saving and
extrapolation claims), prints the computation saving against --saving-baseline (FLOPs it
needs to reach a method's loss, over the method's) from the validation curves and from
the fit, and the loss extrapolated to --extrapolate-flops, each with a bootstrap interval
over test documents and, with two seeds or more, training seeds; with fewer than three
sizes of a method it fits nothing and says why.
"""

from __future__ import annotations

import argparse
import sys

from megatron_miniplm.cli import runner
from megatron_miniplm.cli.runner import tool


def build_parser() -> argparse.ArgumentParser:
    from megatron_miniplm.evaluation.config import EvalConfig

    return runner.parser(__doc__, EvalConfig)


@tool
def main(argv=None) -> int:
    from megatron_miniplm.evaluation.config import EvalConfig
    from megatron_miniplm.settings import from_args

    parser = build_parser()
    try:
        cfg = from_args(EvalConfig, parser.parse_args(argv))
    except ValueError as e:
        parser.error(str(e))
    from megatron_miniplm.evaluation.run import evaluate, outputs
    from megatron_miniplm.evaluation.table import format_table
    from megatron_miniplm.locking import hold_output
    from megatron_miniplm.launch import launch_env

    rank = launch_env().rank
    for path, what in outputs(cfg):
        hold_output(path, what, rank=rank)
    results = evaluate(cfg)
    if results:  # rank 0
        print("\n" + format_table(results))
        for key in ("report", "curves"):
            if results.get(key):
                print(f"{key}: {results[key]}")
        if results.get("scaling", {}).get("plot"):
            print(f"scaling: {results['scaling']['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
