"""End to end: JSONL in, megatron-core datasets out; bad input under both policies."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_miniplm.data.boundaries import BoundaryTables
from megatron_miniplm.data.meta import read_dataset_meta
from megatron_miniplm.data.records import InputError, SkipReason
from megatron_miniplm.data.tokenizer import load_tokenizer

from .conftest import DOMAINS, dataset_files, make_records, read_domains, read_instances, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def records():
    return make_records(240, seed=7)


def raw_encode(tokenizer_dir, texts):
    """The reference encoding, straight from the `tokenizers` library."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    tok.encode_special_tokens = True
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def test_document_mode_round_trip(tmp_path, run_preprocess, bpe_tokenizer, records):
    recs = records + [{"text": "literal <|endoftext|> inside", "meta": {"pile_set_name": "Github"}}]
    path = write_jsonl(str(tmp_path / "in.jsonl"), recs)
    summary, prefix = run_preprocess([path], bpe_tokenizer, instance_mode="document", seq_length=16)
    eod = load_tokenizer(bpe_tokenizer).eod_id
    want = [ids + [eod] for ids in raw_encode(bpe_tokenizer, [r["text"] for r in recs])]
    got = read_instances(prefix)
    assert len(got) == len(recs)
    for g, w in zip(got, want):
        assert g.tolist() == w
    assert (got[-1] == eod).sum() == 1  # the literal EOD text is text
    meta = read_dataset_meta(prefix)
    names = meta["domains"]
    assert [names[d] for d in read_domains(prefix)] == [r["meta"]["pile_set_name"] for r in recs]
    assert meta["num_documents"] == meta["num_instances"] == len(recs)
    assert meta["num_tokens"] == sum(map(len, want))
    assert meta["dtype"] == "uint16" and meta["instance_mode"] == "document"
    assert meta["tokenizer"]["sha256"] == hashlib.sha256(open(os.path.join(bpe_tokenizer, "tokenizer.json"), "rb").read()).hexdigest()
    assert meta["tokenizer"]["eod_id"] == meta["tokenizer"]["pad_id"] == eod
    (inp,) = meta["inputs"]
    assert inp["lines"] == len(recs) and inp["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert sum(s["documents"] for s in meta["domain_stats"].values()) == len(recs)
    assert sum(meta["skipped"].values()) == 0
    assert summary.documents == len(recs) and "documents: 241" in summary.format()


def test_sentencepiece_document_round_trip(tmp_path, run_preprocess, sp_tokenizer, records):
    import sentencepiece as spm

    path = write_jsonl(str(tmp_path / "in.jsonl"), records[:60])
    _, prefix = run_preprocess([path], sp_tokenizer, instance_mode="document")
    sp = spm.SentencePieceProcessor(model_file=sp_tokenizer)
    got = read_instances(prefix)
    for g, r in zip(got, records[:60]):
        assert g.tolist() == sp.encode(r["text"]) + [sp.eos_id()]


def test_miniplm_mode(tmp_path, run_preprocess, bpe_tokenizer, records):
    seq_length = 48
    path = write_jsonl(str(tmp_path / "in.jsonl"), records)
    _, prefix = run_preprocess([path], bpe_tokenizer, seq_length=seq_length)
    tok = load_tokenizer(bpe_tokenizer)
    tables = BoundaryTables.from_tokenizer(tok)
    meta = read_dataset_meta(prefix)
    insts, doms = read_instances(prefix), read_domains(prefix)
    names = meta["domains"]
    assert sorted(names) == sorted(DOMAINS)
    encoded = raw_encode(bpe_tokenizer, [r["text"] for r in records])
    streams = {}
    for r, ids in zip(records, encoded):
        streams.setdefault(r["meta"]["pile_set_name"], []).extend(ids + [tok.eod_id])
    last = {d: i for i, d in enumerate(doms)}
    pos = {name: 0 for name in names}
    cuts = 0
    for i, (inst, d) in enumerate(zip(insts, doms)):
        name = names[d]
        stream = np.array(streams[name])
        n = len(inst)
        assert n <= seq_length + 1
        np.testing.assert_array_equal(inst, stream[pos[name]:pos[name] + n])  # one domain, in order
        if i != last[d]:
            # The boundary flags of the window, computed on the domain stream itself.
            window = tables.flags(stream[pos[name]:pos[name] + seq_length + 2])[: seq_length + 1]
            if window[1:].any():
                assert window[n - 1] and not window[n:].any()
                cuts += n < seq_length + 1
            else:
                assert n == seq_length + 1
        pos[name] += n
    assert pos == {name: len(s) for name, s in streams.items()}  # streams reproduced exactly
    assert cuts > 20
    for name, st in meta["domain_stats"].items():
        assert st["tokens"] == len(streams[name])
        assert st["documents"] == sum(r["meta"]["pile_set_name"] == name for r in records)
    assert meta["boundary_tokens"]["sentence_final"] > 0


def test_readable_by_gpt_dataset(tmp_path, run_preprocess, bpe_tokenizer, records):
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.utils import Split

    path = write_jsonl(str(tmp_path / "in.jsonl"), records[:80])
    _, prefix = run_preprocess([path], bpe_tokenizer, seq_length=32)

    class Tok:
        vocab_size, eod, pad = 500, 0, -1  # pad apart from eod, as megatron asks
        unique_identifiers = {"class": "tiny"}

    config = GPTDatasetConfig(random_seed=1, sequence_length=32, tokenizer=Tok(), reset_position_ids=False,
                              reset_attention_mask=False, eod_mask_loss=False)
    indexed = IndexedDataset(prefix)
    ds = GPTDataset(indexed, prefix, np.arange(len(indexed), dtype=np.int32), 20, Split.train, config)
    stream = np.concatenate(read_instances(prefix))
    sample = ds[0]["tokens"].numpy()
    assert len(sample) == 32
    # Every sample is a contiguous run of some epoch's shuffled instances: at least the
    # tokens exist in the stream (weak but format-level check that nothing is garbled).
    assert set(sample.tolist()) <= set(stream.tolist())


def test_output_bytes_do_not_depend_on_workers(tmp_path, run_preprocess, bpe_tokenizer, records):
    a = write_jsonl(str(tmp_path / "a.jsonl"), records[:120])
    b = write_jsonl(str(tmp_path / "b.jsonl.gz"), records[120:], "gzip")
    outs = {}
    for workers in (1, 2, 3):
        _, prefix = run_preprocess([a, b], bpe_tokenizer, name=f"w{workers}", workers=workers,
                                   seq_length=40, block_bytes=3000)
        outs[workers] = {ext: open(prefix + ext, "rb").read() for ext in (".bin", ".idx", ".domains.npy", ".meta.json")}
    assert len(outs[1][".bin"]) > 10_000
    assert outs[1] == outs[2] == outs[3]
    # Block size does not matter either.
    _, prefix = run_preprocess([a, b], bpe_tokenizer, name="big", seq_length=40, block_bytes=1 << 20)
    assert open(prefix + ".bin", "rb").read() == outs[1][".bin"]


def test_sentencepiece_output_does_not_depend_on_workers(tmp_path, run_preprocess, sp_tokenizer, records):
    path = write_jsonl(str(tmp_path / "in.jsonl"), records[:150])
    bins = []
    for workers in (1, 3):
        _, prefix = run_preprocess([path], sp_tokenizer, name=f"w{workers}", workers=workers, block_bytes=2000)
        bins.append((open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read()))
    assert bins[0] == bins[1] and len(bins[0][0]) > 10_000


def test_gz_and_zst_inputs_match_plain(tmp_path, run_preprocess, bpe_tokenizer, records):
    results = []
    for how, ext in (("none", ".jsonl"), ("gzip", ".jsonl.gz"), ("zstd", ".jsonl.zst")):
        path = write_jsonl(str(tmp_path / f"in{ext}"), records[:100], how)
        _, prefix = run_preprocess([path], bpe_tokenizer, name=how, seq_length=32)
        meta = read_dataset_meta(prefix)
        assert meta["inputs"][0]["lines"] == 100
        results.append((open(prefix + ".bin", "rb").read(), meta["fingerprint"]))
    assert results[0] == results[1] == results[2]


def test_packed_and_sharded(tmp_path, run_preprocess, bpe_tokenizer, records):
    path = write_jsonl(str(tmp_path / "in.jsonl"), records[:100])
    _, whole = run_preprocess([path], bpe_tokenizer, name="whole", instance_mode="packed", seq_length=20)
    summary, sharded = run_preprocess([path], bpe_tokenizer, name="sh", instance_mode="packed", seq_length=20,
                                      shard_size_tokens=1000)
    top = summary.meta
    assert len(top["shards"]) > 3 and top == read_dataset_meta(sharded)
    a, b = read_instances(whole), read_instances(sharded)
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert np.array_equal(read_domains(whole), read_domains(sharded))
    counts = {}
    for inst, d in zip(a, read_domains(whole)):
        counts.setdefault(int(d), []).append(len(inst))
    for lengths in counts.values():
        assert all(n == 21 for n in lengths[:-1]) and lengths[-1] <= 21
    assert top["num_tokens"] == read_dataset_meta(whole)["num_tokens"]
    assert "sh.meta.json" in dataset_files(tmp_path) and "sh_00000.idx" in dataset_files(tmp_path)


# (name, lines or raw bytes, expected reason, line number of the bad record)
GOOD = json.dumps({"text": "Fine text. More.", "meta": {"pile_set_name": "A"}})
BAD_CASES = [
    ("invalid_json", '{"text": "oops", ', SkipReason.INVALID_JSON),
    ("missing_key", json.dumps({"body": "x", "meta": {"pile_set_name": "A"}}), SkipReason.MISSING_KEY),
    ("not_a_string", json.dumps({"text": ["x"], "meta": {"pile_set_name": "A"}}), SkipReason.NOT_A_STRING),
    ("invalid_utf8", b'{"text": "caf\xe9", "meta": {"pile_set_name": "A"}}', SkipReason.INVALID_UTF8),
    ("empty_text", json.dumps({"text": "", "meta": {"pile_set_name": "A"}}), SkipReason.EMPTY_TEXT),
]


@pytest.mark.parametrize("name,line,reason", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_record_fail_and_skip(tmp_path, run_preprocess, bpe_tokenizer, name, line, reason):
    path = write_jsonl(str(tmp_path / "in.jsonl"), [GOOD, GOOD, line, GOOD])
    with pytest.raises(InputError) as err:
        run_preprocess([path], bpe_tokenizer, name="fail")
    assert str(err.value).startswith(f"{path}:3: {reason.value}: ")
    assert dataset_files(tmp_path) == ["in.jsonl"]  # nothing left behind, not even temporaries

    summary, prefix = run_preprocess([path], bpe_tokenizer, name="skip", on_error="skip", instance_mode="document")
    meta = read_dataset_meta(prefix)
    assert meta["skipped"][reason.value] == 1 and sum(meta["skipped"].values()) == 1
    assert meta["inputs"][0]["skipped"] == {reason.value: 1} and meta["inputs"][0]["lines"] == 4
    assert meta["num_instances"] == 3
    assert f"skipped: 1 ({reason.value} 1)" in summary.format()


@pytest.mark.parametrize("how,ext", [("gzip", ".jsonl.gz"), ("zstd", ".jsonl.zst")])
def test_truncated_compressed_input(tmp_path, run_preprocess, bpe_tokenizer, records, how, ext):
    good = write_jsonl(str(tmp_path / "good.jsonl"), records[:10])
    full = tmp_path / f"full{ext}"
    write_jsonl(str(full), records * 3, how)
    cut = tmp_path / f"cut{ext}"
    cut.write_bytes(full.read_bytes()[:-64])
    full.unlink()
    with pytest.raises(InputError, match=rf"cut{ext}:\d+: truncated_input"):
        run_preprocess([good, str(cut)], bpe_tokenizer, name="fail")
    assert dataset_files(tmp_path) == sorted(["good.jsonl", cut.name])

    _, prefix = run_preprocess([good, str(cut)], bpe_tokenizer, name="skip", on_error="skip", instance_mode="document")
    meta = read_dataset_meta(prefix)
    assert meta["skipped"]["truncated_input"] == 1
    lines = meta["inputs"][1]["lines"]
    assert 0 < lines < len(records) * 3
    assert meta["num_instances"] == 10 + lines  # every complete line before the damage
    assert meta["inputs"][1]["sha256"] == hashlib.sha256(cut.read_bytes()).hexdigest()


def test_fail_keeps_a_previous_dataset(tmp_path, run_preprocess, bpe_tokenizer):
    good = write_jsonl(str(tmp_path / "good.jsonl"), [GOOD] * 3)
    _, prefix = run_preprocess([good], bpe_tokenizer, name="ds")
    before = {f: open(tmp_path / f, "rb").read() for f in dataset_files(tmp_path)}
    bad = write_jsonl(str(tmp_path / "bad.jsonl"), [GOOD, "{"])
    with pytest.raises(InputError):
        run_preprocess([bad], bpe_tokenizer, name="ds", workers=2)
    after = {f: open(tmp_path / f, "rb").read() for f in dataset_files(tmp_path) if f != "bad.jsonl"}
    assert after == before


def test_cli_failure_and_success(tmp_path, bpe_tokenizer):
    bad = write_jsonl(str(tmp_path / "bad.jsonl"), [GOOD, GOOD, "[1, 2]"])
    cmd = [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--tokenizer", bpe_tokenizer,
           "--output-prefix", str(tmp_path / "out"), "--no-progress", "--seq-length", "16", "--workers", "2"]
    r = subprocess.run(cmd + ["--input", bad], capture_output=True, text=True)
    assert r.returncode == 1
    assert f"{bad}:3: not_an_object" in r.stderr
    assert dataset_files(tmp_path) == ["bad.jsonl"]
    r = subprocess.run(cmd + ["--input", str(tmp_path / "*.jsonl"), "--on-error", "skip"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "skipped: 1 (not_an_object 1)" in r.stdout and "instances:" in r.stdout
    assert read_dataset_meta(str(tmp_path / "out"))["num_documents"] == 2


def test_read_ahead_is_bounded(bpe_tokenizer):
    """Pool.imap reads its whole input ahead; ordered_tokenize keeps a fixed window."""
    from megatron_miniplm.data.blocks import Block
    from megatron_miniplm.data.preprocess import ordered_tokenize
    from megatron_miniplm.data.records import parse_key
    from megatron_miniplm.data.worker import BlockTokenizer, WorkerConfig

    pulled = 0
    line = (GOOD + "\n").encode()

    def blocks():
        nonlocal pulled
        for i in range(40):
            pulled += 1
            yield Block(0, i + 1, line, 1)

    config = WorkerConfig(bpe_tokenizer, None, parse_key("text"), parse_key("meta.pile_set_name"), False, None)
    max_ahead = 0
    for done, block in enumerate(ordered_tokenize(blocks(), 2, BlockTokenizer(config), max_pending=3), start=1):
        assert block.first_line == done  # in order
        max_ahead = max(max_ahead, pulled - done)
    assert done == 40 and max_ahead <= 3


def test_progress_bar_and_single_domain(tmp_path, run_preprocess, bpe_tokenizer, records, capsys):
    path = write_jsonl(str(tmp_path / "in.jsonl"), [{"text": r["text"]} for r in records[:30]])
    summary, prefix = run_preprocess([path], bpe_tokenizer, domain_key="", progress=True, seq_length=64)
    err = capsys.readouterr().err
    assert "docs/s" in err and "MB/s" in err and "tok/s" in err
    meta = read_dataset_meta(prefix)
    assert meta["domains"] == ["default"] and set(read_domains(prefix).tolist()) == {0}
    assert meta["domain_stats"]["default"]["documents"] == 30


def test_every_instance_gives_a_prediction_that_counts(tmp_path, run_preprocess, bpe_tokenizer):
    """A document whose newline ends a full window carries its EOD over: into an instance with
    the next document of its domain (not [EOD, newline] with nothing to count), or, at the
    end of the input, nowhere (an [EOD] instance would stop scoring and training)."""
    from megatron_miniplm.data.samples import collate_instances

    seq_length = 8
    tok = load_tokenizer(bpe_tokenizer)
    fill = next(t for t in (" ".join(["the"] * k) + "\n" for k in range(1, 40))
                if len(raw_encode(bpe_tokenizer, [t])[0]) == seq_length + 1)
    records = [{"text": fill, "meta": {"pile_set_name": "a"}},
               {"text": "\n" + "the" * 60, "meta": {"pile_set_name": "a"}},
               {"text": fill, "meta": {"pile_set_name": "b"}}]
    _, prefix = run_preprocess([write_jsonl(str(tmp_path / "in.jsonl"), records)], bpe_tokenizer,
                               seq_length=seq_length)
    insts = read_instances(prefix)
    assert len(insts) >= 4
    for inst in insts:
        assert collate_instances([inst], tok.pad_id)["loss_mask"].sum() > 0, inst
