"""The command-line tools: one module per tool, each with `build_parser()` and
`main(argv=None) -> int` (its exit status), run by megatron_miniplm.cli.runner.

Every tool is reachable three ways, all running the same `main`:
    python tools/<tool>.py ...              the path Megatron-LM users type (a shim)
    miniplm-<tool, "_" as "-"> ...          the console script setup.py declares
    python -m megatron_miniplm.cli.<tool> ...

    build_demo_corpus   a small multi-domain JSONL corpus from this machine's Python
    preprocess_data     JSONL / Parquet / Arrow -> indexed datasets of MiniPLM instances
    split_dataset       carve D_ref (the reference model's data) out of a dataset
    convert_checkpoint  HF / GGUF <-> megatron checkpoints
    model_info          parameter counts of the model presets
    pretrain_gpt        pre-train a GPT (reference LM or student), optionally with KD
    score_docs          per-instance NLL of a dataset under a model
    difference_sample   Difference Sampling: the selected blend
    generate_corpus     SeqKD's corpus: continuations sampled from a teacher
    export_selection    a blend as text
    evaluate            held-out LM loss, paired comparisons, zero-shot tasks
    pipeline            the whole MiniPLM pipeline from one config

Importing a tool's module and building its parser load neither torch nor megatron-core,
so `--help` and argument errors come at once; each tool imports what it runs in `main`.
"""
