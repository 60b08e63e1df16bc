"""JSONL record parsing and validation: every rejected line gets a reason.

A block of complete lines goes in; the documents' texts and domains come out, plus one
`BadRecord` (line number, reason, detail) per line that cannot be used. The caller's
`--on-error` policy decides whether a bad record stops the run or is counted and skipped.
Parquet and `datasets` rows are validated by data/arrow_reader.py with the same reasons,
a row number in place of the line number.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum

from megatron_miniplm.errors import UserError


DEFAULT_DOMAIN = "default"  # every document's domain when there is no domain key


class SkipReason(str, Enum):
    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_KEY = "missing_key"
    NOT_A_STRING = "not_a_string"
    INVALID_UTF8 = "invalid_utf8"
    EMPTY_TEXT = "empty_text"
    TRUNCATED_INPUT = "truncated_input"  # a .gz/.zst stream that ends early
    CORRUPT_INPUT = "corrupt_input"  # a .gz/.zst stream that cannot be decoded; an unreadable Parquet/Arrow file


@dataclass(frozen=True)
class BadRecord:
    line: int  # 1-based line number in the (decompressed) input file; row number for Parquet/Arrow
    reason: SkipReason
    detail: str


class InputError(UserError, ValueError):
    """Bad input under --on-error fail: names the file, the line (`path:N: ...`) or, for
    Parquet/Arrow inputs (`rows`), the row (`path: row N: ...`), and the reason."""

    def __init__(self, path: str, record: BadRecord, rows: bool = False):
        self.path, self.record = path, record
        where = f"{path}: row {record.line}" if rows else f"{path}:{record.line}"
        detail = " ".join(record.detail.split())  # a library's message may span lines (pyarrow's do)
        super().__init__(f"{where}: {record.reason.value}: {detail}")


@dataclass
class ParsedBlock:
    texts: list[str] = field(default_factory=list)
    domains: list[str] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)
    num_lines: int = 0


def parse_key(key: str | None) -> tuple[str, ...] | None:
    """'meta.pile_set_name' -> ('meta', 'pile_set_name'); '' or None: no key."""
    return tuple(key.split(".")) if key else None


def _lookup(obj: dict, key: tuple[str, ...]):
    dotted = ".".join(key)
    if len(key) > 1 and dotted in obj:  # a literal dotted key wins over a path
        return obj[dotted]
    for part in key:
        if not isinstance(obj, dict) or part not in obj:
            raise KeyError(dotted)
        obj = obj[part]
    return obj


def _has_lone_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def parse_block(
    block: bytes,
    first_line: int,
    text_key: tuple[str, ...],
    domain_key: tuple[str, ...] | None,
    default_domain: str = DEFAULT_DOMAIN,
    stop_at_first_error: bool = False,
) -> ParsedBlock:
    """Parse the lines of `block` (complete lines; the last may lack its newline)."""
    out = ParsedBlock()
    lines = block.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out.num_lines = len(lines)
    dotted_text, dotted_domain = ".".join(text_key), ".".join(domain_key or ())

    for offset, raw in enumerate(lines):
        line_no = first_line + offset
        bad = None
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad = BadRecord(line_no, SkipReason.INVALID_UTF8, f"invalid UTF-8 byte at column {e.start + 1}")
        else:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                detail = "blank line" if not line.strip() else f"{e.msg} at column {e.colno}"
                bad = BadRecord(line_no, SkipReason.INVALID_JSON, detail)
            except RecursionError:  # the decoder recurses once per nested array or object
                bad = BadRecord(line_no, SkipReason.INVALID_JSON, "arrays or objects nested too deeply to parse")
            except ValueError as e:  # valid JSON that Python refuses: an integer of thousands of digits
                bad = BadRecord(line_no, SkipReason.INVALID_JSON, f"cannot be parsed: {str(e).split(';')[0]}")
            else:
                bad = _check(obj, line_no, text_key, dotted_text, domain_key, dotted_domain, b"\\u" in raw, out, default_domain)
        if bad is not None:
            out.bad.append(bad)
            if stop_at_first_error:
                break
    return out


def _string_at(obj: dict, key: tuple[str, ...], dotted: str, line_no: int) -> str | BadRecord:
    """The string at `key`, or why there is none."""
    try:
        value = _lookup(obj, key)
    except KeyError:
        return BadRecord(line_no, SkipReason.MISSING_KEY, f"no key {dotted!r}")
    if not isinstance(value, str):
        return BadRecord(line_no, SkipReason.NOT_A_STRING, f"{dotted!r} is a JSON {type(value).__name__}, not a string")
    return value


def _check(obj, line_no, text_key, dotted_text, domain_key, dotted_domain, has_escapes, out, default_domain):
    """Append the record to `out`, or return why it cannot be used."""
    if not isinstance(obj, dict):
        return BadRecord(line_no, SkipReason.NOT_AN_OBJECT, f"a JSON {type(obj).__name__}, not an object")
    text = _string_at(obj, text_key, dotted_text, line_no)
    if isinstance(text, BadRecord):
        return text
    domain = default_domain if domain_key is None else _string_at(obj, domain_key, dotted_domain, line_no)
    if isinstance(domain, BadRecord):
        return domain
    if not text:
        return BadRecord(line_no, SkipReason.EMPTY_TEXT, f"{dotted_text!r} is empty")
    # JSON escapes can spell lone surrogates ("\ud800"): valid JSON, not encodable text.
    if has_escapes and (_has_lone_surrogate(text) or _has_lone_surrogate(domain)):
        return BadRecord(line_no, SkipReason.INVALID_UTF8, "lone UTF-16 surrogate escape in a string")
    out.texts.append(text)
    out.domains.append(domain)
    return None
