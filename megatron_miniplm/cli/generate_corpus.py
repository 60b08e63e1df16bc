"""SeqKD's corpus: continuations sampled from a teacher for prompts cut from a dataset's instances.

    torchrun --nproc-per-node N tools/generate_corpus.py --data-path PREFIX --load TEACHER_CKPT \\
        --output-prefix OUT [--prompt-length 512] [--max-length L] [--temperature 1.0] [--top-p 1.0] \\
        [--seed S] [--micro-batch-size B] [--tensor-model-parallel-size T] [--bf16]

Each instance's first --prompt-length tokens are the prompt; the teacher continues it,
sampling, until it samples EOD (kept) or the sequence holds --max-length tokens (default:
the dataset's instance length). The defaults are the official MiniPLM code's generation
settings under its --do-sample (thu-coai/MiniPLM: arguments.py's --temperature 1, --top-p
and --top-k unset, --max-prompt-length 512; pretrain/inferer.py's PretrainGenInferer);
without --do-sample, its default, the official code decodes greedily (--temperature 0
here). Output: OUT.bin/.idx/.domains.npy/.meta.json, one sequence per prompt, each with
its instance's domain; the meta's "generation" records the teacher, the settings and the
teacher's forward FLOPs.

Batched with megatron-core's KV cache (prompts of one length per batch, no padding);
replicas (world size / T) take batches round robin. A sequence depends only on the
teacher, the settings, the seed and its instance: not on the number of replicas or the
session. (--micro-batch-size and T change the batch's arithmetic: on a GPU its logits can
differ in the last bits, and so, rarely, a token; on a CPU in fp32 they do not.) Progress
is kept in OUT.progress/: after a kill, rerun the same command; the result is
byte-identical to an uninterrupted run. On SIGTERM it keeps its progress and
exits 0 without the dataset. Refuses a teacher whose tokenizer differs from the dataset's,
and OUT.progress/ of another run. Unlike Megatron-LM's text generation server, no
pipeline parallelism (--pipeline-model-parallel-size is not a flag).
"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_miniplm.cli import runner
from megatron_miniplm.cli.runner import tool


def build_parser() -> argparse.ArgumentParser:
    from megatron_miniplm.generation.config import GenerateConfig

    return runner.parser(__doc__, GenerateConfig)


@tool
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    from megatron_miniplm.launch import launch_env
    from megatron_miniplm.locking import hold_output

    hold_output(args.output_prefix, f"--output-prefix {args.output_prefix}", rank=launch_env().rank)
    from megatron_miniplm import parallel
    from megatron_miniplm.generation.config import GenerateConfig
    from megatron_miniplm.generation.generator import generate
    from megatron_miniplm.settings import from_args

    try:
        generate(from_args(GenerateConfig, args))
    finally:
        parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
