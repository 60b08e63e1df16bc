#!/usr/bin/env python
"""Fuzzed input for tools/preprocess_data.py: a seeded number of cases, each a small JSONL,
.jsonl.gz or Parquet input damaged in a few ways (truncation, invalid UTF-8, broken JSON,
wrong types, missing keys or columns, empty text, huge lines, NUL bytes, deep nesting, huge
numbers, empty files, flipped bytes), preprocessed under --on-error skip and, where the
input has a bad record, under --on-error fail.

Every case must either complete, with the kept documents, the skipped records by reason
and the lines (rows) read that an independent reading of the input predicts (Python's json
module line by line; for Parquet, the values the case wrote), or stop with one error line
naming the file and the line (`path:N: reason: ...`) or row (`path: row N: reason: ...`).
Never a traceback, and never an output file left behind by a run that stopped (a later run
could take it for a finished one); a run that completes leaves exactly its four files.
Inputs damaged below the record level (a cut .gz, flipped Parquet bytes) cannot be
predicted record by record: for them any completion with consistent counts, or a one-line
stop naming the file and where, is right.

Most cases run the tool's `main` in this process (fast); every --tool-every'th runs
`python tools/preprocess_data.py` as a subprocess, which shows what a user sees.

    python benchmarks/fuzz_inputs.py [--cases 400] [--seed 0] [--tool-every 25]

Prints the cases tried, the outcomes by kind and each failure; exit status 1 on any failure.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
from collections import Counter
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the of and to in is was model data token corpus teacher student café naïve 数据 über".split()
DOMAINS = ("Pile-CC", "Github", "ArXiv")
TEXT, DOMAIN = ("text",), ("meta", "pile_set_name")
OUTPUT_SUFFIXES = (".bin", ".idx", ".domains.npy", ".meta.json")


# ---- inputs ---------------------------------------------------------------------------------
def make_text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) + rng.choice([".", "!", "\n", ""])


def make_record(rng: random.Random) -> dict:
    return {"text": make_text(rng), "meta": {"pile_set_name": rng.choice(DOMAINS)}, "id": rng.randint(0, 999)}


def _record_line(rng: random.Random, **changes) -> bytes:
    rec = make_record(rng)
    for key, value in changes.items():
        if key == "meta" and value is _DROP:
            del rec["meta"]
        elif key == "text" and value is _DROP:
            del rec["text"]
        elif key == "domain":
            rec["meta"]["pile_set_name"] = value
        else:
            rec[key] = value
    return json.dumps(rec, ensure_ascii=rng.random() < 0.5).encode("utf-8")


_DROP = object()


def _insert(line: bytes, rng: random.Random, what: bytes) -> bytes:
    at = rng.randint(0, len(line))
    return line[:at] + what + line[at:]


# Each takes a good line and returns the line(s) that replace it.
LINE_MUTATIONS = {
    "invalid_utf8": lambda line, rng: [_insert(line, rng, bytes([rng.choice([0x80, 0xC3, 0xE9, 0xFF])]))],
    "broken_json": lambda line, rng: [line[: rng.randint(0, len(line) - 1)] + rng.choice([b"", b"}", b",", b'"'])],
    "wrong_type": lambda line, rng: [_record_line(rng, text=rng.choice([3, None, ["x"], {"a": "b"}, True, 1.5]))],
    "wrong_domain_type": lambda line, rng: [_record_line(rng, domain=rng.choice([7, None, ["x"]]))],
    "meta_not_object": lambda line, rng: [_record_line(rng, meta=rng.choice(["Github", 1, None, []]))],
    "missing_text": lambda line, rng: [_record_line(rng, text=_DROP)],
    "missing_meta": lambda line, rng: [_record_line(rng, meta=_DROP)],
    "empty_text": lambda line, rng: [_record_line(rng, text="")],
    "not_an_object": lambda line, rng: [rng.choice([b"[1, 2]", b'"text"', b"42", b"null", b"true"])],
    "nul_bytes": lambda line, rng: [rng.choice([_insert(line, rng, b"\0"), b"\0" * rng.randint(1, 9), line + b"\0"])],
    "escaped_nul": lambda line, rng: [_record_line(rng, text="a\u0000b")],
    "blank_line": lambda line, rng: [line, rng.choice([b"", b"   ", b"\t"])],
    "crlf": lambda line, rng: [line + b"\r"],
    "lone_surrogate": lambda line, rng: [b'{"text": "x\\ud800y", "meta": {"pile_set_name": "Github"}}'],
    "huge_line": lambda line, rng: [_record_line(rng, text=" ".join(rng.choice(WORDS) for _ in range(60_000)))],
    "deep_nesting": lambda line, rng: [b'{"text": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"],
    "deep_nesting_line": lambda line, rng: [b"{\"a\": " * 50_000 + b"1" + b"}" * 50_000],
    "huge_integer": lambda line, rng: [b'{"text": "a", "meta": {"pile_set_name": "Github"}, "n": ' + b"7" * 5000 + b"}"],
    "huge_float": lambda line, rng: [b'{"text": "a", "meta": {"pile_set_name": "Github"}, "n": 1e999999}'],
    "bom": lambda line, rng: [b"\xef\xbb\xbf" + line],
    "duplicate_key": lambda line, rng: [b'{"text": 1, "text": "ok", "meta": {"pile_set_name": "Github"}}'],
}
# Mutations of the whole file's bytes, after the lines.
FILE_MUTATIONS = ("truncate", "empty", "no_final_newline", "none")
FILE_WEIGHTS = (3, 1, 2, 6)


@dataclass
class Case:
    index: int
    kind: str  # jsonl, gzip, parquet
    path: str
    mutations: list[str]
    expected: "Expected | None"  # None: damaged below the record level, not predictable
    workers: int = 1
    block_bytes: int = 1 << 20
    tool: bool = False


@dataclass
class Expected:
    lines: int
    kept: int
    skipped: Counter
    first_bad: tuple[int, str] | None  # (line or row, reason) of the first bad record


def classify_line(raw: bytes) -> str | None:
    """Why a JSONL line is refused (a SkipReason's value), or None: the reference the reader
    is checked against, written from the format's rules, not from the reader."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_utf8"
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return "invalid_json"
    if not isinstance(obj, dict):
        return "not_an_object"
    values = []
    for key in (TEXT, DOMAIN):
        value = obj
        for part in key:
            if not isinstance(value, dict) or part not in value:
                return "missing_key"
            value = value[part]
        if not isinstance(value, str):
            return "not_a_string"
        values.append(value)
    if not values[0]:
        return "empty_text"
    try:
        "".join(values).encode("utf-8")
    except UnicodeEncodeError:
        return "invalid_utf8"
    return None


def expect_lines(data: bytes) -> Expected:
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    skipped, first_bad = Counter(), None
    for n, raw in enumerate(lines, start=1):
        reason = classify_line(raw)
        if reason is not None:
            skipped[reason] += 1
            first_bad = first_bad or (n, reason)
    return Expected(len(lines), len(lines) - sum(skipped.values()), skipped, first_bad)


def jsonl_bytes(rng: random.Random, mutations: list[str]) -> bytes:
    lines = [_record_line(rng) for _ in range(rng.randint(1, 12))]
    for name in mutations:
        if name in LINE_MUTATIONS:
            at = rng.randrange(len(lines))
            lines[at:at + 1] = LINE_MUTATIONS[name](lines[at], rng)
    data = b"\n".join(lines) + b"\n"
    if "truncate" in mutations:
        data = data[: rng.randint(0, len(data) - 1)]
    elif "empty" in mutations:
        data = b""
    elif "no_final_newline" in mutations:
        data = data[:-1]
    return data


def make_jsonl_case(index: int, rng: random.Random, root: str) -> Case:
    mutations = rng.sample(sorted(LINE_MUTATIONS), rng.randint(0, 3)) + rng.choices(FILE_MUTATIONS, FILE_WEIGHTS)
    data = jsonl_bytes(rng, mutations)
    kind = "gzip" if rng.random() < 0.15 else "jsonl"
    expected = expect_lines(data)
    if kind == "gzip":
        data = gzip.compress(data)
        if rng.random() < 0.6 and data:  # damage the stream itself
            how = rng.choice(["cut", "flip"])
            mutations.append(f"gzip_{how}")
            if how == "cut":
                data = data[: rng.randint(0, len(data) - 1)]
            else:
                at = rng.randrange(len(data))
                data = data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1:]
            expected = None
    path = os.path.join(root, f"case{index:05d}.jsonl" + (".gz" if kind == "gzip" else ""))
    with open(path, "wb") as f:
        f.write(data)
    return Case(index, kind, path, mutations, expected)


# ---- Parquet ---------------------------------------------------------------------------------
ROW_MUTATIONS = ("null_text", "empty_text", "invalid_utf8", "null_meta", "null_domain", "nul_in_text", "huge_text")
COLUMN_MUTATIONS = ("text_int_column", "no_text_column", "no_meta_column", "domain_int_field")
BYTE_MUTATIONS = ("truncate", "flip", "empty", "zero_rows")


def parquet_rows(rng: random.Random, mutations: list[str]) -> tuple[list, list]:
    """The rows' texts (str; bytes where not UTF-8; None for null) and metas (dict or None)."""
    n = rng.randint(1, 30)
    texts = [make_text(rng) for _ in range(n)]
    metas = [{"pile_set_name": rng.choice(DOMAINS)} for _ in range(n)]
    for name in mutations:
        at = rng.randrange(n)
        if name == "null_text":
            texts[at] = None
        elif name == "empty_text":
            texts[at] = ""
        elif name == "invalid_utf8":
            texts[at] = b"caf\xe9 " + make_text(rng).encode()
        elif name == "null_meta":
            metas[at] = None
        elif name == "null_domain":
            metas[at] = {"pile_set_name": None}
        elif name == "nul_in_text":
            texts[at] = make_text(rng) + "\0" + make_text(rng)
        elif name == "huge_text":
            texts[at] = " ".join(rng.choice(WORDS) for _ in range(60_000))
    return texts, metas


def row_reason(text, meta, column: str | None) -> str | None:
    """Why a row is refused, in the documented order: the text's problem, the domain's, then
    empty text (`column`: a mutation of a whole column, or None)."""
    if column in ("text_int_column", "no_text_column"):
        return "not_a_string" if column == "text_int_column" else "missing_key"
    if text is None or isinstance(text, bytes):
        return "not_a_string" if text is None else "invalid_utf8"
    if column in ("no_meta_column", "domain_int_field"):
        return "missing_key" if column == "no_meta_column" else "not_a_string"
    if meta is None or meta["pile_set_name"] is None:
        return "missing_key" if meta is None else "not_a_string"
    return "empty_text" if text == "" else None


def expect_rows(texts: list, metas: list, column: str | None) -> Expected:
    skipped, first_bad = Counter(), None
    for row, (text, meta) in enumerate(zip(texts, metas), start=1):
        reason = row_reason(text, meta, column)
        if reason is not None:
            skipped[reason] += 1
            first_bad = first_bad or (row, reason)
    return Expected(len(texts), len(texts) - sum(skipped.values()), skipped, first_bad)


def parquet_table(texts: list, metas: list, column: str | None):
    import pyarrow as pa

    raw = [t.encode() if isinstance(t, str) else t for t in texts]
    text = pa.array(raw, type=pa.binary()).view(pa.string())  # no UTF-8 check, as a foreign writer's
    meta = pa.array(metas, type=pa.struct([("pile_set_name", pa.string())]))
    if column == "text_int_column":
        text = pa.array(list(range(len(texts))), type=pa.int64())
    if column == "domain_int_field":
        meta = pa.array([{"pile_set_name": i} for i in range(len(texts))], type=pa.struct([("pile_set_name", pa.int32())]))
    names, arrays = [], []
    if column != "no_text_column":
        names, arrays = ["text"], [text]
    if column != "no_meta_column":
        names, arrays = names + ["meta"], arrays + [meta]
    names, arrays = names + ["id"], arrays + [pa.array(range(len(texts)), type=pa.int64())]
    return pa.Table.from_arrays(arrays, names=names)


def make_parquet_case(index: int, rng: random.Random, root: str) -> Case:
    import pyarrow.parquet as pq

    mutations = [rng.choice(ROW_MUTATIONS) for _ in range(rng.randint(0, 3))]
    texts, metas = parquet_rows(rng, mutations)
    column = rng.choice(COLUMN_MUTATIONS) if rng.random() < 0.2 else None
    expected = expect_rows(texts, metas, column)
    table = parquet_table(texts, metas, column)
    mutations += [column] if column else []
    if rng.random() < 0.25:
        mutations.append(rng.choice(BYTE_MUTATIONS))
    if "zero_rows" in mutations:
        table, expected = table.slice(0, 0), Expected(0, 0, Counter(), None)
    path = os.path.join(root, f"case{index:05d}.parquet")
    pq.write_table(table, path, row_group_size=rng.choice([1, 3, 7, 1000]))
    damage_file(path, rng, mutations)
    if {"truncate", "flip", "empty"} & set(mutations):
        expected = None
    return Case(index, "parquet", path, mutations, expected)


def damage_file(path: str, rng: random.Random, mutations: list[str]) -> None:
    with open(path, "rb") as f:
        data = f.read()
    if "truncate" in mutations:
        data = data[: rng.randint(0, len(data) - 1)]
    elif "flip" in mutations:
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            data = data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1:]
    elif "empty" in mutations:
        data = b""
    with open(path, "wb") as f:
        f.write(data)


# ---- running and judging ---------------------------------------------------------------------
@dataclass
class Outcome:
    kind: str  # completed, stopped, or a failure: traceback, wrong_counts, wrong_error, left_output ...
    detail: str = ""
    failures: list = field(default_factory=list)


def argv_of(case: Case, prefix: str, tokenizer: str, on_error: str) -> list[str]:
    return ["--input", case.path, "--output-prefix", prefix, "--tokenizer", tokenizer, "--on-error", on_error,
            "--instance-mode", "document", "--seq-length", "64", "--workers", str(case.workers),
            "--block-bytes", str(case.block_bytes), "--no-progress", "--log-skipped", "0"]


def run_in_process(argv: list[str]) -> tuple[int | None, str]:
    """(exit status, stderr) of the tool's main; status None and the traceback if it raised."""
    from megatron_miniplm.cli.preprocess_data import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            return main(argv), err.getvalue()
        except BaseException:  # a bug's exception, or SystemExit from argparse: both are findings
            return None, err.getvalue() + traceback.format_exc()


def run_tool(argv: list[str]) -> tuple[int | None, str]:
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), *argv],
                       capture_output=True, text=True, env=env, timeout=600)
    return (None if "Traceback" in r.stderr else r.returncode), r.stderr


def error_line(stderr: str) -> str | None:
    """The tool's one error line, or None if stderr holds anything else that is not a log line."""
    lines = [ln for ln in stderr.splitlines() if ln and not ln.startswith(("INFO:", "WARNING:"))]
    return lines[0] if len(lines) == 1 and ": error: " in lines[0] else None


def left_files(out_dir: str) -> list[str]:
    return sorted(os.listdir(out_dir))


def judge(case: Case, on_error: str, status: int | None, stderr: str, out_dir: str, prefix: str) -> Outcome:
    files = left_files(out_dir)
    if status is None:
        return Outcome("traceback", stderr.strip().splitlines()[-1] if stderr.strip() else "no output")
    if status == 0:
        want = sorted(os.path.basename(prefix) + s for s in OUTPUT_SUFFIXES)
        if files != want:
            return Outcome("wrong_output_files", f"{files}")
        return check_completed(case, on_error, prefix)
    line = error_line(stderr)
    if status != 1 or line is None:
        return Outcome("not_one_line", f"status {status}: {stderr.strip()[-300:]!r}")
    if files:
        return Outcome("left_output", f"{files} after: {line}")
    return check_stopped(case, on_error, line)


def check_completed(case: Case, on_error: str, prefix: str) -> Outcome:
    from megatron_miniplm.data.indexed_dataset import IndexedDatasetReader

    with open(prefix + ".meta.json", encoding="utf-8") as f:
        meta = json.load(f)
    skipped = Counter({k: v for k, v in meta["skipped"].items() if v})
    got = (meta["num_documents"], skipped, meta["inputs"][0]["lines"])
    if len(IndexedDatasetReader(prefix)) != meta["num_documents"]:
        return Outcome("wrong_counts", "the dataset's instances differ from its meta's documents")
    exp = case.expected
    if exp is None:
        if on_error == "fail" and skipped:
            return Outcome("wrong_counts", f"completed under --on-error fail with skips {dict(skipped)}")
        if meta["num_documents"] + sum(skipped.values()) > meta["inputs"][0]["lines"] + 1:
            return Outcome("wrong_counts", f"documents + skipped > lines: {got}")
        return Outcome("completed")
    if on_error == "fail" and exp.first_bad is not None:
        return Outcome("wrong_counts", f"completed under --on-error fail; first bad record {exp.first_bad}")
    if got != (exp.kept, exp.skipped, exp.lines):
        return Outcome("wrong_counts", f"got documents/skipped/lines {got}, expected {(exp.kept, exp.skipped, exp.lines)}")
    return Outcome("completed")


STOP_RE = re.compile(r": error: (?P<path>.+?)(?::(?P<line>\d+)|: row (?P<row>\d+)): (?P<reason>[a-z_0-9]+): ")


def check_stopped(case: Case, on_error: str, line: str) -> Outcome:
    if "no usable documents in " + case.path in line:
        exp = case.expected
        if exp is not None and (exp.kept or (on_error == "fail" and exp.first_bad)):
            return Outcome("wrong_error", line)
        return Outcome("stopped", "no usable documents")
    m = STOP_RE.search(line)
    if m is None or m["path"] != case.path:
        return Outcome("wrong_error", line)
    where, reason = int(m["line"] or m["row"]), m["reason"]
    exp = case.expected
    if exp is not None:
        if on_error == "skip" or exp.first_bad != (where, reason):
            return Outcome("wrong_error", f"{line} (expected {exp.first_bad} under --on-error {on_error})")
    elif on_error == "skip" and reason not in ("truncated_input", "corrupt_input"):
        return Outcome("wrong_error", line)
    return Outcome("stopped", reason)


def run_case(case: Case, tokenizer: str, work: str) -> list[Outcome]:
    """Under --on-error skip, then under fail where a record is bad (or may be)."""
    policies = ["skip"]
    if case.expected is None or case.expected.first_bad is not None:
        policies.append("fail")
    outcomes = []
    for on_error in policies:
        out_dir = os.path.join(work, f"out{case.index:05d}{on_error}")
        os.makedirs(out_dir)
        prefix = os.path.join(out_dir, "ds")
        argv = argv_of(case, prefix, tokenizer, on_error)
        status, stderr = (run_tool if case.tool else run_in_process)(argv)
        outcome = judge(case, on_error, status, stderr, out_dir, prefix)
        outcome.detail = f"--on-error {on_error}: {outcome.detail}"
        outcomes.append(outcome)
        shutil.rmtree(out_dir)
    return outcomes


def train_tokenizer(directory: str, seed: int) -> str:
    """A byte-level BPE with <|endoftext|>, trained here on the fuzzer's words (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(seed)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([make_text(rng) for _ in range(200)], trainer)
    tok.save(os.path.join(directory, "tokenizer.json"))
    return directory


def make_case(index: int, seed: int, root: str, tool_every: int) -> Case:
    rng = random.Random(f"{seed}:{index}")
    case = (make_parquet_case if rng.random() < 0.3 else make_jsonl_case)(index, rng, root)
    case.workers = rng.choice([1, 2])
    case.block_bytes = rng.choice([64, 4096, 1 << 20])
    case.tool = tool_every > 0 and index % tool_every == 0
    return case


def fuzz(cases: int, seed: int, tool_every: int, work: str) -> tuple[Counter, list[str]]:
    """Run the cases in `work`; returns the outcomes by kind and a line per failure."""
    import logging

    logging.disable(logging.WARNING)  # the tools' INFO/WARNING lines: not judged, and slow to print
    tokenizer = train_tokenizer(work, seed)
    counts, failures = Counter(), []
    try:
        for i in range(cases):
            case = make_case(i, seed, work, tool_every)
            for outcome in run_case(case, tokenizer, work):
                label = outcome.kind if outcome.kind not in ("completed", "stopped") else \
                    f"{outcome.kind} ({outcome.detail.split(': ', 1)[1] or 'ok'})" if outcome.kind == "stopped" else "completed"
                counts[label] += 1
                if outcome.kind not in ("completed", "stopped"):
                    failures.append(f"case {i} {case.kind} {'+'.join(case.mutations)}"
                                    f"{' (tool)' if case.tool else ''}: {outcome.kind}: {outcome.detail}")
            os.remove(case.path)
    finally:
        logging.disable(logging.NOTSET)
    return counts, failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tool-every", type=int, default=25, help="every N'th case through the tool's subprocess (0: none)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fuzz_inputs_") as work:
        counts, failures = fuzz(args.cases, args.seed, args.tool_every, work)
    runs = sum(counts.values())
    print(f"cases tried: {args.cases} (seed {args.seed}), runs: {runs}, "
          f"through the tool's subprocess: {len(range(0, args.cases, args.tool_every)) if args.tool_every else 0}")
    for kind, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {n:6d}  {kind}")
    print(f"failures: {len(failures)}")
    for line in failures:
        print("  " + line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
