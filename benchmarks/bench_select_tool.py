"""tools/difference_sample.py as a user runs it, against the floor of reading its inputs.

    python benchmarks/bench_select_tool.py --instances 20000000 --shards 8 --rounds 3

Builds a synthetic dataset (megatron .bin/.idx + meta + domains, short instances) with
teacher and reference score files, then times, each in a fresh process:

    floor  python + numpy: map every score file and the .idx lengths and sum them once
           (what any implementation must at least do, interpreter start-up included)
    tool   tools/difference_sample.py --alpha 0.5 (--data-order original, shuffled, and with
           --report): validation, scoring, selection, the blend written with fsync, its
           meta (and the report: domain table, histograms, decoded examples)

and prints tool / floor, the tool's own stage timings and both peak RSS. Files are in
the page cache for both (just written), so this measures the software, not the disk.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
VOCAB = 100  # words w0..w99, then the end-of-document token


def build_inputs(root: str, n: int, shards: int, seed: int = 0) -> list[str]:
    """Shard prefixes of a dataset written by the project's DatasetWriter; beside each,
    teacher_/reference_ score files of the same index."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from megatron_miniplm.data.dataset_writer import DatasetWriter
    from megatron_miniplm.data.instances import Instances
    from megatron_miniplm.data.meta import FORMAT_VERSION
    from megatron_miniplm.data.tokenizer import load_tokenizer
    from megatron_miniplm.scoring.score_file import save_scores
    from megatron_miniplm.selection.shards import open_shards

    vocab = {f"w{i}": i for i in range(VOCAB)} | {"<|endoftext|>": VOCAB}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.save(os.path.join(root, "tokenizer.json"))
    tokenizer = load_tokenizer(os.path.join(root, "tokenizer.json"), eod_token="<|endoftext|>")
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 13, n)  # short instances: the selection's cost is per instance
    prefix = os.path.join(root, "corpus")
    writer = DatasetWriter(prefix, tokenizer.vocab_size, tokenizer.eod_id,
                           shard_size_tokens=-(-int(lengths.sum()) // shards))
    for a in range(0, n, 1 << 22):
        part = lengths[a:a + (1 << 22)]
        tokens = rng.integers(0, VOCAB, int(part.sum()))
        tokens[np.cumsum(part) - 1] = tokenizer.eod_id
        writer.add(Instances(tokens, part, rng.integers(0, 3, len(part)).astype(np.int32)))
    writer.commit({"format_version": FORMAT_VERSION, "instance_mode": "miniplm", "seq_length": 12,
                   "tokenizer": tokenizer.info(), "inputs": [], "skipped": {}}, ["web", "code", "noise"])
    shards = open_shards([prefix])
    for shard in shards:
        count = shard.index.lengths.astype(np.float64) - 1  # scored tokens per instance
        t_mean = rng.normal(3.0, 0.6, len(count))
        r_mean = t_mean + rng.normal(0.8, 0.4, len(count))
        for role, mean in (("teacher", t_mean), ("reference", r_mean)):
            save_scores(shard.prefix.replace("corpus_", f"{role}_"), np.stack([mean * count, count], 1),
                        {"dataset_fingerprint": shard.fingerprint, "model": {"name": role}})
    return [shard.prefix for shard in shards]


FLOOR = """
import sys, numpy as np
total = 0.0
for p in sys.argv[1:]:
    for role in ("teacher", "reference"):
        total += float(np.load(p.replace("corpus_", role + "_") + ".npy", mmap_mode="r").sum())
    with open(p + ".idx", "rb") as f:
        f.seek(18); n = int(np.frombuffer(f.read(8), np.int64)[0])
    total += float(np.memmap(p + ".idx", np.int32, "r", 34, (n,)).sum(dtype=np.int64))
print(total)
"""

# Runs a script as __main__ and reports its peak RSS (VmHWM: this process image only;
# getrusage's ru_maxrss would also count the benchmark's own pages from before exec).
PEAK = """
import atexit, re, runpy, sys
def peak():
    with open("/proc/self/status") as f:
        print("peak_kib", re.search(r"VmHWM:\\s+(\\d+)", f.read()).group(1))
atexit.register(peak)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def timed(script: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, output) of a fresh python running `script` (path, args)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK, *script], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{script[0]} failed ({proc.returncode}):\n{proc.stdout}")
    return wall, int(re.search(r"peak_kib (\d+)", proc.stdout).group(1)) / 1024, proc.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", type=int, default=20_000_000)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workdir", help="where to build the inputs (default: a temporary directory, removed)")
    args = p.parse_args()

    root = args.workdir or tempfile.mkdtemp(prefix="bench_select_tool_")
    os.makedirs(root, exist_ok=True)
    try:
        t = time.perf_counter()
        prefixes = build_inputs(root, args.instances, args.shards)
        size = sum(os.path.getsize(os.path.join(root, f)) for f in os.listdir(root))
        print(f"inputs: {args.instances:,} instances in {args.shards} shards, {size / 2**30:.2f} GiB on disk "
              f"(built in {time.perf_counter() - t:.1f} s); cpus {os.cpu_count()}, load avg {os.getloadavg()[0]:.2f}")
        floor_script = os.path.join(root, "floor.py")
        with open(floor_script, "w") as f:
            f.write(FLOOR)
        floor_cmd = [floor_script, *prefixes]
        variants = {"--data-order original": ["--data-order", "original"], "--data-order shuffled": ["--data-order", "shuffled"],
                    "--report": ["--report", os.path.join(root, "report")]}
        for name, extra in variants.items():
            tool_cmd = ["tools/difference_sample.py", "--data-path", *prefixes,
                        "--teacher-scores", *[x.replace("corpus_", "teacher_") for x in prefixes],
                        "--reference-scores", *[x.replace("corpus_", "reference_") for x in prefixes],
                        "--alpha", "0.5", *extra, "--output-prefix", os.path.join(root, "out", "blend")]
            floors, tools, stages = [], [], []
            for _ in range(args.rounds):  # interleaved, so machine noise hits both alike
                floors.append(timed(floor_cmd))
                tools.append(timed(tool_cmd))
                stages.append(re.search(r"timings: (.*)", tools[-1][2]).group(1))
            f_best, t_best = min(x[0] for x in floors), min(x[0] for x in tools)
            f_med, t_med = statistics.median(x[0] for x in floors), statistics.median(x[0] for x in tools)
            best_stages = stages[min(range(args.rounds), key=lambda i: tools[i][0])]
            print(f"{name:16s} tool {t_best:5.2f} s best / {t_med:5.2f} median ({best_stages}), "
                  f"peak {max(x[1] for x in tools):,.0f} MiB | floor {f_best:5.2f} / {f_med:5.2f} s, "
                  f"peak {max(x[1] for x in floors):,.0f} MiB | tool/floor {t_best / f_best:.2f}x best, "
                  f"{t_med / f_med:.2f}x median", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
