"""The AVX2 and the portable builds of the scoring and selection kernels give the same bytes.

The rest of the suite checks whichever build this CPU runs against numpy references; here
the same workload runs twice in fresh processes, once with MINIPLM_NO_AVX2=1, and every
output (scores, bad-row reports, kept sets, boundaries, blends, token counts) must match.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

WORKLOAD = textwrap.dedent("""
    import hashlib, json
    import numpy as np
    from megatron_miniplm import _cpp

    digest = hashlib.sha256()
    def add(*xs):
        for x in xs:
            digest.update(np.ascontiguousarray(x).tobytes() if isinstance(x, np.ndarray) else repr(x).encode())

    rng = np.random.default_rng(7)
    n = 700_003  # odd: partial vectors, words and blocks at every chunk and shard end
    offs = np.array([0, 1, 250_037, 250_037, 600_001, n], np.int64)  # tiny, empty and odd shards
    count = rng.integers(1, 1025, n).astype(np.float64)
    t = np.stack([rng.normal(3.0, 0.6, n) * count, count], 1)
    r = np.stack([(t[:, 0] / count + rng.normal(0.8, 0.4, n)) * count, count], 1)
    r[::997, 0] = t[::997, 0]  # exact zeros of the difference, and ties
    w = rng.integers(1, 1025, n).astype(np.int32)
    shards = lambda a: [a[offs[s]:offs[s + 1]] for s in range(len(offs) - 1)]
    for kind in ("difference", "teacher", "reference"):
        for ascending in (False, True):
            for weights, cap in ((None, n // 2), (None, n // 50), (w, int(w.sum()) // 3)):
                out = np.empty(n)
                sel, bad, first = _cpp.select_scored(kind, shards(t), shards(r), offs, out, cap, weights=weights,
                                                     ascending=ascending, num_threads=2)
                blend = np.empty((sel.count, 2), np.int64)
                tokens = sel.write_blend(blend, offs, weights=w, num_threads=2)
                add(out, bad, first, sel.count, sel.weight, sel.boundary_key, sel.boundary_index, sel.bracketed,
                    blend, tokens)
                blend2 = np.empty_like(blend)
                add(sel.write_blend(blend2, offs, shuffle_seed=9, weights=w), blend2)
                plain = _cpp.select(out, cap, weights=weights, ascending=ascending, num_threads=2)
                add(plain.count, plain.boundary_key, plain.boundary_index)
    # Signed zeros, subnormals, huge magnitudes and ties, ranked from a score array.
    values = np.array([0.0, -0.0, 5e-324, -5e-324, 1e300, -1e300, 1.5, -1.5])
    scores = rng.choice(values, n)
    for ascending in (False, True):
        sel = _cpp.select(scores, n // 3, ascending=ascending, num_threads=2)
        idx = np.empty(sel.count, np.int64)
        sel.write_indices(idx)
        add(idx, sel.boundary_key, sel.boundary_index)
    # Unscored (0, 0) rows rank last (NaN scores, key 0), here and from a score array with NaNs.
    t0, r0 = t.copy(), r.copy()
    t0[::13], r0[::13] = 0.0, 0.0
    for ascending in (False, True):
        out = np.empty(n)
        sel, bad, first = _cpp.select_scored("difference", shards(t0), shards(r0), offs, out, n - n // 20,
                                             ascending=ascending, num_threads=2)
        idx = np.empty(sel.count, np.int64)
        sel.write_indices(idx)
        plain = _cpp.select(out, n - n // 20, ascending=ascending, num_threads=2)
        add(out, bad, first, idx, sel.boundary_key, sel.boundary_index, plain.boundary_key, plain.boundary_index)
    # Unusable rows: zero, negative, NaN and infinite counts and sums.
    for row, col, value in ((5, 1, 0.0), (70_000, 1, -2.0), (300_001, 0, np.nan), (n - 1, 1, np.inf)):
        t[row, col] = value
    out = np.empty(n)
    add(_cpp.compute_scores("difference", t, r, out), out)
    add(_cpp.select_scored("difference", shards(t), shards(r), offs, None, n // 2, num_threads=2)[1:])
    print(json.dumps({"kernels": _cpp.simd_kernels(), "digest": digest.hexdigest()}))
""")


def run_workload(**env) -> dict:
    base = {k: v for k, v in os.environ.items() if k != "MINIPLM_NO_AVX2"}
    proc = subprocess.run([sys.executable, "-c", WORKLOAD], env={**base, **env}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_avx2_and_portable_builds_agree():
    fast = run_workload()
    if fast["kernels"] != "avx2":
        pytest.skip("this CPU or build runs the portable kernels only: nothing to compare them with")
    portable = run_workload(MINIPLM_NO_AVX2="1")
    assert portable["kernels"] == "portable"
    assert fast["digest"] == portable["digest"]
