#!/usr/bin/env python
"""Our training FLOPs per token against Megatron-LM's own count: the function
``num_floating_point_operations`` of a Megatron-LM checkout's megatron/training/training.py,
taken from that file at run time (nothing of it is kept here) and called with the
arguments Megatron-LM would have for each preset, beside ``training_flops_per_token``.

    python benchmarks/check_megatron_flops.py --megatron-lm PATH   # a checkout of core_v0.16.1
    python benchmarks/check_megatron_flops.py --megatron-lm-git /work/.mirror/NVIDIA+Megatron-LM/repo --ref core_v0.16.1

Prints one row per preset (and a GQA / untied / TP-padded variant): both counts per token
and their ratio, which must be 1 for every row. A model without bias in the count, SwiGLU,
no MoE, no MTP, no linear attention: the shapes this project trains.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from argparse import Namespace
from dataclasses import replace

from megatron_miniplm.models.config import PRESETS, ModelConfig
from megatron_miniplm.training.flops import training_flops_per_token


def megatron_count(source: str):
    """Megatron-LM's num_floating_point_operations, compiled from its file's text alone."""
    tree = ast.parse(source)
    [fn] = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "num_floating_point_operations"]
    namespace = {"is_linear_attention_variant": lambda variant: False}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "training.py", "exec"), namespace)
    return namespace["num_floating_point_operations"]


def megatron_args(config: ModelConfig, seq_length: int, tp: int) -> Namespace:
    """The arguments Megatron-LM's parser would hold for this model (the ones the count reads)."""
    groups = config.kv_heads
    return Namespace(
        num_layers=config.num_layers, hidden_size=config.hidden_size, ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads, num_query_groups=groups,
        group_query_attention=groups != config.num_attention_heads, kv_channels=config.head_dim,
        seq_length=seq_length, padded_vocab_size=config.padded_vocab_size(tp), swiglu=True,
        num_experts=None, mtp_num_layers=None, multi_latent_attention=False, attention_output_gate=False,
        experimental_attention_variant=None, hybrid_override_pattern=None, is_hybrid_model=False,
        moe_ffn_hidden_size=None, moe_shared_expert_intermediate_size=None,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--megatron-lm", help="a Megatron-LM checkout")
    where.add_argument("--megatron-lm-git", help="a Megatron-LM git directory (read at --ref)")
    parser.add_argument("--ref", default="core_v0.16.1")
    parser.add_argument("--seq-length", type=int, default=1024)
    args = parser.parse_args()
    path = "megatron/training/training.py"
    if args.megatron_lm:
        with open(f"{args.megatron_lm}/{path}", encoding="utf-8") as f:
            source = f.read()
    else:
        source = subprocess.run(["git", "--git-dir", args.megatron_lm_git, "show", f"{args.ref}:{path}"],
                                check=True, capture_output=True, text=True).stdout
    count = megatron_count(source)
    models = [(name, config, 1) for name, config in PRESETS.items()]
    base = PRESETS["qwen-200M"]
    models += [("qwen-200M, GQA 4 groups", replace(base, num_query_groups=4), 1),
               ("qwen-200M, untied", replace(base, tie_embeddings=False), 1),
               ("qwen-200M, vocabulary padded for TP 8", replace(base, vocab_size=151_000), 8)]
    worst = 0.0
    print(f"| model | seq | ours per token | Megatron-LM per token | ratio |\n|---|---|---|---|---|")
    for name, config, tp in models:
        ours = training_flops_per_token(config, args.seq_length, tp)
        theirs = count(megatron_args(config, args.seq_length, tp), 1) / args.seq_length
        worst = max(worst, abs(ours / theirs - 1))
        print(f"| {name} | {args.seq_length} | {ours:.6e} | {theirs:.6e} | {ours / theirs:.9f} |")
    print(f"\nlargest |ratio - 1|: {worst:.2e}")
    return 0 if worst < 1e-9 else 1


if __name__ == "__main__":
    sys.exit(main())
