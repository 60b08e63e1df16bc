#!/usr/bin/env python
"""What the training input path costs a rank, against the GPU step it hides behind.

Megatron-LM reads data on tensor-parallel rank 0 only and broadcasts it within the TP group.
Here every rank builds its own micro-batches (the trainer's ``SampleStream`` +
``collate_instances`` + ``platform.pin``) in a background thread while the previous step
trains: TP ranks of one node read the same memory-mapped pages (one copy in the page cache)
and no collective is added to the step. This benchmark measures what that building costs a
rank, per global batch, on this machine's CPU, and sets it against the modeled duration of
the GPU step it overlaps (the model's training FLOPs of that rank's tokens at a given MFU
and peak): the ratio says how much of a step the background thread occupies.

    python benchmarks/bench_input.py [--preset qwen-200M] [--seq-length 1024] [--micro-batch-size 8] \\
        [--microbatches 8] [--mfu 0.45] [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from megatron_miniplm import platform
from megatron_miniplm.data.dataset_writer import DatasetWriter
from megatron_miniplm.data.instances import Instances
from megatron_miniplm.data.meta import FORMAT_VERSION
from megatron_miniplm.data.samples import collate_instances
from megatron_miniplm.models.config import get_preset
from megatron_miniplm.training.data import SampleStream
from megatron_miniplm.training.flops import training_flops_per_token


def write_corpus(prefix: str, instances: int, seq_length: int, vocab: int, seed: int = 0) -> None:
    """Random instances of seq_length/2 .. seq_length + 1 tokens, in the trainer's format."""
    rng = np.random.default_rng(seed)
    with DatasetWriter(prefix, vocab, eod_id=0) as writer:
        for _ in range(0, instances, 1000):
            lengths = rng.integers(seq_length // 2, seq_length + 2, size=1000)
            tokens = rng.integers(1, vocab, size=int(lengths.sum()), dtype=np.int32)
            writer.add(Instances(tokens, lengths.astype(np.int64), np.zeros(1000, dtype=np.int32)))
        writer.commit({"format_version": FORMAT_VERSION, "instance_mode": "miniplm", "seq_length": seq_length,
                       "tokenizer": {"path": "", "name": "random", "sha256": "0" * 64, "vocab_size": vocab, "eod_id": 0, "pad_id": 0},
                       "inputs": [], "skipped": {}},
                      ["random"])


def build_share(data: SampleStream, first: int, micro: int, microbatches: int, seq_length: int) -> list:
    """One rank's micro-batches of a global batch, as the trainer builds them."""
    out = []
    for m in range(microbatches):
        lo = first + m * micro
        out.append(platform.pin(collate_instances([data[i] for i in range(lo, lo + micro)], data.pad_id,
                                                  pad_to=seq_length)))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen-200M")
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--microbatches", type=int, default=8, help="micro-batches per rank and step")
    p.add_argument("--instances", type=int, default=20000)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--mfu", type=float, default=0.45, help="MFU of the modeled GPU step")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100/H200 SXM)")
    args = p.parse_args()

    config = get_preset(args.preset)
    seq, micro, n_micro = args.seq_length, args.micro_batch_size, args.microbatches
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "corpus")
        write_corpus(prefix, args.instances, seq, config.vocab_size)
        per_step = micro * n_micro
        data = SampleStream.from_data_path([prefix], seed=1, shuffle=True, num_samples=per_step * args.steps,
                                           seq_length=seq)
        build_share(data, 0, micro, n_micro, seq)  # warm the page cache and the permutation
        times = []
        for step in range(1, args.steps):
            t = time.perf_counter()
            build_share(data, step * per_step, micro, n_micro, seq)
            times.append(time.perf_counter() - t)
    build = statistics.median(times)
    tokens = per_step * seq
    step = tokens * training_flops_per_token(config, seq) / (args.mfu * args.peak_tflops * 1e12)
    print(f"model {config.name}, seq {seq}, {n_micro} micro-batches of {micro} per rank and step "
          f"({tokens} tokens)")
    print(f"build one rank's share of a global batch: {build * 1000:.2f} ms (median of {len(times)})")
    print(f"modeled GPU step at {args.mfu:.0%} MFU of {args.peak_tflops:g} TFLOP/s: {step * 1000:.1f} ms")
    print(f"ratio build / step: {build / step:.3f} (the background thread's share of a step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
