"""Selection + sampled-blend build: the C++ builder against numpy, side by side in one run.

    python benchmarks/bench_select.py --instances 100000000 --shards 8 --repeat 3

Both start from the same in-memory per-shard score arrays ([n, 2] float64 (nll_sum,
token_count) for teacher and reference, as the score files hold them) and end with the
same [K, 2] int64 (shard, instance) blend plus the kept token count:

    C++    _cpp.select_scored (scores computed in the first ranking pass, not written out) ->
           Selection.write_blend (kept tokens summed in the same pass), as
           tools/difference_sample.py runs it without --report
    numpy  mean-NLL difference per shard -> np.partition threshold + masks (top-alpha) or a
           stable argsort + cumsum (token budget) -> flatnonzero -> searchsorted into pairs;
           the shuffled order with Generator.permutation

Scope "end-to-end" starts from the score arrays (the C++ fuses scoring into its first
ranking pass); scope "scores" starts both from the same precomputed difference array,
i.e. selection + blend build alone. Results are checked equal (shuffled: the same set).
Peak memory is the peak resident set above what the inputs already occupy, reset before
each run (/proc/self/clear_refs).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import threading
import time

import numpy as np

from megatron_miniplm import _cpp


def rss_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


class PeakMemory:
    """Peak RSS above the starting RSS, in MiB (kernel high-water mark, sampled as a fallback)."""

    def __enter__(self):
        gc.collect()
        self.start = rss_kib()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.hwm = True
        except OSError:
            self.hwm = False
            self.peak, self._stop = self.start, threading.Event()
            self._t = threading.Thread(target=self._sample, daemon=True)
            self._t.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_kib())

    def __exit__(self, *exc):
        if self.hwm:
            peak = rss_kib("VmHWM")
        else:
            self._stop.set()
            self._t.join()
            peak = self.peak
        self.mib = (peak - self.start) / 1024


def make_inputs(n: int, shards: int, seed: int):
    """Per-shard score arrays and instance lengths, generated in chunks."""
    rng = np.random.default_rng(seed)
    offsets = np.linspace(0, n, shards + 1).astype(np.int64)
    teacher, reference, lengths = [], [], []
    for s in range(shards):
        m = int(offsets[s + 1] - offsets[s])
        t = np.empty((m, 2))
        r = np.empty((m, 2))
        ln = np.empty(m, np.int32)
        for a in range(0, m, 1 << 22):
            b = min(m, a + (1 << 22))
            length = rng.integers(16, 1026, b - a)  # tokens per instance (<= seq_length + 1)
            count = (length - 1).astype(np.float64)
            t_mean = rng.normal(3.0, 0.6, b - a)
            t[a:b, 0], t[a:b, 1] = t_mean * count, count
            r[a:b, 0], r[a:b, 1] = (t_mean + rng.normal(0.8, 0.4, b - a)) * count, count
            ln[a:b] = length
        teacher.append(t)
        reference.append(r)
        lengths.append(ln)
    return offsets, teacher, reference, np.concatenate(lengths)


def read_floor(arrays: list, threads: int, repeat: int) -> float:
    """Best time for `threads` threads to read every array once (numpy sums release the
    GIL): the memory-bandwidth floor of any pass over the score rows."""
    threads = threads or os.cpu_count() or 1
    halves = [a[i * len(a) // 2:(i + 1) * len(a) // 2] for a in arrays for i in range(2)]
    groups = [halves[t::threads] for t in range(threads)]
    best = float("inf")
    for _ in range(repeat):
        workers = [threading.Thread(target=lambda g=g: [x.sum() for x in g]) for g in groups]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - t0)
    return best


def cpp_pipeline(inp, capacity, budget, shuffle_seed, threads, from_scores):
    offsets, lengths = inp["offsets"], inp["lengths"]
    t0 = time.perf_counter()
    if from_scores:
        sel = _cpp.select(inp["scores"], capacity, weights=lengths if budget else None, num_threads=threads)
    else:
        # out=None: as tools/difference_sample.py runs without --report, the N scores are
        # ranked as they are computed and never written out.
        sel, bad, _ = _cpp.select_scored("difference", inp["teacher"], inp["reference"], offsets, None, capacity,
                                         weights=lengths if budget else None, num_threads=threads)
        assert bad == 0
    t1 = time.perf_counter()
    out = np.empty((sel.count, 2), np.int64)
    tokens = sel.write_blend(out, offsets, shuffle_seed=shuffle_seed, num_threads=threads, weights=lengths)
    t2 = time.perf_counter()
    return out, int(tokens), {"select": t1 - t0, "blend": t2 - t1, "passes": sel.passes}


def numpy_pipeline(inp, capacity, budget, shuffle_seed, from_scores):
    offsets, lengths = inp["offsets"], inp["lengths"]
    t0 = time.perf_counter()
    n = int(offsets[-1])
    if from_scores:
        diff = inp["scores"]
    else:
        diff = np.empty(n)
        for s, (t, r) in enumerate(zip(inp["teacher"], inp["reference"])):
            diff[offsets[s]:offsets[s + 1]] = r[:, 0] / r[:, 1] - t[:, 0] / t[:, 1]
    if budget:  # rank everything: stable argsort (ties by lower index), then the fitting prefix
        order = np.argsort(-diff, kind="stable")
        fit = int(np.searchsorted(np.cumsum(lengths[order], dtype=np.int64), capacity, side="right"))
        idx = np.sort(order[:fit])
        del order
    else:  # threshold value of the k-th best, then exact tie-breaking by index
        k = capacity
        kth = np.partition(diff, n - k)[n - k]
        keep = diff > kth
        ties = np.flatnonzero(diff == kth)[: k - int(np.count_nonzero(keep))]
        keep[ties] = True
        idx = np.flatnonzero(keep)
        del keep
    t1 = time.perf_counter()
    tokens = int(lengths[idx].sum(dtype=np.int64))
    if shuffle_seed is not None:
        idx = np.random.default_rng(shuffle_seed).permutation(idx)
    shard = np.searchsorted(offsets, idx, side="right") - 1
    out = np.empty((idx.size, 2), np.int64)
    out[:, 0] = shard
    out[:, 1] = idx - offsets[shard]
    t2 = time.perf_counter()
    return out, tokens, {"select": t1 - t0, "blend": t2 - t1}


def run_mode(inp, scope, mode, from_scores, tokens_total, args) -> dict:
    offsets = inp["offsets"]
    n = int(offsets[-1])
    kind, order = mode.split("-")
    budget = kind == "budget"
    capacity = tokens_total // 2 if budget else int(np.floor(args.alpha * n + 0.5))
    seed = 1234 if order == "shuffled" else None
    runs = {"cpp": [], "numpy": []}
    peaks = {"cpp": 0.0, "numpy": 0.0}
    for _ in range(args.repeat):  # interleaved, so machine noise hits both alike
        for impl in ("cpp", "numpy"):
            with PeakMemory() as mem:
                t0 = time.perf_counter()
                if impl == "cpp":
                    out, tokens, stages = cpp_pipeline(inp, capacity, budget, seed, args.threads, from_scores)
                else:
                    out, tokens, stages = numpy_pipeline(inp, capacity, budget, seed, from_scores)
                stages["total"] = time.perf_counter() - t0
            peaks[impl] = max(peaks[impl], mem.mib)
            runs[impl].append(stages)
            if impl == "cpp":
                ref_out, ref_tokens = out, tokens
            else:  # same selection, same tokens; same rows unless shuffled
                assert tokens == ref_tokens, (tokens, ref_tokens)
                if seed is None:
                    assert np.array_equal(out, ref_out)
                else:
                    key = lambda a: np.sort(offsets[a[:, 0]] + a[:, 1])  # noqa: E731
                    assert np.array_equal(key(out), key(ref_out))
            del out
        del ref_out
    best = {impl: min(r["total"] for r in rs) for impl, rs in runs.items()}
    row = {
        "scope": scope, "mode": mode, "capacity": int(capacity),
        "cpp_best_s": best["cpp"], "cpp_median_s": statistics.median(r["total"] for r in runs["cpp"]),
        "numpy_best_s": best["numpy"], "numpy_median_s": statistics.median(r["total"] for r in runs["numpy"]),
        "speedup_best": best["numpy"] / best["cpp"],
        "speedup_median": statistics.median(r["total"] for r in runs["numpy"])
        / statistics.median(r["total"] for r in runs["cpp"]),
        "cpp_stages_best": min(runs["cpp"], key=lambda r: r["total"]),
        "numpy_stages_best": min(runs["numpy"], key=lambda r: r["total"]),
        "cpp_peak_mib": peaks["cpp"], "numpy_peak_mib": peaks["numpy"],
    }
    cs, ns = row["cpp_stages_best"], row["numpy_stages_best"]
    print(f"{mode:16s} C++ {row['cpp_best_s']:6.2f} s (select {cs['select']:.2f} [{cs['passes']} passes] + blend "
          f"{cs['blend']:.2f}), peak +{row['cpp_peak_mib']:,.0f} MiB | numpy {row['numpy_best_s']:6.2f} s "
          f"(select {ns['select']:.2f} + blend {ns['blend']:.2f}), peak +{row['numpy_peak_mib']:,.0f} MiB | "
          f"speedup {row['speedup_best']:.1f}x best, {row['speedup_median']:.1f}x median "
          f"(medians {row['cpp_median_s']:.2f} / {row['numpy_median_s']:.2f} s)", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", type=int, default=100_000_000)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="C++ threads (0: all cores)")
    p.add_argument("--modes", default="alpha-original,alpha-shuffled,budget-original")
    p.add_argument("--scopes", default="end-to-end,scores",
                   help="end-to-end: from the score arrays; scores: from precomputed difference scores")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    t = time.perf_counter()
    offsets, teacher, reference, lengths = make_inputs(args.instances, args.shards, seed=0)
    n = int(offsets[-1])
    tokens_total = int(lengths.sum(dtype=np.int64))
    print(f"inputs: {n:,} instances over {args.shards} shards, {tokens_total:,} tokens, "
          f"{(sum(a.nbytes for a in teacher + reference) + lengths.nbytes) / 2**30:.2f} GiB "
          f"(generated in {time.perf_counter() - t:.1f} s); cpus {os.cpu_count()}, load avg {os.getloadavg()[0]:.2f}")
    floor = read_floor(teacher + reference, args.threads, args.repeat)
    print(f"memory floor: {args.threads or os.cpu_count()} threads read the "
          f"{sum(a.nbytes for a in teacher + reference) / 1e9:.1f} GB of score rows once in {floor:.3f} s (best of "
          f"{args.repeat}); C++ kernels: {_cpp.simd_kernels()}")
    inp = {"offsets": offsets, "teacher": teacher, "reference": reference, "lengths": lengths}
    if "scores" in args.scopes.split(","):
        inp["scores"] = np.empty(n)
        for s in range(args.shards):
            _cpp.compute_scores("difference", teacher[s], reference[s], inp["scores"][offsets[s]:offsets[s + 1]])
    results = []
    for scope in args.scopes.split(","):
        from_scores = scope == "scores"
        print(f"\n[{scope}] " + ("from the difference scores (computed beforehand, same array for both)"
                                 if from_scores else "from the per-shard (nll_sum, token_count) score arrays"))
        for mode in args.modes.split(","):
            results.append(run_mode(inp, scope, mode, from_scores, tokens_total, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "read_floor_s": floor, "kernels": _cpp.simd_kernels(),
                       "machine": platform.processor() or platform.machine(),
                       "load_avg": os.getloadavg(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
