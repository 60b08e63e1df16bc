"""Corpus preprocessing: JSONL, Parquet or `datasets` directories -> tokenized MiniPLM
instances in Megatron indexed datasets.

One concept per module:
    tokenizer       load_tokenizer(): HF tokenizer.json / sentencepiece .model behind one interface
    fast_bpe        the native byte-level BPE encoder HF GPT-2-style tokenizers use (same ids, faster)
    boundaries      sentence-boundary token tables derived from a tokenizer's vocabulary
    jsonl_reader    streaming .jsonl / .jsonl.gz / .jsonl.zst reader (hashing, truncation checks)
    arrow_reader    Parquet (row group at a time) and `datasets` save_to_disk (Arrow IPC) reader
    records         JSON record parsing and validation, with a reason for every rejected line
    worker          the parallel step: parse + tokenize one block of lines or rows (threads)
    instances       miniplm / packed / document instance construction, one buffer per domain
    dataset_writer  megatron-core indexed datasets written under temporary names, spilled index
    meta            the PREFIX.meta.json contract (read_dataset_meta, dataset_prefixes)
    preprocess      the pipeline behind tools/preprocess_data.py
    split           the D_ref split behind tools/split_dataset.py
    cli             the tools' shared logging set-up and error reporting (setup_logging, run_stage)

Nothing here imports torch or megatron at package import time: only dataset_writer,
preprocess and split (which write or read indexed datasets) pull in megatron-core.
"""
