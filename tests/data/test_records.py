"""Record parsing: every bad line gets the right reason and line number."""
import json

import pytest

from megatron_miniplm.data.records import InputError, SkipReason, parse_block, parse_key

TEXT, DOMAIN = parse_key("text"), parse_key("meta.pile_set_name")


def rec(text="hello", domain="A"):
    return json.dumps({"text": text, "meta": {"pile_set_name": domain}})


BAD_LINES = [
    ("{not json", SkipReason.INVALID_JSON),
    ("", SkipReason.INVALID_JSON),  # blank line
    ('["a list"]', SkipReason.NOT_AN_OBJECT),
    ('{"meta": {"pile_set_name": "A"}}', SkipReason.MISSING_KEY),
    ('{"text": "t"}', SkipReason.MISSING_KEY),  # no domain
    ('{"text": "t", "meta": "A"}', SkipReason.MISSING_KEY),  # meta is not an object
    ('{"text": 5, "meta": {"pile_set_name": "A"}}', SkipReason.NOT_A_STRING),
    ('{"text": null, "meta": {"pile_set_name": "A"}}', SkipReason.NOT_A_STRING),
    ('{"text": "t", "meta": {"pile_set_name": 3}}', SkipReason.NOT_A_STRING),
    ('{"text": "", "meta": {"pile_set_name": "A"}}', SkipReason.EMPTY_TEXT),
    ('{"text": "a\\ud800b", "meta": {"pile_set_name": "A"}}', SkipReason.INVALID_UTF8),
    # Valid JSON the json module cannot hold: found by benchmarks/fuzz_inputs.py.
    ('{"text": "t", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", SkipReason.INVALID_JSON),  # RecursionError
    ('{"text": "t", "meta": {"pile_set_name": "A"}, "n": ' + "7" * 5000 + "}", SkipReason.INVALID_JSON),
]


@pytest.mark.parametrize("line,reason", BAD_LINES)
def test_each_bad_line_has_its_reason(line, reason):
    block = "\n".join([rec("one"), line, rec("three")]).encode() + b"\n"
    out = parse_block(block, 10, TEXT, DOMAIN)
    assert out.num_lines == 3
    assert out.texts == ["one", "three"]
    assert [(b.line, b.reason) for b in out.bad] == [(11, reason)]
    assert str(InputError("f.jsonl", out.bad[0])).startswith(f"f.jsonl:11: {reason.value}: ")


def test_invalid_utf8_bytes():
    block = rec("one").encode() + b"\n" + b'{"text": "caf\xe9"}\n'
    out = parse_block(block, 1, TEXT, None)
    assert out.texts == ["one"]
    assert out.bad[0].line == 2 and out.bad[0].reason is SkipReason.INVALID_UTF8
    assert "column 14" in out.bad[0].detail


def test_stop_at_first_error():
    block = "\n".join(["{", rec("x"), "{"]).encode()
    assert len(parse_block(block, 1, TEXT, DOMAIN).bad) == 2
    out = parse_block(block, 1, TEXT, DOMAIN, stop_at_first_error=True)
    assert [b.line for b in out.bad] == [1] and out.texts == []


def test_keys_and_domains():
    lines = [
        json.dumps({"text": "a", "meta": {"pile_set_name": "X"}}),
        json.dumps({"text": "b", "meta.pile_set_name": "Y"}),  # a literal dotted key
        json.dumps({"content": "c", "src": "Z"}) + "\r",  # CRLF line ending
    ]
    out = parse_block("\n".join(lines[:2]).encode(), 1, TEXT, DOMAIN)
    assert out.texts == ["a", "b"] and out.domains == ["X", "Y"] and not out.bad
    out = parse_block(lines[2].encode(), 1, parse_key("content"), parse_key("src"))
    assert out.texts == ["c"] and out.domains == ["Z"]
    out = parse_block(lines[2].encode(), 1, parse_key("content"), parse_key(""), default_domain="all")
    assert out.domains == ["all"]
    # Unicode and escapes survive; the last line may lack its newline.
    out = parse_block(rec("数据 \\n é").encode() + b"\n" + rec("z").encode(), 1, TEXT, DOMAIN)
    assert out.texts == ["数据 \\n é", "z"] and out.num_lines == 2


def test_the_error_is_one_line_whatever_the_detail():
    """pyarrow's messages span lines ("...Invalid data\nDeserializing page header failed."),
    found by benchmarks/fuzz_inputs.py on flipped Parquet bytes: the tools print one line."""
    from megatron_miniplm.data.records import BadRecord

    bad = BadRecord(12, SkipReason.CORRUPT_INPUT, "cannot read row group 11: Invalid data\nDeserializing page header failed.")
    message = str(InputError("f.parquet", bad, rows=True))
    assert message == "f.parquet: row 12: corrupt_input: cannot read row group 11: Invalid data Deserializing page header failed."
