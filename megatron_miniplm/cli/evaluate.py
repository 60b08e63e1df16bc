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
    from megatron_miniplm.evaluation.run import evaluate
    from megatron_miniplm.evaluation.table import format_table

    results = evaluate(cfg)
    if results:  # rank 0
        print("\n" + format_table(results))
        for key in ("report", "curves"):
            if results.get(key):
                print(f"{key}: {results[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
