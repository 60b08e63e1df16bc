"""load_tokenizer: HF tokenizer.json (file or directory) and sentencepiece .model."""
import hashlib
import json
import os

import pytest

from megatron_miniplm.data.tokenizer import HFTokenizer, SentencePieceTokenizer, TokenizerError, load_tokenizer


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_hf_directory_and_file_load_the_same(bpe_tokenizer):
    a = load_tokenizer(bpe_tokenizer)
    b = load_tokenizer(os.path.join(bpe_tokenizer, "tokenizer.json"))
    assert isinstance(a, HFTokenizer)
    assert a.path == b.path == os.path.join(bpe_tokenizer, "tokenizer.json")
    assert a.sha256 == b.sha256 == sha(a.path)
    assert a.name == b.name == os.path.basename(bpe_tokenizer)
    assert a.eod_token == "<|endoftext|>" and a.eod_id == a.pad_id == 0
    vocab = json.load(open(a.path))["model"]["vocab"]
    assert a.vocab_size == max(vocab.values()) + 1
    info = a.info()
    for key in ("path", "name", "sha256", "vocab_size", "eod_id", "pad_id"):
        assert key in info


def test_hf_encode_matches_the_rust_tokenizer(bpe_tokenizer, corpus_texts):
    from tokenizers import Tokenizer

    tok = load_tokenizer(bpe_tokenizer)
    raw = Tokenizer.from_file(tok.path)
    texts = corpus_texts[:20]
    want = [e.ids for e in raw.encode_batch(texts, add_special_tokens=False)]
    assert tok.encode_batch(texts) == want
    flat, lengths = tok.encode_batch_flat(texts, append_id=tok.eod_id)
    assert lengths.tolist() == [len(w) + 1 for w in want]
    assert flat.tolist() == [i for w in want for i in w + [tok.eod_id]]
    assert tok.decode(want[0]) == texts[0]


def test_literal_eod_text_is_not_an_eod(bpe_tokenizer):
    tok = load_tokenizer(bpe_tokenizer)
    ids = tok.encode_batch(["before <|endoftext|> after"])[0]
    assert tok.eod_id not in ids
    assert tok.decode(ids) == "before <|endoftext|> after"


def test_eod_override_and_errors(bpe_tokenizer, tmp_path):
    tok = load_tokenizer(bpe_tokenizer, eod_token="the")
    assert tok.eod_token == "the" and tok.eod_id == tok.encode_batch(["the"])[0][0]
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        load_tokenizer(bpe_tokenizer, eod_token="<|no such token|>")
    # A tokenizer without any document-end token: the error names the file.
    data = json.load(open(os.path.join(bpe_tokenizer, "tokenizer.json")))
    data["added_tokens"] = []
    data["model"]["vocab"].pop("<|endoftext|>")
    bad = tmp_path / "noeod.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match="noeod.json.*--eod-token"):
        load_tokenizer(str(bad))
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(TokenizerError, match="unknown tokenizer format"):
        load_tokenizer(str(tmp_path / "x.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path / "empty"))


def test_sentencepiece(sp_tokenizer, corpus_texts):
    import sentencepiece as spm

    tok = load_tokenizer(sp_tokenizer)
    assert isinstance(tok, SentencePieceTokenizer)
    sp = spm.SentencePieceProcessor(model_file=sp_tokenizer)
    assert tok.eod_id == sp.eos_id() and tok.eod_token == "</s>"
    assert tok.vocab_size == sp.get_piece_size()
    assert tok.sha256 == sha(sp_tokenizer) and tok.name == "tiny"
    texts = corpus_texts[:10]
    assert tok.encode_batch(texts) == [sp.encode(t) for t in texts]
    assert tok.decode(tok.encode_batch(texts[:1])[0]) == texts[0]


def test_token_surfaces_keep_leading_spaces(bpe_tokenizer, sp_tokenizer):
    hf = load_tokenizer(bpe_tokenizer)
    surf = hf.token_surfaces()
    assert len(surf) == hf.vocab_size
    the = hf.encode_batch([" the"])[0]
    assert len(the) == 1 and surf[the[0]] == " the"
    assert surf[hf.eod_id] == ""  # special tokens contribute no text
    sp = load_tokenizer(sp_tokenizer)
    surf = sp.token_surfaces()
    ids = sp.encode_batch(["x the"])[0]  # "▁the" is decoded without its space at text start
    assert surf[ids[-1]].startswith(" ") and surf[ids[-1]].strip() in "the"


def test_the_unknown_piece_is_no_sentence_boundary(sp_tokenizer):
    """sentencepiece decodes <unk> as " ⁇ ": not a sentence end, nor a space before a word."""
    import sentencepiece as spm

    from megatron_miniplm.data.boundaries import BoundaryTables

    unk = spm.SentencePieceProcessor(model_file=sp_tokenizer).unk_id()
    tok = load_tokenizer(sp_tokenizer)
    assert tok.decode([unk]).strip() == "⁇"
    tables = BoundaryTables.from_tokenizer(tok)
    assert not tables.final_punct[unk] and not tables.space_start[unk] and not tables.ends[unk]
