"""Corpus preprocessing: JSONL, Parquet or `datasets` directories -> tokenized MiniPLM
instances in Megatron indexed datasets.

One concept per module:
    tokenizer       load_tokenizer(): HF tokenizer.json / sentencepiece .model behind one interface
    fast_bpe        the native byte-level BPE encoder HF GPT-2-style tokenizers use (same ids, faster)
    boundaries      sentence-boundary token tables derived from a tokenizer's vocabulary
    inputs          the inputs of a run: globs expanded, each input's format decided, its reader called
    blocks          what the readers yield (Block, RecordBlock, ReadFailure, FileDone): their shared types
    jsonl_reader    streaming .jsonl / .jsonl.gz / .jsonl.zst reader (hashing, truncation checks)
    arrow_reader    Parquet (row group at a time) and `datasets` save_to_disk (Arrow IPC) reader
    records         JSON record parsing and validation, with a reason for every rejected line
    worker          the parallel step: parse + tokenize one block of lines or rows (threads)
    instances       miniplm / packed / document instance construction, one buffer per domain
    indexed_dataset the .bin/.idx format (megatron-core's, byte for byte): writer with a spilled
                    index, memory-mapped reader, per-domain statistics
    dataset_writer  a dataset (and its shards) written under temporary names, renamed when complete
    meta            the PREFIX.meta.json contract (read_dataset_meta, dataset_prefixes)
    preprocess      the pipeline behind tools/preprocess_data.py
    split           the D_ref split behind tools/split_dataset.py
    cli             the data tools' shared logging set-up and stage run (setup_logging, run_stage)
    config          PreprocessConfig and SplitConfig: the tools' flags (no numpy)
    samples         collating instances into training batches (torch)

Only samples imports torch; nothing here imports megatron-core. The readers are leaves:
they import blocks and records only, never each other or preprocess
(tests/test_architecture.py checks this, with the whole package's import graph).
"""
