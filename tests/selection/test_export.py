"""tools/export_selection.py: the blend as text, in blend order, that tokenizes back to the blend."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data.conftest import make_records, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ = 64


def _bpe(directory, texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(os.path.join(directory, "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def blend(tmp_path_factory):
    """A preprocessed 3-shard corpus with teacher/reference scores and a shuffled MiniPLM blend."""
    from megatron_miniplm.data.meta import dataset_prefixes
    from megatron_miniplm.data.preprocess import preprocess
    from megatron_miniplm.data.config import PreprocessConfig
    from megatron_miniplm.scoring.score_file import save_scores
    from megatron_miniplm.selection.config import SelectionConfig
    from megatron_miniplm.selection.sample import SampleRequest, run
    from megatron_miniplm.selection.shards import open_shard

    root = tmp_path_factory.mktemp("export")
    records = make_records(160, seed=5)
    tokenizer = _bpe(str(root), [r["text"] for r in records])
    corpus = write_jsonl(str(root / "corpus.jsonl"), records)
    prefix = str(root / "data")
    preprocess(PreprocessConfig(inputs=[corpus], output_prefix=prefix, tokenizer=tokenizer, seq_length=SEQ,
                                shard_size_tokens=6000, progress=False))
    shards = dataset_prefixes(prefix)
    assert len(shards) >= 3
    rng = np.random.default_rng(0)
    teacher, reference = [], []
    for s in shards:
        shard = open_shard(s)
        count = np.maximum(shard.index.lengths.astype(np.float64) - 1, 0)
        for role, out in (("teacher", teacher), ("reference", reference)):
            mean = rng.uniform(1.0, 4.0, size=len(count))
            save_scores(f"{s}.{role}", np.stack([mean * count, count], 1),
                        {"dataset_fingerprint": shard.fingerprint, "model": {"name": role}})
            out.append(f"{s}.{role}")
    out = str(root / "blend" / "miniplm")
    os.makedirs(os.path.dirname(out))
    run(SampleRequest(data_paths=[prefix], output=out, config=SelectionConfig(alpha=0.5, order="shuffled"),
                      teacher_scores=teacher, reference_scores=reference))
    return {"root": root, "prefix": prefix, "blend": out, "tokenizer": tokenizer, "shards": shards}


def _pieces(blend_prefix):
    """(blend row, piece tokens without EOD, shard, instance) of every document piece, in blend order."""
    from megatron_miniplm.selection.blend import BlendReader

    reader = BlendReader(blend_prefix)
    eod = reader.meta["tokenizer"]["eod_id"]
    out = []
    for j in range(len(reader)):
        tokens = np.asarray(reader[j], dtype=np.int64)
        s, i = (int(v) for v in reader.rows[j])
        cut = [-1, *np.flatnonzero(tokens == eod), len(tokens)]
        out += [(j, tokens[a + 1:b], s, i) for a, b in zip(cut, cut[1:]) if b > a + 1]
    return out


def _export(blend, output, *extra):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "export_selection.py"), "--blend", blend,
                           "--output", output, "--no-progress", *extra], capture_output=True, text=True)


def test_records_in_blend_order_with_domains_and_scores_that_tokenize_back(blend, tmp_path):
    from megatron_miniplm.data.tokenizer import load_tokenizer
    from megatron_miniplm.scoring.score_file import load_scores
    from megatron_miniplm.selection.export import iter_records
    from megatron_miniplm.selection.shards import domain_table, open_shards

    out = str(tmp_path / "refined.jsonl")
    result = _export(blend["blend"], out)
    assert result.returncode == 0, result.stderr
    records = list(iter_records(out))
    pieces = _pieces(blend["blend"])
    assert len(records) == len(pieces) > 80
    assert "records" in result.stdout and f"{len(records):,} records" in result.stdout
    shuffled_rows = [p[0] for p in pieces]
    assert [r["meta"]["blend_row"] for r in records] == shuffled_rows  # blend order
    shards = open_shards(blend["shards"])
    names, maps = domain_table(shards)
    tok = load_tokenizer(blend["tokenizer"])
    for r, (j, piece, s, i) in zip(records, pieces):
        assert tok.encode_batch([r["text"]])[0] == piece.tolist(), (j, r["text"])
        assert r["meta"]["pile_set_name"] == names[maps[s][shards[s].domains()[i]]]
        t = load_scores(f"{blend['shards'][s]}.teacher")[0][i]
        ref = load_scores(f"{blend['shards'][s]}.reference")[0][i]
        assert r["meta"]["teacher_nll"] == pytest.approx(t[0] / t[1])
        assert r["meta"]["difference_score"] == pytest.approx(ref[0] / ref[1] - t[0] / t[1])


def test_preprocessing_the_export_gives_back_the_selected_tokens(blend, tmp_path):
    """Each record, re-tokenized as one document (EOD appended), is its piece of the blend."""
    from megatron_miniplm.data.preprocess import preprocess
    from megatron_miniplm.data.config import PreprocessConfig
    from megatron_miniplm.selection.shards import domain_table, open_shards

    out = str(tmp_path / "refined.jsonl.zst")
    assert _export(blend["blend"], out).returncode == 0
    again = str(tmp_path / "again")
    preprocess(PreprocessConfig(inputs=[out], output_prefix=again, tokenizer=blend["tokenizer"], seq_length=4096,
                                instance_mode="document", progress=False))
    shard, = open_shards([again])
    sources = open_shards(blend["shards"])
    names, maps = domain_table(sources)
    pieces = _pieces(blend["blend"])
    assert shard.num_instances == len(pieces)
    eod = shard.meta["tokenizer"]["eod_id"]
    for k, (_, piece, _, _) in enumerate(pieces):
        assert shard.tokens(k).tolist() == piece.tolist() + [eod], k
    domains = shard.domains()
    for k, (_, _, s, i) in enumerate(pieces):  # each record keeps its instance's domain
        assert shard.domain_names[domains[k]] == names[maps[s][sources[s].domains()[i]]], k


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".parquet"])
def test_every_format_holds_the_same_records(blend, tmp_path, suffix):
    from megatron_miniplm.selection.export import iter_records

    assert _export(blend["blend"], str(tmp_path / "a.jsonl")).returncode == 0
    assert _export(blend["blend"], str(tmp_path / f"b{suffix}")).returncode == 0
    assert list(iter_records(str(tmp_path / f"b{suffix}"))) == list(iter_records(str(tmp_path / "a.jsonl")))


def test_a_killed_sharded_export_resumes_to_the_same_files(blend, tmp_path, monkeypatch):
    from megatron_miniplm.selection import export

    whole = tmp_path / "whole"
    cfg = dict(blend=blend["blend"], shard_size_mb=0.004, batch_size=4, progress=False)
    done = export.export_selection(export.ExportConfig(output=str(whole / "r.jsonl"), **cfg))
    assert len(done.files) >= 4

    calls = {"n": 0}
    real = export._Source.records

    def dying(self, lo, hi):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt  # stands in for a kill: nothing after this point is written
        return real(self, lo, hi)

    part = tmp_path / "part"
    monkeypatch.setattr(export._Source, "records", dying)
    with pytest.raises(KeyboardInterrupt):
        export.export_selection(export.ExportConfig(output=str(part / "r.jsonl"), **cfg))
    finished = json.load(open(part / "r.jsonl.export.json"))["shards"]
    assert 1 <= len(finished) < len(done.files)
    assert not [f for f in os.listdir(part) if ".tmp-" in f]  # the open shard was removed
    monkeypatch.setattr(export._Source, "records", real)
    again = export.export_selection(export.ExportConfig(output=str(part / "r.jsonl"), **cfg))
    assert again.resumed_from_row == finished[-1]["rows"][1] > 0
    assert [os.path.basename(f) for f in again.files] == [os.path.basename(f) for f in done.files]
    for a, b in zip(done.files, again.files):
        assert open(a, "rb").read() == open(b, "rb").read(), b
    assert again.records == done.records


def test_another_tokenizer_gives_a_student_corpus(blend, tmp_path):
    """The cross-family recipe: the export tokenized with a different vocabulary."""
    from megatron_miniplm.data.preprocess import preprocess
    from megatron_miniplm.data.config import PreprocessConfig
    from megatron_miniplm.selection.export import iter_records

    out = str(tmp_path / "refined.parquet")
    assert _export(blend["blend"], out).returncode == 0
    records = list(iter_records(out))
    other = _bpe(str(tmp_path), [r["text"] for r in make_records(80, seed=9)])
    summary = preprocess(PreprocessConfig(inputs=[out], output_prefix=str(tmp_path / "student"), tokenizer=other,
                                          seq_length=SEQ, progress=False))
    assert summary.documents == len(records)
    assert summary.meta["tokenizer"]["path"] != blend["tokenizer"]
    assert set(summary.meta["domains"]) == {r["meta"]["pile_set_name"] for r in records}


def test_refusals(blend, tmp_path):
    result = _export(blend["blend"], str(tmp_path / "x.csv"))
    assert result.returncode == 1 and "unsupported output type" in result.stderr
    result = _export(str(tmp_path / "nope"), str(tmp_path / "x.jsonl"))
    assert result.returncode == 1 and "nope.meta.json" in result.stderr
    assert not os.path.exists(tmp_path / "x.jsonl")


def _listing(directory) -> dict:
    """Every file's bytes but an export's state file (it names its own paths)."""
    return {f: open(os.path.join(directory, f), "rb").read() for f in sorted(os.listdir(directory))
            if not f.endswith(".export.json")}


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_a_full_disk_stops_the_export_and_the_rerun_completes_it(blend, tmp_path, monkeypatch, suffix):
    """At the first and last write of every file: DiskFullError naming the file; no temporary
    left; the shards finished before stay recorded; the rerun gives the same files."""
    from disk_full import FullDisk
    from megatron_miniplm import atomic_io
    from megatron_miniplm.atomic_io import DiskFullError
    from megatron_miniplm.selection import export

    cfg = dict(blend=blend["blend"], shard_size_mb=0.01, batch_size=8, progress=False)
    disk = FullDisk(monkeypatch, [export, atomic_io])
    export.export_selection(export.ExportConfig(output=str(tmp_path / "want" / f"r{suffix}"), **cfg))
    want = _listing(tmp_path / "want")
    sites, counted = disk.sites(), list(disk.writes)
    assert len(want) >= 4 and len(sites) >= 6
    for k in sites:
        out = tmp_path / f"at{k}"
        disk.fail_at(k, counted)
        with pytest.raises(DiskFullError, match=rf"^{out}/r.*: no space left on the device"):
            export.export_selection(export.ExportConfig(output=str(out / f"r{suffix}"), **cfg))
        assert not [f for f in os.listdir(out) if ".tmp-" in f], os.listdir(out)
        disk.budget = None
        export.export_selection(export.ExportConfig(output=str(out / f"r{suffix}"), **cfg))
        assert _listing(out) == want


def test_a_full_disk_stops_materialize_and_the_rerun_completes_it(blend, tmp_path, monkeypatch):
    from disk_full import FullDisk
    from megatron_miniplm import atomic_io
    from megatron_miniplm.atomic_io import DiskFullError
    from megatron_miniplm.data import indexed_dataset, meta
    from megatron_miniplm.selection import materialize
    from megatron_miniplm.selection.config import SelectionConfig
    from megatron_miniplm.selection.sample import SampleRequest, run

    def sample(out):
        run(SampleRequest(data_paths=[blend["prefix"]], output=str(out / "sel"), materialize=True,
                          config=SelectionConfig(alpha=0.5, order="shuffled"),
                          teacher_scores=[f"{s}.teacher" for s in blend["shards"]],
                          reference_scores=[f"{s}.reference" for s in blend["shards"]]))

    disk = FullDisk(monkeypatch, [materialize, indexed_dataset, meta, atomic_io])
    sample(tmp_path / "want")
    want = _listing(tmp_path / "want")
    sites, counted = disk.sites(), list(disk.writes)
    assert len(sites) >= 4
    for k in sites:
        out = tmp_path / f"at{k}"
        disk.fail_at(k, counted)
        with pytest.raises(DiskFullError, match=rf"^{out}/sel.*: no space left on the device"):
            sample(out)
        assert os.listdir(out) == [], os.listdir(out)
        disk.budget = None
        sample(out)
        assert _listing(out) == want


def test_a_gzip_export_is_the_same_bytes_every_run(blend, tmp_path):
    """The gzip header names the final file, not the run's temporary one."""
    assert _export(blend["blend"], str(tmp_path / "a" / "r.jsonl.gz")).returncode == 0
    assert _export(blend["blend"], str(tmp_path / "b" / "r.jsonl.gz")).returncode == 0
    data = (tmp_path / "a" / "r.jsonl.gz").read_bytes()
    assert data == (tmp_path / "b" / "r.jsonl.gz").read_bytes()
    assert b"r.jsonl\0" in data[:32] and b".tmp-" not in data[:64]


def _sentencepiece(path, texts):
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=400, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, hard_vocab_limit=False, minloglevel=2)
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path


def _scored_blend(prefix, out, alpha, order, split=None):
    """Scores of the instances' lengths, and a blend of `prefix` (or of a D_ref split's rest)."""
    from megatron_miniplm.data.meta import dataset_prefixes
    from megatron_miniplm.scoring.score_file import save_scores
    from megatron_miniplm.selection.config import SelectionConfig
    from megatron_miniplm.selection.sample import SampleRequest, run
    from megatron_miniplm.selection.shards import open_shard

    if split is not None:
        from megatron_miniplm.data.config import SplitConfig
        from megatron_miniplm.data.split import split_dataset

        split_dataset(SplitConfig(input_prefix=prefix, ref_prefix=split + "_ref", rest_prefix=split, ref_fraction=0.3))
        prefix = split
    rng, scores = np.random.default_rng(1), {"teacher": [], "reference": []}
    for s in dataset_prefixes(prefix):
        shard = open_shard(s)
        count = np.maximum(shard.index.lengths.astype(np.float64) - 1, 1)
        for role, files in scores.items():
            save_scores(f"{s}.{role}", np.stack([rng.uniform(1, 4, len(count)) * count, count], 1),
                        {"dataset_fingerprint": shard.fingerprint, "model": {"name": role}})
            files.append(f"{s}.{role}")
    run(SampleRequest(data_paths=[prefix], output=out, config=SelectionConfig(alpha=alpha, order=order),
                      teacher_scores=scores["teacher"], reference_scores=scores["reference"]))
    return out


@pytest.mark.parametrize("kind", ["byte-level BPE", "sentencepiece"])
def test_the_records_join_to_the_documents_text_when_instances_cut_words_and_characters(tmp_path, kind):
    """All instances kept, in dataset order: each domain's records joined are its documents'
    text, although short instances cut documents inside words, after sentence ends (where a
    sentencepiece decoder drops a leading space) and inside multi-byte characters. Some
    instances dropped, or a split's rest: every record is text of its domain, never U+FFFD."""
    from megatron_miniplm.data.config import PreprocessConfig
    from megatron_miniplm.data.preprocess import preprocess
    from megatron_miniplm.selection.export import ExportConfig, export_selection, iter_records

    records = make_records(40, seed=3)
    texts = [r["text"] for r in records]  # the emoji, Greek and Cyrillic below are then bytes to sentencepiece
    records += [{"text": "🎉" * 90 + " 数据模型" * 40, "meta": {"pile_set_name": "E"}},
                {"text": "Été. Über! 数据。 Ωμέγα? Да. " * 20, "meta": {"pile_set_name": "E"}}]
    tokenizer = (_bpe(str(tmp_path), texts) if kind == "byte-level BPE"
                 else _sentencepiece(str(tmp_path / "sp.model"), texts))
    prefix = str(tmp_path / "data")
    preprocess(PreprocessConfig(inputs=[write_jsonl(str(tmp_path / "c.jsonl"), records)], output_prefix=prefix,
                                tokenizer=tokenizer, seq_length=12, progress=False))
    source: dict = {}
    for r in records:
        source[r["meta"]["pile_set_name"]] = source.get(r["meta"]["pile_set_name"], "") + r["text"]

    def export(blend):
        export_selection(ExportConfig(blend=blend, output=blend + ".jsonl", progress=False))
        return list(iter_records(blend + ".jsonl"))

    joined: dict = {}
    for r in export(_scored_blend(prefix, str(tmp_path / "all"), 1.0, "original")):
        joined[r["meta"]["pile_set_name"]] = joined.get(r["meta"]["pile_set_name"], "") + r["text"]
    assert joined == source
    half = export(_scored_blend(prefix, str(tmp_path / "half"), 0.5, "shuffled"))
    rest = export(_scored_blend(prefix, str(tmp_path / "rest"), 1.0, "original", split=str(tmp_path / "split")))
    for r in half + rest:
        assert "\ufffd" not in r["text"] and r["text"] in source[r["meta"]["pile_set_name"]], r
    os.rename(prefix + ".meta.json", prefix + ".gone")  # the split's source is gone: edges decoded alone
    os.remove(str(tmp_path / "rest.jsonl.export.json"))
    assert [r["meta"] for r in export(str(tmp_path / "rest"))] == [r["meta"] for r in rest]
