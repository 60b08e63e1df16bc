"""Convert checkpoints between HF (transformers directory or GGUF file) and megatron.

    # teacher import: Qwen1.5 / Qwen2 / Qwen3 / Llama (3.x) / Mistral / Qwen3-MoE / Mixtral directory,
    # or a GGUF file (dequantized)
    python tools/convert_checkpoint.py --direction hf-to-megatron --load PATH --save DIR \\
        [--tensor-model-parallel-size N] [--pipeline-model-parallel-size M] [--dtype bf16|fp32]

    # student export: megatron checkpoint of any TP/PP -> Qwen2, Llama, Qwen3 or Mistral HF directory
    python tools/convert_checkpoint.py --direction megatron-to-hf --load DIR --save DIR \\
        [--hf-architecture auto|qwen2|llama|qwen3|mistral|qwen3_moe|mixtral] \\
        [--tokenizer PATH] [--dtype bf16|fp32] \\
        [--results RESULTS.json | --no-model-card]

Runs in one process (no torchrun): the megatron checkpoint is a dist checkpoint
that reshards on load, so the parallel sizes given here are only validated
(they must divide heads, key/value heads, layers) and recorded. The model
config (model_config.json) and the tokenizer (tokenizer/) are written beside
the shards, so tools/pretrain_gpt.py and tools/score_docs.py need no model flags.

The student export also writes a model card (README.md): the model's shape and
parameter count, the tokenizer, the training data (a sampled blend's selection,
teacher and reference), tokens seen and training FLOPs, Vanilla KD's settings,
and the held-out results of tools/evaluate.py where they are found.
"""

from __future__ import annotations

import argparse
import os
import json
import sys
import time

from megatron_miniplm.cli.runner import tool


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--direction", required=True, choices=["hf-to-megatron", "megatron-to-hf"])
    p.add_argument("--load", required=True,
                   help="hf-to-megatron: HF model directory, .gguf file, or directory with one .gguf; "
                        "megatron-to-hf: megatron checkpoint directory")
    p.add_argument("--save", required=True, help="output directory (must be absent or empty unless --overwrite)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="hf-to-megatron: TP size the checkpoint must load at (validated, recorded)")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="hf-to-megatron: PP size the checkpoint must load at (validated, recorded)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of the written weights")
    p.add_argument("--gguf-file", default=None, help="hf-to-megatron: GGUF file name inside --load")
    p.add_argument("--model-name", default=None, help="hf-to-megatron: name stored in model_config.json")
    p.add_argument("--hf-architecture", default="auto",
                   choices=["auto", "qwen2", "llama", "qwen3", "mistral", "qwen3_moe", "mixtral"],
                   help="megatron-to-hf: output layout (auto: the imported architecture, else with experts "
                        "qwen3_moe or mixtral; qwen3 with QK-norm, qwen2 with QKV bias, mistral with an attention "
                        "window, llama otherwise)")
    p.add_argument("--tokenizer", default=None,
                   help="megatron-to-hf: tokenizer.json or tokenizer directory to copy "
                        "(default: the checkpoint's tokenizer/)")
    p.add_argument("--eod-token", default=None, help="end-of-document token, if the tokenizer's is not found")
    p.add_argument("--results", default=None, metavar="RESULTS.json",
                   help="megatron-to-hf: results.json of tools/evaluate.py that scored this checkpoint; the "
                        "model card shows its held-out row (default: the pipeline's evaluation when the "
                        "checkpoint is a stage's WORK_DIR/STAGE/FINGERPRINT/ckpt, else none)")
    p.add_argument("--no-model-card", action="store_true",
                   help="megatron-to-hf: write no README.md model card")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --save directory")
    return p


def check_card_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The model card is the student export's: its flags mean nothing elsewhere."""
    if args.direction != "megatron-to-hf" and (args.results is not None or args.no_model_card):
        p.error("--results and --no-model-card apply to --direction megatron-to-hf only")
    if args.results is not None and args.no_model_card:
        p.error("--results is shown in the model card: it cannot go with --no-model-card")


@tool
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_card_flags(parser, args)
    from megatron_miniplm.locking import hold_output

    hold_output(args.save, f"--save {args.save}")  # at once: before torch and megatron-core load
    from megatron_miniplm.conversion.hf_to_megatron import convert_hf_to_megatron
    from megatron_miniplm.conversion.megatron_to_hf import convert_megatron_to_hf

    start = time.time()
    if args.direction == "hf-to-megatron":
        r = convert_hf_to_megatron(
            args.load, args.save,
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            dtype=args.dtype, gguf_file=args.gguf_file, name=args.model_name,
            eod_token=args.eod_token, overwrite=args.overwrite,
        )
        summary = {"saved": r.directory, "architecture": r.info["architecture"], "dtype": args.dtype,
                   "model": r.model_config.to_dict(), "tokenizer": r.info["tokenizer"]}
        if r.info["tokenizer"] is None:
            print("warning: the source has no tokenizer: checkpoint_info.json records none, so "
                  "tools/score_docs.py cannot check it against the dataset's", file=sys.stderr)
    else:
        if args.tensor_model_parallel_size != 1 or args.pipeline_model_parallel_size != 1:
            print("note: parallel sizes are ignored for megatron-to-hf (the checkpoint is read whole)",
                  file=sys.stderr)
        from megatron_miniplm.evaluation import model_card

        # read before anything is written: a bad results file fails the export at once
        facts = None if args.no_model_card else model_card.read_card_facts(args.load, args.results)

        def add_card(directory: str, layout: str) -> None:
            model_card.write_model_card(directory, facts, layout=layout, dtype=args.dtype,
                                        name=os.path.basename(os.path.abspath(args.save)))

        r = convert_megatron_to_hf(
            args.load, args.save, layout=args.hf_architecture, dtype=args.dtype,
            tokenizer=args.tokenizer, eod_token=args.eod_token, overwrite=args.overwrite,
            add_files=add_card if facts is not None else None,
        )
        summary = {"saved": r.directory, "layout": r.layout, "dtype": args.dtype, "eod_id": r.eod_id,
                   "model_card": os.path.join(r.directory, model_card.CARD_FILE) if facts is not None else None}
        if r.eod_id is None:
            print("warning: no tokenizer found (pass --tokenizer); the HF directory has weights only",
                  file=sys.stderr)
    summary["seconds"] = round(time.time() - start, 1)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
