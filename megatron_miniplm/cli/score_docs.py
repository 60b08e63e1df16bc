"""Score every instance of a dataset with a model: masked NLL sum and token count.

    torchrun --nproc-per-node N tools/score_docs.py --data-path PREFIX --load CKPT \\
        --output-prefix SCORES_PREFIX [--micro-batch-size B] [--tensor-model-parallel-size T] \\
        [--pipeline-model-parallel-size P] [--expert-model-parallel-size E] [--bf16]

Writes SCORES_PREFIX.npy (float64 [N, 2]: NLL sum, counted tokens; dataset order)
and SCORES_PREFIX.meta.json; a sharded dataset gets SCORES_PREFIX_00000.* ... one
pair per shard. A prediction counts unless its input token is the pad token
(MiniPLM: pad = EOD). Instances are sharded across data-parallel replicas
(world size / (T x P)). A mixture-of-experts teacher's experts may be split over E of
those replicas (E divides them and the experts); the replicas then step together, and
the start-up line says how the experts are placed. Progress is kept in
SCORES_PREFIX.progress/: after a kill, rerun the same command to continue; the result
is bit-identical to an uninterrupted run. The score files appear only when every instance is scored.

Without --micro-batch-size / --logits-chunk-mb the batch (--target-tokens-per-batch,
65,536 tokens) and the logits chunk are sized from the memory free once the model is
loaded (a GPU's free memory; on a CPU a fixed 1 GiB budget); the start-up line says
what was chosen and why, the score meta records it, and a rerun reuses it. Scores do
not depend on the chunk size (the output head runs in fixed 256-row GEMM tiles).

Refuses (exit 1) a model whose tokenizer or vocabulary differs from the
dataset's, and an --output-prefix holding (partial) scores of another dataset,
another model, or other settings. On SIGTERM it flushes its progress and exits 0
without a score file: rerun the same command to continue. A second score_docs on the
same --output-prefix is refused at once, naming the one running (SCORES_PREFIX.lock).
"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_miniplm.cli import runner
from megatron_miniplm.cli.runner import tool


def build_parser() -> argparse.ArgumentParser:
    from megatron_miniplm.scoring.config import ScoreConfig

    return runner.parser(__doc__, ScoreConfig)


@tool
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("megatron.core.datasets").setLevel(logging.WARNING)
    from megatron_miniplm.launch import launch_env
    from megatron_miniplm.locking import hold_output

    hold_output(args.output_prefix, f"--output-prefix {args.output_prefix}", rank=launch_env().rank)
    from megatron_miniplm import parallel
    from megatron_miniplm.scoring.scorer import score
    from megatron_miniplm.scoring.config import ScoreConfig
    from megatron_miniplm.settings import from_args

    try:
        score(from_args(ScoreConfig, args))  # a refused run (ScoringError): status 1
    finally:
        parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
