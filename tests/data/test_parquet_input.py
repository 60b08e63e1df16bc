"""Parquet files and `datasets` directories as inputs: the same dataset as from JSONL,
whatever the row-group size; keys as columns; bad rows and damaged files under both
--on-error policies."""
import hashlib
import json
import os

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from megatron_miniplm.data.blocks import FileDone, ReadFailure, RecordBlock  # noqa: E402
from megatron_miniplm.data.inputs import read_input, resolve_inputs  # noqa: E402
from megatron_miniplm.data.meta import read_dataset_meta  # noqa: E402
from megatron_miniplm.data.records import InputError, SkipReason  # noqa: E402

from .conftest import dataset_files, make_records, read_domains, read_instances, write_jsonl  # noqa: E402

OUTPUTS = (".bin", ".idx", ".domains.npy")


@pytest.fixture(scope="module")
def records():
    return make_records(240, seed=11)


@pytest.fixture(scope="module")
def hf_datasets():
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    return datasets


def write_parquet(path, rows, row_group_size=None, schema=None) -> str:
    """`rows`: dicts, or a pyarrow Table written as it is."""
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, str(path), row_group_size=row_group_size)
    return str(path)


def save_dataset(datasets, path, rows, num_shards=1) -> str:
    datasets.Dataset.from_list(rows).save_to_disk(str(path), num_shards=num_shards)
    return str(path)


def outputs(prefix) -> dict:
    return {ext: open(prefix + ext, "rb").read() for ext in OUTPUTS}


def meta_without_inputs(prefix) -> dict:
    meta = read_dataset_meta(prefix)
    del meta["inputs"]
    return meta


# --------------------------------------------------------------------------- same bytes


def test_jsonl_parquet_and_datasets_give_identical_datasets(tmp_path, run_preprocess, bpe_tokenizer, records,
                                                             hf_datasets):
    jsonl = write_jsonl(str(tmp_path / "in.jsonl"), records)
    _, ref = run_preprocess([jsonl], bpe_tokenizer, name="ref", seq_length=40, block_bytes=3000)
    want = outputs(ref)
    assert len(want[".bin"]) > 10_000 and len(set(read_domains(ref).tolist())) == 4

    inputs = {f"rg{n}": write_parquet(tmp_path / f"rg{n}.parquet", records, row_group_size=n)
              for n in (1, 7, 100, 1000)}
    inputs["ds"] = save_dataset(hf_datasets, tmp_path / "ds", records, num_shards=3)
    for name, path in inputs.items():
        workers = 2 if name in ("rg7", "ds") else 1
        summary, prefix = run_preprocess([path], bpe_tokenizer, name=name, seq_length=40, block_bytes=3000,
                                         workers=workers)
        assert outputs(prefix) == want, name
        assert meta_without_inputs(prefix) == meta_without_inputs(ref), name
        (inp,) = read_dataset_meta(prefix)["inputs"]
        assert inp["lines"] == len(records) and inp["documents"] == len(records) and inp["skipped"] == {}
        assert inp["path"] == os.path.abspath(path)
        assert f"read 1 file(s): {len(records)} rows" in summary.format()
    parquet = inputs["rg7"]
    assert read_dataset_meta(str(tmp_path / "rg7"))["inputs"][0]["sha256"] == \
        hashlib.sha256(open(parquet, "rb").read()).hexdigest()
    # A datasets directory: its data files, hashed in state.json's order.
    state = json.load(open(os.path.join(inputs["ds"], "state.json")))
    data = b"".join(open(os.path.join(inputs["ds"], f["filename"]), "rb").read() for f in state["_data_files"])
    assert len(state["_data_files"]) == 3
    ds_input = read_dataset_meta(str(tmp_path / "ds"))["inputs"][0]
    assert ds_input["sha256"] == hashlib.sha256(data).hexdigest() and ds_input["bytes"] == len(data)


def test_document_mode_from_parquet(tmp_path, run_preprocess, bpe_tokenizer, records):
    """Instance by instance: each row's text, in row order, with its domain."""
    from tokenizers import Tokenizer

    path = write_parquet(tmp_path / "in.parquet", records[:60], row_group_size=9)
    _, prefix = run_preprocess([path], bpe_tokenizer, instance_mode="document")
    tok = Tokenizer.from_file(os.path.join(bpe_tokenizer, "tokenizer.json"))
    tok.encode_special_tokens = True
    eod = tok.token_to_id("<|endoftext|>")
    got = read_instances(prefix)
    assert [g.tolist() for g in got] == [tok.encode(r["text"], add_special_tokens=False).ids + [eod]
                                        for r in records[:60]]
    names = read_dataset_meta(prefix)["domains"]
    assert [names[d] for d in read_domains(prefix)] == [r["meta"]["pile_set_name"] for r in records[:60]]


def test_nested_struct_columns_and_no_domain_key(tmp_path, run_preprocess, bpe_tokenizer, records):
    rows = [{"body": r["text"], "info": {"lang": "en", "source": {"name": r["meta"]["pile_set_name"], "n": i}}}
            for i, r in enumerate(records[:50])]
    path = write_parquet(tmp_path / "in.parquet", rows, row_group_size=8)
    _, prefix = run_preprocess([path], bpe_tokenizer, name="nested", instance_mode="document", json_key="body",
                               domain_key="info.source.name")
    names = read_dataset_meta(prefix)["domains"]
    assert [names[d] for d in read_domains(prefix)] == [r["meta"]["pile_set_name"] for r in records[:50]]
    jsonl = write_jsonl(str(tmp_path / "in.jsonl"), rows)
    _, ref = run_preprocess([jsonl], bpe_tokenizer, name="ref", instance_mode="document", json_key="body",
                            domain_key="info.source.name")
    assert outputs(prefix) == outputs(ref)

    _, single = run_preprocess([path], bpe_tokenizer, name="single", json_key="body", domain_key="")
    meta = read_dataset_meta(single)
    assert meta["domains"] == ["default"] and meta["domain_stats"]["default"]["documents"] == 50


def test_literal_dotted_column_wins_over_the_struct_path(tmp_path, run_preprocess, bpe_tokenizer, records):
    rows = [{"text": r["text"], "meta": {"pile_set_name": "from-struct"}, "meta.pile_set_name": f"literal-{i % 3}"}
            for i, r in enumerate(records[:30])]
    path = write_parquet(tmp_path / "in.parquet", rows, row_group_size=4)
    _, prefix = run_preprocess([path], bpe_tokenizer, name="pq", instance_mode="document")
    meta = read_dataset_meta(prefix)
    assert sorted(meta["domains"]) == ["literal-0", "literal-1", "literal-2"]
    assert [meta["domains"][d] for d in read_domains(prefix)] == [f"literal-{i % 3}" for i in range(30)]
    jsonl = write_jsonl(str(tmp_path / "in.jsonl"), rows)  # the JSONL rule is the same
    _, ref = run_preprocess([jsonl], bpe_tokenizer, name="ref", instance_mode="document")
    assert outputs(prefix) == outputs(ref)


def test_dictionary_and_large_string_columns(tmp_path, run_preprocess, bpe_tokenizer, records):
    """Categorical domains (pandas writes them dictionary-encoded) and large_string text."""
    texts = [r["text"] for r in records[:40]]
    domains = [r["meta"]["pile_set_name"] for r in records[:40]]
    table = pa.table({"text": pa.array(texts, pa.large_string()), "domain": pa.array(domains).dictionary_encode()})
    path = write_parquet(tmp_path / "in.parquet", table, row_group_size=6)
    assert pq.ParquetFile(path).schema_arrow.field("domain").type == pa.dictionary(pa.int32(), pa.string())
    _, prefix = run_preprocess([path], bpe_tokenizer, name="pq", domain_key="domain", seq_length=24)
    jsonl = write_jsonl(str(tmp_path / "in.jsonl"), [{"text": t, "domain": d} for t, d in zip(texts, domains)])
    _, ref = run_preprocess([jsonl], bpe_tokenizer, name="ref", domain_key="domain", seq_length=24)
    assert outputs(prefix) == outputs(ref) and len(read_instances(ref)) > 40


def test_mixed_inputs_in_argument_order(tmp_path, run_preprocess, bpe_tokenizer, records, hf_datasets):
    parts = [records[:50], records[50:90], records[90:130], records[130:200], records[200:]]
    (tmp_path / "pq").mkdir()
    a = write_jsonl(str(tmp_path / "a.jsonl"), parts[0])
    write_parquet(tmp_path / "pq" / "b1.parquet", parts[1], row_group_size=5)
    write_parquet(tmp_path / "pq" / "b2.parquet", parts[2], row_group_size=64)
    ds = save_dataset(hf_datasets, tmp_path / "ds", parts[3], num_shards=2)
    c = write_jsonl(str(tmp_path / "c.jsonl.gz"), parts[4], "gzip")
    inputs = [a, str(tmp_path / "pq" / "*.parquet"), ds, c]
    assert [os.path.basename(p) for p in resolve_inputs(inputs)] == ["a.jsonl", "b1.parquet", "b2.parquet", "ds",
                                                                      "c.jsonl.gz"]
    summary, prefix = run_preprocess(inputs, bpe_tokenizer, name="mixed", seq_length=40, block_bytes=4000, workers=2)
    everything = write_jsonl(str(tmp_path / "all.jsonl"), records)
    _, ref = run_preprocess([everything], bpe_tokenizer, name="ref", seq_length=40)
    assert outputs(prefix) == outputs(ref)
    meta = read_dataset_meta(prefix)
    assert [i["lines"] for i in meta["inputs"]] == [len(p) for p in parts]
    assert [i["documents"] for i in meta["inputs"]] == [len(p) for p in parts]
    assert f"{len(records)} lines and rows" in summary.format()
    # Not the same dataset in another order: the order of the arguments is kept.
    _, swapped = run_preprocess([c, a, str(tmp_path / "pq" / "*.parquet"), ds], bpe_tokenizer, name="swapped",
                                seq_length=40)
    assert outputs(swapped)[".bin"] != outputs(ref)[".bin"]


# --------------------------------------------------------------------------- the reader


def test_reader_blocks_rows_and_progress(tmp_path, records):
    path = write_parquet(tmp_path / "in.parquet", records[:100], row_group_size=40)
    items = list(read_input(3, path, block_bytes=2000))
    blocks = [i for i in items if isinstance(i, RecordBlock)]
    done = items[-1]
    assert isinstance(done, FileDone) and not any(isinstance(i, ReadFailure) for i in items)
    assert len(blocks) > 3 * 3  # row groups of 40 rows are cut into blocks of ~2000 text bytes
    assert [t for b in blocks for t in b.texts] == [r["text"] for r in records[:100]]
    assert [d for b in blocks for d in b.domains] == [r["meta"]["pile_set_name"] for r in records[:100]]
    row = 1
    for b in blocks:  # contiguous rows, 1-based, across row groups
        assert b.file_index == 3 and b.first_line == row and b.num_lines == len(b.texts) > 0
        assert b.text_bytes == sum(len(t.encode()) for t in b.texts)
        row += b.num_lines
    starts = {b.first_line for b in blocks}
    assert {1, 41, 81} <= starts  # a block never spans two row groups
    positions = [b.raw_pos for b in blocks]
    assert positions == sorted(positions) and 0 < positions[-1] <= os.path.getsize(path)
    assert done.lines == 100 and done.raw_bytes == os.path.getsize(path)
    assert done.text_bytes == sum(len(r["text"].encode()) for r in records[:100])


def test_reader_reads_only_the_named_columns(tmp_path, records, monkeypatch):
    rows = [{"text": r["text"], "meta": {"pile_set_name": "A", "big": "x" * 100}, "other": "y" * 100}
            for r in records[:10]]
    path = write_parquet(tmp_path / "in.parquet", rows)
    asked = []
    real = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kw):
        asked.append(columns)
        return real(self, i, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    blocks = [i for i in read_input(0, path) if isinstance(i, RecordBlock)]
    assert asked == [["meta.pile_set_name", "text"]]
    assert [t for b in blocks for t in b.texts] == [r["text"] for r in rows]


def test_resolve_inputs_accepts_parquet_and_datasets_dirs(tmp_path, hf_datasets):
    (tmp_path / "x").mkdir()
    write_parquet(tmp_path / "x" / "b.parquet", [{"text": "b"}])
    write_parquet(tmp_path / "x" / "a.parquet", [{"text": "a"}])
    ds = save_dataset(hf_datasets, tmp_path / "x" / "c_ds", [{"text": "c"}])
    (tmp_path / "x" / "plain").mkdir()  # a glob passes over other directories
    got = resolve_inputs([str(tmp_path / "x" / "*")])
    assert [os.path.basename(p) for p in got] == ["a.parquet", "b.parquet", "c_ds"]
    hf_datasets.DatasetDict({"train": hf_datasets.Dataset.from_list([{"text": "t"}])}).save_to_disk(
        str(tmp_path / "dd"))
    with pytest.raises(ValueError, match="DatasetDict"):
        resolve_inputs([str(tmp_path / "dd")])
    assert resolve_inputs([str(tmp_path / "dd" / "train")]) == [str(tmp_path / "dd" / "train")]
    os.remove(os.path.join(ds, "data-00000-of-00001.arrow"))
    with pytest.raises(FileNotFoundError, match="data-00000-of-00001.arrow, which is missing"):
        resolve_inputs([ds])


# --------------------------------------------------------------------------- bad input

GOOD = {"text": "Fine text. More.", "meta": {"pile_set_name": "A"}}
STRUCT = pa.struct([("pile_set_name", pa.string())])


def rows_table(texts, domains=None, text_type=pa.string(), meta_type=STRUCT):
    """Four rows, GOOD but where the arguments say otherwise."""
    domains = domains if domains is not None else [{"pile_set_name": "A"}] * len(texts)
    return pa.table({"text": pa.array(texts, text_type), "meta": pa.array(domains, meta_type)})


def invalid_utf8_table():
    text = pa.array([b"Fine.", b"Fine.", b"caf\xe9 bad", b"Fine."], pa.binary()).view(pa.string())
    return pa.table({"text": text, "meta": pa.array([{"pile_set_name": "A"}] * 4, STRUCT)})


def corrupt_row_group(path, group: int) -> None:
    """Overwrite the start of one row group's text column chunk (its page header)."""
    chunk = pq.ParquetFile(path).metadata.row_group(group).column(0)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    raw = bytearray(open(path, "rb").read())
    raw[start:start + 32] = b"\xff" * 32
    open(path, "wb").write(bytes(raw))


def parquet_case(table, damage=None, row_group_size=None):
    def make(tmp_path, datasets):
        path = write_parquet(tmp_path / "in" / "bad.parquet", table(), row_group_size=row_group_size)
        if damage:
            damage(path)
        return path
    return make


def dataset_case(rows, damage=None, num_shards=1):
    def make(tmp_path, datasets):
        path = save_dataset(datasets, tmp_path / "in" / "bad_ds", rows, num_shards)
        if damage:
            damage(path)
        return path
    return make


def cut_data_file(index, keep):
    def damage(path):
        state = json.load(open(os.path.join(path, "state.json")))
        f = os.path.join(path, state["_data_files"][index]["filename"])
        raw = open(f, "rb").read()
        open(f, "wb").write(raw[:keep(len(raw))])
    return damage


SIX = [dict(GOOD, text=f"Row {i}. Text.") for i in range(6)]

# (id, input maker, reason, row of the first bad record, detail fragment, rows skipped, rows kept)
BAD_CASES = [
    ("missing_column",
     parquet_case(lambda: pa.table({"body": ["x"] * 4, "meta": pa.array([GOOD["meta"]] * 4, STRUCT)})),
     SkipReason.MISSING_KEY, 1, "no column 'text' (columns: 'body', 'meta')", 4, 0),
    ("missing_struct_field", parquet_case(lambda: rows_table(["x"] * 4, [{"source": "A"}] * 4,
                                                             meta_type=pa.struct([("source", pa.string())]))),
     SkipReason.MISSING_KEY, 1, "struct 'meta' has no field 'pile_set_name'", 4, 0),
    ("domain_not_a_struct", parquet_case(lambda: pa.table({"text": ["x"] * 4, "meta": ["A"] * 4})),
     SkipReason.MISSING_KEY, 1, "column 'meta' is string, not a struct", 4, 0),
    ("null_struct", parquet_case(lambda: rows_table(["x"] * 4, [GOOD["meta"]] * 2 + [None, GOOD["meta"]])),
     SkipReason.MISSING_KEY, 3, "'meta' is null", 1, 3),
    ("int_column", parquet_case(lambda: pa.table({"text": [1, 2, 3, 4], "meta": pa.array([GOOD["meta"]] * 4, STRUCT)})),
     SkipReason.NOT_A_STRING, 1, "'text' is int64, not a string", 4, 0),
    ("int_domain", parquet_case(lambda: rows_table(["x"] * 4, [{"pile_set_name": 5}] * 4,
                                                   meta_type=pa.struct([("pile_set_name", pa.int64())])),
                                row_group_size=2),
     SkipReason.NOT_A_STRING, 1, "'meta.pile_set_name' is int64, not a string", 4, 0),
    ("null_text", parquet_case(lambda: rows_table(["x", "x", None, "x"])),
     SkipReason.NOT_A_STRING, 3, "'text' is null", 1, 3),
    ("null_domain", parquet_case(lambda: rows_table(["x"] * 4, [GOOD["meta"]] * 2 + [{"pile_set_name": None}] * 2)),
     SkipReason.NOT_A_STRING, 3, "'meta.pile_set_name' is null", 2, 2),
    ("empty_text", parquet_case(lambda: rows_table(["x", "x", "", "x"]), row_group_size=3),
     SkipReason.EMPTY_TEXT, 3, "'text' is empty", 1, 3),
    ("invalid_utf8", parquet_case(invalid_utf8_table), SkipReason.INVALID_UTF8, 3, "invalid UTF-8", 1, 3),
    ("corrupt_row_group", parquet_case(lambda: pa.Table.from_pylist(SIX), lambda p: corrupt_row_group(p, 1),
                                       row_group_size=2),
     SkipReason.CORRUPT_INPUT, 3, "cannot read row group 1", 1, 2),
    ("truncated_parquet", parquet_case(lambda: pa.Table.from_pylist(SIX), lambda p: open(p, "r+b").truncate(300)),
     SkipReason.CORRUPT_INPUT, 1, "cannot read Parquet", 1, 0),
    ("empty_parquet", parquet_case(lambda: pa.Table.from_pylist(SIX), lambda p: open(p, "r+b").truncate(0)),
     SkipReason.CORRUPT_INPUT, 1, "cannot read Parquet", 1, 0),
    ("datasets_null_text", dataset_case([GOOD, GOOD, dict(GOOD, text=None), GOOD]),
     SkipReason.NOT_A_STRING, 3, "'text' is null", 1, 3),
    ("datasets_missing_column", dataset_case([{"body": "x"}] * 4),
     SkipReason.MISSING_KEY, 1, "no column 'text' (columns: 'body')", 4, 0),
    # Two data files of three rows: the second cut inside a message (its rows are lost),
    # or just before its end-of-stream marker (its rows read, but more may have followed).
    ("datasets_cut_message", dataset_case(SIX, cut_data_file(1, lambda n: n // 2), num_shards=2),
     SkipReason.CORRUPT_INPUT, 4, "data-00001-of-00002.arrow: cannot read", 1, 3),
    ("datasets_no_end_marker", dataset_case(SIX, cut_data_file(1, lambda n: n - 8), num_shards=2),
     SkipReason.CORRUPT_INPUT, 7, "ends without its end-of-stream marker", 1, 6),
]


@pytest.mark.parametrize("name,make,reason,row,detail,skipped,kept", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_fail_and_skip(tmp_path, run_preprocess, bpe_tokenizer, hf_datasets, name, make, reason, row,
                                 detail, skipped, kept):
    (tmp_path / "in").mkdir()
    good = write_jsonl(str(tmp_path / "in" / "good.jsonl"), [GOOD, GOOD])
    bad = make(tmp_path, hf_datasets)
    with pytest.raises(InputError) as err:
        run_preprocess([good, bad], bpe_tokenizer, name="fail", workers=2)
    message = str(err.value)
    assert message.startswith(f"{bad}: row {row}: {reason.value}: "), message
    assert detail in message, message
    assert err.value.record.line == row and err.value.record.reason is reason
    assert dataset_files(tmp_path) == ["in"]  # nothing under the output prefix, not even temporaries

    summary, prefix = run_preprocess([good, bad], bpe_tokenizer, name="skip", on_error="skip",
                                     instance_mode="document")
    meta = read_dataset_meta(prefix)
    assert meta["skipped"][reason.value] == skipped and sum(meta["skipped"].values()) == skipped
    assert meta["inputs"][1]["skipped"] == {reason.value: skipped}
    assert meta["inputs"][1]["documents"] == kept and meta["num_instances"] == 2 + kept
    assert f"skipped: {skipped} ({reason.value} {skipped})" in summary.format()
    if reason is SkipReason.CORRUPT_INPUT:
        assert meta["inputs"][1]["lines"] == kept  # the rows before the damage
    else:
        assert meta["inputs"][1]["lines"] == kept + skipped


def test_skip_keeps_the_exact_good_rows(tmp_path, run_preprocess, bpe_tokenizer, records):
    """Under skip, the dataset is that of the good rows alone."""
    rows = [dict(r) for r in records[:40]]
    for i in (0, 7, 8, 21, 39):
        rows[i]["text"] = "" if i % 2 else None
    path = write_parquet(tmp_path / "in.parquet", rows, row_group_size=8)
    _, prefix = run_preprocess([path], bpe_tokenizer, name="skip", on_error="skip", seq_length=32)
    meta = read_dataset_meta(prefix)
    assert meta["skipped"]["empty_text"] == 3 and meta["skipped"]["not_a_string"] == 2
    good = write_parquet(tmp_path / "good.parquet", [r for r in rows if r["text"]], row_group_size=8)
    _, ref = run_preprocess([good], bpe_tokenizer, name="ref", seq_length=32)
    assert outputs(prefix) == outputs(ref)


def test_skipped_rows_are_logged_with_their_row(tmp_path, run_preprocess, bpe_tokenizer, caplog):
    path = write_parquet(tmp_path / "in.parquet", [GOOD, dict(GOOD, text=""), GOOD])
    with caplog.at_level("WARNING"):
        run_preprocess([path], bpe_tokenizer, on_error="skip")
    assert f"{path}: row 2: empty_text: 'text' is empty" in caplog.text

