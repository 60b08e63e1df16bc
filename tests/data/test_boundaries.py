"""Sentence-boundary tables derived from a vocabulary."""
import numpy as np
import pytest

from megatron_miniplm.data.boundaries import BoundaryTables, is_sentence_final
from megatron_miniplm.data.tokenizer import load_tokenizer


@pytest.mark.parametrize("surface", [".", "!", "?", "...", ' ."', ".)", "?!", "。", "！", "…", ".”"])
def test_sentence_final(surface):
    assert is_sentence_final(surface)


@pytest.mark.parametrize("surface", ["", " ", ",", ";", ":", "a.", "Mr", "-", '"', ".a", "3."])
def test_not_sentence_final(surface):
    assert not is_sentence_final(surface)


def test_flags_follow_the_three_rules():
    # ids:          0      1      2     3      4        5       6
    surfaces = ["<eod>", "Hi", " there", ".", "\n", "end\nx", "word"]
    surfaces[0] = ""  # special token: no text
    t = BoundaryTables.from_surfaces(surfaces, eod_id=0)
    assert t.ends.tolist() == [True, False, False, False, True, True, False]
    assert t.final_punct.tolist() == [False, False, False, True, False, False, False]
    assert t.space_start.tolist() == [False, False, True, False, False, False, False]
    tokens = np.array([1, 3, 2, 3, 6, 3, 4, 1, 5, 1, 3, 0])
    #                  Hi .  _t .  w  .  \n Hi e\nx Hi . eod
    want = [False, True, False, False, False, False, True, False, True, False, False, True]
    # "." before " there": boundary; "." before "word": not; "." before "\n": not
    # (the newline itself is); "." before EOD: not (EOD is).
    assert t.flags(tokens).tolist() == want
    assert t.flags(np.array([3])).tolist() == [False]
    assert t.flags(np.array([], dtype=np.int64)).tolist() == []


def test_tables_from_a_real_vocabulary(bpe_tokenizer, sp_tokenizer):
    for path in (bpe_tokenizer, sp_tokenizer):
        tok = load_tokenizer(path)
        t = BoundaryTables.from_tokenizer(tok)
        assert len(t.ends) == tok.vocab_size
        assert t.ends[tok.eod_id] and not t.space_start[tok.eod_id]
        nl = tok.encode_batch(["a\nb"])[0]
        assert any(t.ends[i] for i in nl)
        dot = tok.encode_batch(["a."])[0][-1]
        assert t.final_punct[dot]
        the = tok.encode_batch(["a the"])[0][-1]
        assert t.space_start[the] and not t.final_punct[the]
        s = t.summary()
        assert s["sentence_final"] >= 1 and s["newline_or_eod"] >= 2 and len(s["sha256"]) == 64
