"""The refined corpus as text: a sampled blend decoded into JSONL or Parquet, for any trainer.

MiniPLM's selection is useful beyond this project's trainer (the official release
publishes its refined Pile), and its "KD across model families" trains students with
another tokenizer on the selected text. Each selected instance is split at its EOD
tokens into document pieces (an instance packs the tail of one document, whole
documents and the head of another), each piece is decoded with the dataset's own
tokenizer and becomes one record, in blend order:

    {"text": ..., "meta": {"pile_set_name": DOMAIN, "blend_row": J, "piece": K,
                           "teacher_nll": ..., "reference_nll": ..., "difference_score": ...}}

(NLLs are mean nats per counted token of the whole instance, as the selection used them;
a score the blend does not reference is null). A piece that starts or ends inside a
document is decoded with the tokens on the other side of the cut (selection/neighbours.py),
so that, for a lossless tokenizer, the records of a document's pieces joined in order are
the document's text exactly: a character cut by an instance edge goes whole to the piece
holding its last byte, a word's leading space stays with its word (a sentencepiece decoder
drops it at the start of a text), and a piece never holds U+FFFD that its document does not.
The output is valid input to tools/preprocess_data.py: with another tokenizer it is a
student corpus of another model family. Each piece becomes a document of its own there,
so a document cut by an instance edge is as many documents. With the same tokenizer a record
encodes back to its piece's tokens where the piece is a whole document; a piece cut out of
one may tokenize differently (a word cut in two, a leading space).

Files appear whole or not at all (temporary name, renamed when complete). With a shard
size, every finished shard is recorded in OUTPUT.export.json, and a rerun with the same
blend and settings continues after the last finished shard.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from megatron_miniplm.atomic_io import close_quietly, disk_space, publish, remove_quietly, temp_name, write_json_atomic
from megatron_miniplm.selection.neighbours import Neighbours, edge_texts
from megatron_miniplm.settings import setting
from megatron_miniplm.errors import UserError

FORMATS = {".jsonl": "jsonl", ".jsonl.gz": "jsonl.gz", ".jsonl.zst": "jsonl.zst", ".parquet": "parquet"}
STATE_VERSION = 1


class ExportError(UserError, ValueError):
    """An export that cannot run: the message names the file and the reason."""


@dataclass(frozen=True)
class ExportConfig:
    blend: str = setting(metavar="BLEND_PREFIX", group="input",
                         help="a sampled blend written by tools/difference_sample.py")
    output: str = setting(metavar="FILE", group="output",
                          help="FILE.jsonl, .jsonl.gz, .jsonl.zst or .parquet; with --shard-size-mb, shards "
                               "FILE_00000.<ext>, FILE_00001.<ext>, ... (FILE without its extension)")
    shard_size_mb: float = setting(0.0, group="output",
                                   help="start a new shard after this many MB of text (0: one file)")
    batch_size: int = setting(512, group="runtime", help="instances decoded per batch")
    progress: bool = setting(True, group="runtime", flag="--no-progress", help="no progress bar")

    def format(self) -> str:
        for suffix, fmt in sorted(FORMATS.items(), key=lambda kv: -len(kv[0])):
            if self.output.endswith(suffix):
                return fmt
        raise ExportError(f"{self.output}: unsupported output type (expected {', '.join(FORMATS)})")

    def shard_path(self, k: Optional[int]) -> str:
        """The path of shard k (None: the single output file)."""
        if k is None:
            return self.output
        suffix = next(s for s, f in FORMATS.items() if f == self.format())
        return f"{self.output[:-len(suffix)]}_{k:05d}{suffix}"

    def state_path(self) -> str:
        return self.output + ".export.json"


@dataclass
class ExportSummary:
    files: list
    records: int
    instances: int
    text_bytes: int
    tokens: int
    seconds: float
    resumed_from_row: int = 0

    def describe(self) -> str:
        mb = self.text_bytes / 1e6
        return (f"exported {self.instances:,} instances as {self.records:,} records, {mb:,.1f} MB of text, "
                f"{self.tokens:,} tokens, in {len(self.files)} file(s) ({self.seconds:.1f} s, "
                f"{mb / max(self.seconds, 1e-9):.1f} MB/s)"
                + (f"; resumed at blend row {self.resumed_from_row:,}" if self.resumed_from_row else ""))


class _Source:
    """The blend's instances with their domain, scores and the dataset's tokenizer."""

    def __init__(self, blend: str):
        from megatron_miniplm.data.tokenizer import file_sha256, load_tokenizer
        from megatron_miniplm.selection.blend import BlendError, BlendReader
        from megatron_miniplm.selection.shards import domain_table, open_shards

        try:
            self.reader = BlendReader(blend, verify=True)
        except (BlendError, FileNotFoundError) as e:
            raise ExportError(str(e)) from None
        self.meta = self.reader.meta
        shards = open_shards(self.reader.prefixes)
        self.shards = shards
        names, maps = domain_table(shards)
        self.domain_names = names
        self.domains = [s.mapped_domains(m) for s, m in zip(shards, maps)]
        tok = self.meta.get("tokenizer") or shards[0].meta.get("tokenizer") or {}
        path = tok.get("path")
        if not path or not os.path.exists(path):
            raise ExportError(f"{blend}.meta.json: the dataset's tokenizer {path!r} is not available; "
                              "the instances cannot be decoded")
        if tok.get("sha256") and os.path.isfile(path) and file_sha256(path) != tok["sha256"]:
            raise ExportError(f"{path}: differs from the tokenizer the dataset was made with (sha256 "
                              f"{tok['sha256'][:16]}...)")
        self.tokenizer = load_tokenizer(path, tok.get("eod_token"))
        self.eod = int(tok.get("eod_id", self.tokenizer.eod_id))
        self.neighbours = Neighbours(shards, self.eod)
        self.nll = {role: self._nll(blend, role) for role in ("teacher", "reference")}

    def _nll(self, blend: str, role: str) -> Optional[list]:
        """Per shard: mean NLL per counted token of each instance (NaN where nothing counts)."""
        from megatron_miniplm.scoring.score_file import ScoreFileError, load_scores

        entries = (self.meta.get("scores") or {}).get(role)
        if not entries:
            return None
        base = os.path.dirname(blend)
        out = []
        for e in entries:
            prefix = e["prefix"] if os.path.isabs(e["prefix"]) else os.path.join(base, e["prefix"])
            try:
                scores, _ = load_scores(prefix)
            except ScoreFileError as err:
                raise ExportError(f"{blend}.meta.json references {role} scores that cannot be read: {err}") from None
            with np.errstate(invalid="ignore", divide="ignore"):
                out.append(np.where(scores[:, 1] > 0, scores[:, 0] / np.maximum(scores[:, 1], 1), np.nan))
        return out

    def __len__(self) -> int:
        return len(self.reader)

    def records(self, lo: int, hi: int) -> tuple[list[dict], int]:
        """The records of blend rows [lo, hi) and how many tokens their pieces hold."""
        pieces, lefts, rights, metas = [], [], [], []
        for j in range(lo, hi):
            s, i = (int(v) for v in self.reader.rows[j])
            tokens = self.reader[j]
            cuts = np.flatnonzero(tokens == self.eod)
            starts = np.concatenate([[0], cuts + 1])
            ends = np.concatenate([cuts, [len(tokens)]])
            scores = {f"{role}_nll": _float(v[s][i]) if v is not None else None for role, v in self.nll.items()}
            t, r = scores["teacher_nll"], scores["reference_nll"]
            scores["difference_score"] = r - t if t is not None and r is not None else None
            left, right = self.neighbours.around(s, i, tokens)
            k = 0
            for a, b in zip(starts, ends):
                if b > a:
                    pieces.append(tokens[a:b])
                    lefts.append(left if a == 0 else None)
                    rights.append(right if b == len(tokens) else None)
                    metas.append({"pile_set_name": self.domain_names[int(self.domains[s][i])], "blend_row": j,
                                  "piece": k, **scores})
                    k += 1
        texts = edge_texts(self.tokenizer.decode_batch, pieces, lefts, rights) if pieces else []
        return [{"text": t, "meta": m} for t, m in zip(texts, metas)], int(sum(len(p) for p in pieces))


def _float(x) -> Optional[float]:
    x = float(x)
    return x if np.isfinite(x) else None


class _Shard:
    """One output file under a temporary name: ``close`` publishes it, ``abort`` removes it."""

    def __init__(self, path: str):
        self.path, self.tmp = path, temp_name(path)

    def _finish_writing(self) -> None:
        raise NotImplementedError

    def write(self, records: list[dict]) -> None:
        with disk_space(self.path):
            self._write(records)

    def close(self) -> None:
        with disk_space(self.path):
            self._finish_writing()
        publish(self.tmp, self.path)

    def abort(self) -> None:
        """Remove the file; its last bytes may fail to reach a full disk, which no longer matters."""
        try:
            self._finish_writing()
        except OSError:
            pass
        finally:
            remove_quietly(self.tmp)


class _JsonlShard(_Shard):
    def __init__(self, path: str, fmt: str):
        super().__init__(path)
        raw = open(self.tmp, "wb")
        try:  # gzip writes its header at once
            if fmt == "jsonl.gz":  # the header names the final file, not the temporary one: same bytes every run
                self._raw, self.f = raw, gzip.GzipFile(os.path.basename(path), "wb", fileobj=raw, mtime=0)
            elif fmt == "jsonl.zst":
                import zstandard

                self._raw, self.f = raw, zstandard.ZstdCompressor(level=3).stream_writer(raw)
            else:
                self._raw, self.f = None, raw
        except BaseException:
            close_quietly(raw)
            remove_quietly(self.tmp)
            raise

    def _write(self, records: list[dict]) -> None:
        self.f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))

    def _finish_writing(self) -> None:
        try:
            self.f.close()
        finally:
            if self._raw is not None and not self._raw.closed:
                self._raw.close()


class _ParquetShard(_Shard):
    def __init__(self, path: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        super().__init__(path)
        self.pa = pa
        self.schema = pa.schema([("text", pa.string()), ("meta", pa.struct([
            ("pile_set_name", pa.string()), ("blend_row", pa.int64()), ("piece", pa.int32()),
            ("teacher_nll", pa.float64()), ("reference_nll", pa.float64()), ("difference_score", pa.float64())]))])
        self.writer = pq.ParquetWriter(self.tmp, self.schema, compression="zstd")

    def _write(self, records: list[dict]) -> None:
        pa, meta_type = self.pa, self.schema.field("meta").type
        metas = [r["meta"] for r in records]
        meta = pa.StructArray.from_arrays(
            [pa.array([m[f.name] for m in metas], type=f.type) for f in meta_type], fields=list(meta_type))
        self.writer.write_table(pa.Table.from_arrays([pa.array([r["text"] for r in records], pa.string()), meta],
                                                     schema=self.schema))

    def _finish_writing(self) -> None:
        self.writer.close()


def _open_shard(path: str, fmt: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with disk_space(path):
        return _ParquetShard(path) if fmt == "parquet" else _JsonlShard(path, fmt)


def _fingerprint(config: ExportConfig, meta: dict) -> str:
    what = {"blend": meta, "output": os.path.abspath(config.output), "shard_size_mb": config.shard_size_mb}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _load_state(config: ExportConfig, fingerprint: str) -> Optional[dict]:
    """The record of a previous run of this very export, or None (then its shards are stale)."""
    path = config.state_path()
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    if state.get("version") != STATE_VERSION or state.get("fingerprint") != fingerprint:
        for shard in state.get("shards", []) if isinstance(state, dict) else []:
            if os.path.exists(shard.get("path", "")):
                os.remove(shard["path"])
        return None
    if not all(os.path.exists(s["path"]) for s in state["shards"]):
        return None
    return state


def export_selection(config: ExportConfig) -> ExportSummary:
    """Decode the blend into the output file(s); resumes a sharded export after its last
    finished shard."""
    fmt = config.format()
    if config.batch_size < 1 or config.shard_size_mb < 0:
        raise ExportError("batch_size must be >= 1 and shard_size_mb >= 0")
    start = time.perf_counter()
    source = _Source(config.blend)
    fingerprint = _fingerprint(config, source.meta)
    state = _load_state(config, fingerprint) or {"version": STATE_VERSION, "fingerprint": fingerprint,
                                                 "blend": os.path.abspath(config.blend), "shards": [],
                                                 "complete": False}
    done = state["shards"]
    if state["complete"]:
        return _summary(state, start, len(source), resumed=len(source))
    sharded = config.shard_size_mb > 0
    limit = config.shard_size_mb * 1e6
    row = done[-1]["rows"][1] if done else 0
    resumed = row
    bar = _bar(len(source), row, config.progress)
    shard, current = None, None
    try:
        for lo in range(row, len(source), config.batch_size):
            hi = min(len(source), lo + config.batch_size)
            records, tokens = source.records(lo, hi)
            if shard is None:
                k = len(done) if sharded else None
                shard = _open_shard(config.shard_path(k), fmt)
                current = {"path": config.shard_path(k), "rows": [lo, lo], "records": 0, "text_bytes": 0,
                           "tokens": 0}
            shard.write(records)
            current["text_bytes"] += sum(len(r["text"].encode("utf-8")) for r in records)
            current["records"] += len(records)
            current["tokens"] += tokens
            current["rows"][1] = hi
            bar.update(hi - lo)
            if sharded and current["text_bytes"] >= limit:
                shard.close()
                done.append(current)
                write_json_atomic(config.state_path(), state)
                shard, current = None, None
        if shard is not None:
            shard.close()
            done.append(current)
            shard = None
    except BaseException:
        if shard is not None:
            shard.abort()
        raise
    finally:
        bar.close()
    state["complete"] = True
    state["summary"] = {"records": sum(s["records"] for s in done), "instances": len(source),
                        "text_bytes": sum(s["text_bytes"] for s in done), "tokens": sum(s["tokens"] for s in done),
                        "format": fmt, "domains": source.domain_names}
    write_json_atomic(config.state_path(), state)
    return _summary(state, start, len(source), resumed=resumed)


def _summary(state: dict, start: float, instances: int, resumed: int) -> ExportSummary:
    done = state["shards"]
    return ExportSummary(files=[s["path"] for s in done], records=sum(s["records"] for s in done),
                         instances=instances, text_bytes=sum(s["text_bytes"] for s in done),
                         tokens=sum(s["tokens"] for s in done), seconds=time.perf_counter() - start,
                         resumed_from_row=resumed)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="inst", desc="export", dynamic_ncols=True)


def iter_records(path: str) -> Iterator[dict]:
    """The records of an exported file (any of the formats), in order: for checks and tests."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        for i in range(pf.num_row_groups):
            yield from pf.read_row_group(i).to_pylist()
        return
    if path.endswith(".gz"):
        f = gzip.open(path, "rt", encoding="utf-8")
    elif path.endswith(".zst"):
        import io

        import zstandard

        f = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8")
    else:
        f = open(path, encoding="utf-8")
    with f:
        for line in f:
            yield json.loads(line)

