"""--materialize: the selected instances written as a new indexed dataset.

For tools that read datasets rather than blends. Tokens are copied in blend order by the
C++ gather (chunked, so memory stays bounded), one document per instance as in the
preprocessed datasets; domain ids are renumbered into the union of the shards' domain
lists. Everything is written under temporary names and renamed at the end, the meta last.
"""
from __future__ import annotations

import os
import struct

import numpy as np

from megatron_miniplm import _cpp
from megatron_miniplm.scoring.score_file import file_sha256
from megatron_miniplm.atomic_io import publish, temp_name, write_json_atomic
from megatron_miniplm.selection.difference import SelectionError
from megatron_miniplm.selection.shards import INDEX_HEADER, INDEX_VERSION, TOKEN_DTYPES, Shard, domain_table

CHUNK_ROWS = 1 << 20
_DTYPE_CODES = {np.dtype(v): k for k, v in TOKEN_DTYPES.items()}
# Per-dataset keys that must not be copied from a source shard's meta.
_OWN_KEYS = ("shards", "fingerprint", "num_instances", "num_tokens", "num_documents", "domains",
             "domain_stats", "inputs", "skipped", "kind")


def check_materializable(shards: list[Shard]) -> np.dtype:
    """The common token dtype; refuses shards that cannot be concatenated."""
    dtypes = {s.index.token_dtype for s in shards}
    if len(dtypes) != 1:
        raise SelectionError("--materialize: the shards store tokens as different dtypes "
                             f"({', '.join(sorted(str(d) for d in dtypes))})")
    return dtypes.pop()


def _write_index(path: str, token_dtype: np.dtype, lengths: np.ndarray) -> None:
    """A megatron-core .idx: header, int32 lengths, int64 byte pointers, int64 document
    indices (one document per sequence)."""
    n = int(lengths.shape[0])
    itemsize = token_dtype.itemsize
    with open(path, "wb") as f:
        f.write(INDEX_HEADER + struct.pack("<Q", INDEX_VERSION) + struct.pack("<B", _DTYPE_CODES[token_dtype]))
        f.write(struct.pack("<QQ", n, n + 1))
        for a in range(0, n, CHUNK_ROWS):
            f.write(np.ascontiguousarray(lengths[a:a + CHUNK_ROWS], dtype="<i4").tobytes())
        start = 0
        for a in range(0, n, CHUNK_ROWS):
            nbytes = lengths[a:a + CHUNK_ROWS].astype(np.int64) * itemsize
            ends = start + np.cumsum(nbytes)
            f.write((ends - nbytes).astype("<i8").tobytes())
            start = int(ends[-1])
        for a in range(0, n + 1, CHUNK_ROWS):
            f.write(np.arange(a, min(n + 1, a + CHUNK_ROWS), dtype="<i8").tobytes())


def materialize(rows: np.ndarray, shards: list[Shard], prefix: str, selection_meta: dict,
                num_threads: int = 0) -> dict:
    """Writes PREFIX.bin/.idx/.domains.npy/.meta.json holding the blend's instances, in
    blend order; returns the dataset meta."""
    token_dtype = check_materializable(shards)
    itemsize = token_dtype.itemsize
    names, maps = domain_table(shards)
    tok = shards[0].meta.get("tokenizer") or {}
    eod = tok.get("eod_id")
    k = int(rows.shape[0])
    final = {ext: prefix + ext for ext in (".bin", ".idx", ".domains.npy", ".meta.json")}
    tmp = {ext: temp_name(path) for ext, path in final.items()}
    try:
        lengths = np.empty(k, dtype=np.int32)
        domains_out = np.empty(k, dtype=np.int32)
        stats = {name: np.zeros(len(names), dtype=np.int64) for name in ("documents", "instances", "tokens")}
        sources = [s.data for s in shards]
        shard_domains = [s.domains() for s in shards]
        with open(tmp[".bin"], "wb") as fbin:
            for a in range(0, k, CHUNK_ROWS):
                chunk = np.asarray(rows[a:a + CHUNK_ROWS])
                sh, loc = np.ascontiguousarray(chunk[:, 0]), chunk[:, 1]
                offset = np.empty(len(chunk), dtype=np.int64)
                length = np.empty(len(chunk), dtype=np.int64)
                dom = np.empty(len(chunk), dtype=np.int64)
                for s in np.unique(sh):
                    m = sh == s
                    idx = loc[m]
                    offset[m] = shards[s].index.pointers[idx]
                    length[m] = shards[s].index.lengths[idx]
                    dom[m] = maps[s][np.asarray(shard_domains[s][idx])]
                nbytes = length * itemsize
                buf = np.empty(int(nbytes.sum()), dtype=np.uint8)
                _cpp.gather_bytes(sources, sh, offset, nbytes, buf, num_threads=num_threads)
                fbin.write(memoryview(buf))
                lengths[a:a + len(chunk)] = length
                domains_out[a:a + len(chunk)] = dom
                stats["instances"] += np.bincount(dom, minlength=len(names))
                stats["tokens"] += np.bincount(dom, weights=length, minlength=len(names)).astype(np.int64)
                if eod is not None:
                    is_eod = np.concatenate([[0], np.cumsum(buf.view(token_dtype) == eod)])
                    ends = np.cumsum(length)
                    docs = is_eod[ends] - is_eod[ends - length]
                    stats["documents"] += np.bincount(dom, weights=docs, minlength=len(names)).astype(np.int64)
        _write_index(tmp[".idx"], token_dtype, lengths)
        with open(tmp[".domains.npy"], "wb") as f:
            np.save(f, domains_out)
        inputs = [x for s in shards for x in (s.meta.get("inputs") or [])]
        meta = {k2: v for k2, v in shards[0].meta.items() if k2 not in _OWN_KEYS}
        meta.update({
            "fingerprint": file_sha256(tmp[".idx"]),
            "num_instances": k,
            "num_tokens": int(lengths.sum(dtype=np.int64)),
            "num_documents": int(stats["documents"].sum()) if eod is not None else k,
            "domains": names,
            "domain_stats": {n: {key: int(stats[key][i]) for key in ("documents", "instances", "tokens")}
                             for i, n in enumerate(names)},
            "inputs": inputs,
            "skipped": {},
            "selection": selection_meta,
        })
        if os.path.exists(final[".meta.json"]):
            os.remove(final[".meta.json"])
        for ext in (".bin", ".idx", ".domains.npy"):
            publish(tmp[ext], final[ext])
        write_json_atomic(final[".meta.json"], meta)
        return meta
    finally:
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
