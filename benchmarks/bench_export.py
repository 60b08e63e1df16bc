#!/usr/bin/env python3
"""Export throughput: tools/export_selection.py against a plain decode loop, in one run.

    .venv/bin/python benchmarks/bench_export.py [--corpus-mb 64] [--rounds 2]

corpus    bench_preprocess.py's Pile-style JSONL (same cache), preprocessed once with
          SmolLM2's tokenizer (miniplm instances, seq-length 1024), and a blend of all its
          instances in shuffled order (uniform, alpha 1: the whole corpus, in an order
          that reads the shards at random, as a real selection does)
tool      megatron_miniplm.selection.export: instances split at EOD, decoded in batches
          (tokenizers' decode_batch), one JSON record per piece, .jsonl.zst and .parquet
baseline  the obvious loop: per instance, split at EOD, tokenizer.decode per piece,
          json.dumps, written to an uncompressed .jsonl (it does less: no scores, no
          compression)

MB/s are MB of exported text (UTF-8) per second; each run in a fresh process, rounds
interleaved; the mean is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def prepare(cache: str, corpus_mb: float) -> tuple[str, str]:
    """(blend prefix, tokenizer dir), built once per corpus size."""
    from bench_preprocess import build_corpus, ensure_tokenizer

    from megatron_miniplm.data.preprocess import preprocess
    from megatron_miniplm.data.config import PreprocessConfig
    from megatron_miniplm.selection.config import SelectionConfig
    from megatron_miniplm.selection.sample import SampleRequest, run

    os.makedirs(cache, exist_ok=True)
    corpus = os.path.join(cache, f"corpus_{corpus_mb:g}mb.jsonl")
    if not os.path.isfile(corpus):
        build_corpus(corpus, corpus_mb)
    tokenizer = ensure_tokenizer(cache)
    data = os.path.join(cache, f"export_{corpus_mb:g}mb", "data")
    blend = os.path.join(cache, f"export_{corpus_mb:g}mb", "all")
    if not os.path.exists(blend + ".meta.json"):
        os.makedirs(os.path.dirname(data), exist_ok=True)
        preprocess(PreprocessConfig([corpus], data, tokenizer, workers=2, progress=False))
        run(SampleRequest(data_paths=[data], output=blend,
                          config=SelectionConfig(method="uniform", alpha=1.0, order="shuffled")))
    return blend, tokenizer


def run_tool(blend: str, out: str, suffix: str) -> dict:
    from megatron_miniplm.selection.export import ExportConfig, export_selection

    s = export_selection(ExportConfig(blend=blend, output=out + suffix, progress=False))
    return {"seconds": s.seconds, "text_bytes": s.text_bytes, "records": s.records}


def run_baseline(blend: str, out: str, _suffix: str) -> dict:
    import numpy as np

    from megatron_miniplm.data.tokenizer import load_tokenizer
    from megatron_miniplm.selection.blend import BlendReader

    t0 = time.perf_counter()
    reader = BlendReader(blend)
    tok = load_tokenizer(reader.meta["tokenizer"]["path"])
    eod = reader.meta["tokenizer"]["eod_id"]
    text_bytes = records = 0
    with open(out + ".jsonl", "w", encoding="utf-8") as f:
        for j in range(len(reader)):
            tokens = reader[j]
            cuts = [-1, *np.flatnonzero(tokens == eod).tolist(), len(tokens)]
            for a, b in zip(cuts, cuts[1:]):
                if b > a + 1:
                    text = tok.decode(tokens[a + 1:b].tolist())
                    f.write(json.dumps({"text": text, "meta": {"blend_row": j}}, ensure_ascii=False) + "\n")
                    text_bytes += len(text.encode("utf-8"))
                    records += 1
    return {"seconds": time.perf_counter() - t0, "text_bytes": text_bytes, "records": records}


RUNNERS = {"tool .jsonl.zst": (run_tool, ".jsonl.zst"), "tool .parquet": (run_tool, ".parquet"),
           "baseline .jsonl": (run_baseline, "")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus-mb", type=float, default=64.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "miniplm_bench_cache"))
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--blend", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        fn, suffix = RUNNERS[args.measure]
        print(json.dumps(fn(args.blend, args.out, suffix)))
        return
    blend, _ = prepare(args.cache_dir, args.corpus_mb)
    print(f"blend: {blend} (every instance of the {args.corpus_mb:g} MB corpus, shuffled); {os.cpu_count()} cores")
    results: dict = {k: [] for k in RUNNERS}
    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
        for rnd in range(args.rounds):
            for kind in (list(RUNNERS) if rnd % 2 == 0 else list(reversed(RUNNERS))):
                out = os.path.join(tmp, f"{rnd}-{kind.replace(' ', '_')}")
                r = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", kind, "--blend", blend,
                                    "--out", out], capture_output=True, text=True)
                if r.returncode != 0:
                    raise SystemExit(f"{kind} failed:\n{r.stderr[-3000:]}")
                m = json.loads(r.stdout.strip().splitlines()[-1])
                results[kind].append(m)
                print(f"  round {rnd + 1} {kind:>16}: {m['seconds']:6.1f} s, "
                      f"{m['text_bytes'] / 1e6 / m['seconds']:6.2f} MB/s, {m['records']:,} records", flush=True)
    if len({r[0]["records"] for r in results.values()}) != 1:
        raise SystemExit("the runs disagree on the number of records")
    print("\n| run | seconds | MB of text / s |\n|---|---|---|")
    t = {k: statistics.mean(r["seconds"] for r in v) for k, v in results.items()}
    mb = results["tool .jsonl.zst"][0]["text_bytes"] / 1e6
    for k in RUNNERS:
        print(f"| {k} | {t[k]:.1f} | {mb / t[k]:.2f} |")
    print(f"\ntool .jsonl.zst / baseline = {t['baseline .jsonl'] / t['tool .jsonl.zst']:.2f}x; "
          f"tool .parquet / baseline = {t['baseline .jsonl'] / t['tool .parquet']:.2f}x ({mb:.1f} MB of text)")


if __name__ == "__main__":
    main()
