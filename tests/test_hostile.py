"""Hostile input (issue #8): every record parser parses a record or rejects it with a ``UserError`` / ``DataError``
that names the file, the line and the field; no other exception type escapes. Property-based (hypothesis), plus
the safe-loading and path-escape checks.

Inputs: random bytes, broken UTF-8, a BOM, CRLF, trailing garbage, 1 MB fields, control characters and NUL, lone
surrogates (``"\\ud800"`` escapes), empty strings, wrong types (numbers, huge integers, NaN, lists, null, nested
objects), missing keys, duplicated ids. ``derandomize=True``: the same examples on every run (CI stays
deterministic); raise ``HOSTILE_EXAMPLES`` (a multiplier, default 1) to explore further.
"""
from __future__ import annotations

import atexit
import itertools
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from data_modules import annotations, preferences, records
from data_modules.prompts import PromptDataModule
from data_modules.sources import iter_records
from llama2_lit.errors import DataError, UserError

ROOT = Path(__file__).resolve().parents[1]
_SCALE = int(os.environ.get("HOSTILE_EXAMPLES", "1"))
_TMP = Path(tempfile.mkdtemp(prefix="hostile-"))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)
_N = itertools.count()
_LAST: list[Path] = []


def fuzz(n: int):
    return settings(max_examples=n * _SCALE, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example])


def _file(suffix: str, data: bytes | str) -> Path:
    """A fresh file, the previous one deleted (megabytes each; datasets caches Parquet reads by path: never reuse
    a name)."""
    while _LAST:
        _LAST.pop().unlink(missing_ok=True)
    p = _TMP / f"f{next(_N)}{suffix}"
    p.write_bytes(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    _LAST.append(p)
    return p


# ------------------------------------------------------------------------------------------------ strategies

MB = 1 << 20
HUGE = ["x" * MB, "\x00" * MB, "é" * (MB // 2), "\n\nHuman: " + "a" * MB + "\n\nAssistant: b"]
SURROGATE = st.integers(0xD800, 0xDFFF).map(chr)
HH = ["\n\nHuman: hi\n\nAssistant: yo", "Human: q\n\nAssistant:", "\n\nAssistant: only", "\n\nHuman:",
      "x\n\nHuman: a\n\nAssistant: b", "\n\nHuman: a\n\nHuman: b\n\nAssistant: c\n\nAssistant: d"]
ROLES = ["user", "assistant", "system", "tool", "", "USER"]



def pick(*constants) -> st.SearchStrategy:
    """``sampled_from`` without the constants in the strategy's repr (hypothesis prints it: 1 MB strings)."""
    return st.integers(0, len(constants) - 1).map(constants.__getitem__)


small_texts = st.one_of(
    st.text(max_size=30),                                                      # any code point but surrogates
    st.text(alphabet=st.sampled_from("\x00\x01\x1b\x7f\r\n\t \u2028\u2029\ufeff\u200b"), max_size=8),
    pick("", " ", "\n", "\x00", "null", "unsure", "Slightly Better", "a", "b", "3", "²", "٣", "0" * 5000 + "3",
         "../../etc/passwd", "C:\\x", *HH),
    st.tuples(st.text(max_size=4), SURROGATE, st.text(max_size=4)).map("".join),  # a lone surrogate
)
texts = small_texts | pick(*HUGE)


def json_values(strings: st.SearchStrategy[str]) -> st.SearchStrategy:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(10 ** 300, 10 ** 400),
                        st.floats(allow_nan=True, allow_infinity=True), strings)
    return st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                                   max_size=3), max_leaves=6)


values = json_values(texts)
small_values = json_values(small_texts)  # where a 1 MB field would be tokenized (seconds each)
messages = st.lists(st.one_of(st.fixed_dictionaries({}, optional={"role": st.sampled_from(ROLES) | values,
                                                                  "content": texts | values}), values), max_size=4)
plain = st.text(max_size=20).map(lambda t: "w" + t)  # a usable field: not empty, not blank
plain_messages = st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), plain), max_size=3).map(
    lambda turns: [{"role": r, "content": c} for r, c in turns])


def rec(**fields) -> st.SearchStrategy[dict]:
    """Records with any subset of ``fields`` (missing keys), each plausible or hostile, plus stray keys."""
    return st.builds(lambda d, extra: {**extra, **d},
                     st.fixed_dictionaries({}, optional={k: st.one_of(s, values) for k, s in fields.items()}),
                     st.dictionaries(st.text(max_size=6), values, max_size=2))


def _mutate(record: dict, over: dict, drop: set) -> dict:
    return {k: v for k, v in {**record, **over}.items() if k not in drop}


def mutated(base: st.SearchStrategy[dict], keys, hostile: st.SearchStrategy = values) -> st.SearchStrategy[dict]:
    """A valid record from ``base`` with up to two fields made hostile and one dropped (or none: valid)."""
    keys = sorted(keys)
    return st.builds(_mutate, base, st.dictionaries(st.sampled_from(keys), hostile, max_size=2),
                     st.sets(st.sampled_from(keys), max_size=1))


def rejected_properly(e: DataError, path, line, field_required: bool = True) -> None:
    """The error names the file, the line and (for a record) the field, in its message too."""
    assert isinstance(e, DataError), type(e)
    assert e.path == str(path) and e.line == line, (e.path, e.line)
    assert str(e).startswith(f"{path}:{line}:"), str(e)
    if field_required:
        assert e.field and f"field '{e.field}'" in str(e), str(e)
    msg = str(e)  # printed as one line by the entry point: short, and printable as UTF-8
    assert "\n" not in msg and len(msg) < len(str(path)) + 400, msg[:500]
    msg.encode("utf-8")


# ------------------------------------------------------------------------------------------ SFT record formats

SFT_FIELDS = dict(instruction=plain, input=plain | st.just(""), output=plain, prompt=plain, response=plain, text=plain,
                  messages=plain_messages.map(lambda m: m + [{"role": "assistant", "content": "ok"}]))
SFT_RECORD = rec(**{**SFT_FIELDS, "messages": messages}) | mutated(st.fixed_dictionaries(SFT_FIELDS), SFT_FIELDS)


@fuzz(300)
@given(record=SFT_RECORD, fmt=st.sampled_from(records.FORMATS))
@example(record={"instruction": "hi", "output": "x" * MB}, fmt="alpaca")
@example(record={"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ["a"]}]},
         fmt="messages")
@example(record={"prompt": 1e400, "response": None}, fmt="prompt_response")
def test_sft_records_parse_or_name_the_field(record, fmt):
    try:
        if fmt == "text":
            out = records.text_of(record, "text", "d.jsonl", 7)
            assert isinstance(out, str) and out.strip()
        else:
            msgs = records.to_messages(record, fmt, "d.jsonl", 7)
            assert msgs and msgs[-1]["role"] == "assistant"
            assert all(m["role"] in ("system", "user", "assistant") and isinstance(m["content"], str) and
                       m["content"].strip() for m in msgs)
        event(f"{fmt}: parsed")
    except DataError as e:
        rejected_properly(e, "d.jsonl", 7)
        event(f"{fmt}: rejected")


# ----------------------------------------------------------------------------------------------- preferences

PAIR_EXTRAS = dict(rating=st.sampled_from([*preferences.RATINGS, "unsure", 3, 0, 2.0, "meh", 7, 10 ** 400, -1]),
                   is_safety=st.sampled_from([True, False, 0, 1, 2, "yes"]),
                   margin=st.sampled_from([0.5, 1, float("nan"), float("inf"), 10 ** 400, "1", True]), source=texts)
_turn = "\n\nHuman: {}\n\nAssistant: {}".format


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


PAIR_BASES = st.builds(lambda base, extra: {**base, **extra}, st.one_of(
    st.builds(lambda p, a, b: {"prompt": p, "chosen": a, "rejected": b + "!"},                      # flat
              plain | st.sampled_from(HH), plain, plain),
    st.builds(lambda ctx, q, a, b: {"chosen": ctx + [_msg("user", q), _msg("assistant", a)],        # messages
                                    "rejected": ctx + [_msg("user", q), _msg("assistant", b + "!")]},
              plain_messages, plain, plain, plain),
    st.builds(lambda ctx, a, b: {"prompt": ctx + [_msg("user", "q")], "chosen": a,                  # prompt list
                                 "rejected": [_msg("assistant", b + "!")]}, plain_messages, plain, plain),
    st.builds(lambda q, a, b: {"chosen": _turn(q, a), "rejected": _turn(q, b + "!")}, plain, plain, plain),  # HH
), st.fixed_dictionaries({}, optional=PAIR_EXTRAS))
PAIR_RECORD = (rec(prompt=texts | messages, chosen=texts | messages, rejected=texts | messages, **PAIR_EXTRAS)
               | mutated(PAIR_BASES, ["prompt", "chosen", "rejected", *PAIR_EXTRAS]))


@fuzz(400)
@given(record=PAIR_RECORD, fmt=st.sampled_from(preferences.FORMATS))
@example(record={"prompt": "p", "chosen": "a", "rejected": "b", "rating": 10 ** 400}, fmt="auto")  # OverflowError
@example(record={"prompt": "p", "chosen": "a", "rejected": "b", "margin": 10 ** 400}, fmt="auto")  # OverflowError
@example(record={"prompt": "p", "chosen": "a", "rejected": "b", "rating": "0" * 5000 + "3"}, fmt="flat")
@example(record={"chosen": "\n\nHuman: " + "q" * MB + "\n\nAssistant: a",
                 "rejected": "\n\nHuman: " + "q" * MB + "\n\nAssistant: b"}, fmt="hh")
def test_preference_rows_parse_or_name_the_field(record, fmt):
    try:
        pair = preferences.to_pair(record, fmt=fmt, path="p.jsonl", line=3)
    except DataError as e:
        rejected_properly(e, "p.jsonl", 3)
        assert isinstance(e, preferences.PairError) and e.reason
        event(f"rejected: {e.reason}")
        if fmt != "hh" or e.field not in ("chosen", "rejected"):
            assert e.field in record or e.field in ("prompt", "chosen", "rejected"), str(e)
        return
    assert pair.prompt and pair.prompt[-1]["role"] == "user"
    assert all(isinstance(m["content"], str) for m in pair.prompt)
    assert isinstance(pair.chosen, str) and isinstance(pair.rejected, str)
    assert pair.chosen and pair.rejected and pair.chosen != pair.rejected
    assert pair.rating in preferences.BUCKETS
    assert pair.margin is None or pair.margin == pair.margin and abs(pair.margin) != float("inf")
    assert pair.where == "p.jsonl:3"
    event(f"parsed ({fmt})")


@pytest.mark.parametrize("value", [10 ** 400, -10 ** 400, "²", "٣", float("nan"), [3], {"r": 3}, "x" * MB])
def test_parse_rating_refuses_odd_values_with_the_choices(value):
    # before: 10**400 raised OverflowError (float() of a huge int); "²" an int() ValueError ("invalid literal")
    with pytest.raises(ValueError, match=r"unknown rating .*\(expected one of") as e:
        preferences.parse_rating(value)
    assert len(str(e.value)) < 300


def test_parse_rating_digit_strings_without_int_limits():
    # before: int() of a 5001-digit string raised "Exceeds the limit (4300 digits)"
    assert preferences.parse_rating("0" * 5000 + "3") == "significantly_better"
    assert preferences.parse_rating(" 2 ") == "better" and preferences.parse_rating(3.0) == "significantly_better"


# ----------------------------------------------------------------------------------------------- annotations

ANN_RECORD = rec(id=texts, prompt_id=texts, prompt=texts, is_safety=st.sampled_from([True, False, 0, 1, "no"]),
                 response_a=texts, response_b=texts, source_a=texts, source_b=texts,
                 choice=st.sampled_from(["a", "b", " A ", None, "c"]),
                 rating=st.sampled_from([*preferences.RATINGS, "unsure", None, 2, 10 ** 400, "meh"]),
                 safety_label=st.sampled_from([*annotations.SAFETY_LABELS, None, "Both Safe", "mostly_safe"]))
ANN_BASE = st.builds(
    lambda p, a, b, safety, choice, rating, label: {
        **annotations.new_row(p, safety, a, b + "!", "s1", "s2"),
        **({"choice": choice, "rating": rating, "safety_label": label if safety else None} if choice else {})},
    plain, plain, plain, st.booleans(), st.sampled_from(["a", "b", None]), st.sampled_from(preferences.RATINGS),
    st.sampled_from(annotations.SAFETY_LABELS))
ANN_RECORD = ANN_RECORD | mutated(ANN_BASE, annotations.FIELDS)


@fuzz(300)
@given(record=ANN_RECORD | values)
@example(record={**annotations.new_row("p", False, "a", "b", "s1", "s2"), "choice": "a", "rating": 10 ** 400})
@example(record={"prompt": "\ud800"})  # before: UnicodeEncodeError from the prompt id's sha1
@example(record={**annotations.new_row("p", False, "a", "b", "s1", "s2"), "choice": "c" * MB})  # a 1 MB message
def test_annotation_rows_validate_or_name_every_field(record):
    row, errs = annotations.validate_row(record, "a.jsonl", 5)
    assert (row is None) == bool(errs)
    event("valid" if row is not None else f"{len(errs)} error(s)")
    for e in errs:
        rejected_properly(e, "a.jsonl", 5, field_required=isinstance(record, dict))
    if row is not None:
        assert all(isinstance(row[k], str) and row[k].strip() for k in ("id", "prompt", "response_a", "response_b"))
        assert row["choice"] in (None, "a", "b") and isinstance(row["is_safety"], bool)
        for p in annotations.to_pairs([row]):
            assert p["chosen"] != p["rejected"] and p["rating"] in preferences.RATINGS


# ------------------------------------------------------------------------------------------------ file level

def _line_bytes(kind: str, obj) -> bytes:
    """One physical line of a JSONL file (without its newline)."""
    if kind == "json":
        return json.dumps(obj).encode()
    if kind == "json_utf8":
        return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")  # raw lone surrogates too
    return {
        "truncated": b'{"prompt": "p", "chosen": "a"',
        "trailing_garbage": b'{"prompt": "p", "chosen": "a", "rejected": "b"} xyz',
        "two_objects": b'{"a": 1}{"b": 2}',
        "not_object": b"[1, 2, 3]",
        "bare_string": b'"just a string"',
        "bad_utf8": b'{"prompt": "p\xff\xfe", "chosen": "a", "rejected": "b"}',
        "overlong_utf8": b'{"prompt": "\xc0\xaf", "chosen": "a", "rejected": "b"}',
        "huge_int": b"1" * 5000,
        "deep": b"[" * 100_000,
        "raw_nul": b'{"prompt": "a\x00b", "chosen": "a", "rejected": "b"}',
        "lone_cr": b'{"prompt": "p",\r"chosen": "a", "rejected": "b"}',
        "random": b"#" + (bytes(obj) if isinstance(obj, list) else b"\x00\xff").replace(b"\n", b" "),
    }[kind]


GARBAGE = ["truncated", "trailing_garbage", "two_objects", "not_object", "bare_string", "bad_utf8", "overlong_utf8",
           "huge_int", "deep", "raw_nul", "lone_cr", "random"]
jsonl_lines = st.lists(st.one_of(
    st.tuples(st.sampled_from(["json", "json_utf8"]), values | PAIR_RECORD),
    st.tuples(st.sampled_from(GARBAGE), st.lists(st.integers(0, 255), max_size=40)),
    st.tuples(st.just("blank"), st.sampled_from([b"", b"   ", b"\t", b"\r"])),
), max_size=8)


def _jsonl(lines, bom: bool, crlf: bool, final_newline: bool) -> bytes:
    body = [obj if kind == "blank" else _line_bytes(kind, obj) for kind, obj in lines]
    data = (b"\r\n" if crlf else b"\n").join(body) + (b"\n" if final_newline and body else b"")
    return (b"\xef\xbb\xbf" if bom else b"") + data


def _consume(path):
    """Every record of ``path``; a UserError ends it (DataErrors name a line of the file and it)."""
    got = []
    try:
        for line, r in iter_records(str(path)):
            assert isinstance(line, int) and line >= 1 and isinstance(r, dict)
            got.append((line, r))
    except DataError as e:
        assert e.path == str(path) and str(e).startswith(str(path)), str(e)
        return got, e
    except UserError as e:
        assert str(path) in str(e), str(e)
        return got, e
    return got, None


@fuzz(250)
@given(lines=jsonl_lines, bom=st.booleans(), crlf=st.booleans(), final_newline=st.booleans())
@example(lines=[("json", {"a": 1})], bom=True, crlf=True, final_newline=True)        # before: BOM = malformed
@example(lines=[("bad_utf8", None)], bom=False, crlf=False, final_newline=True)       # UnicodeDecodeError
@example(lines=[("huge_int", None)], bom=False, crlf=False, final_newline=False)      # ValueError (int digits)
@example(lines=[("deep", None)], bom=False, crlf=False, final_newline=False)          # RecursionError
@example(lines=[("json", {"prompt": "\ud800"})], bom=False, crlf=False, final_newline=True)  # lone surrogate
@example(lines=[("lone_cr", None)], bom=False, crlf=False, final_newline=True)       # one record, not two lines
def test_jsonl_reader_yields_objects_or_names_the_line(lines, bom, crlf, final_newline):
    path = _file(".jsonl", _jsonl(lines, bom, crlf, final_newline))
    got, err = _consume(path)
    event("read whole" if err is None else f"stopped at a bad line: {err.message.split(' (')[0]}")
    if isinstance(err, DataError):
        assert 1 <= err.line <= len(lines), str(err)
        assert lines[err.line - 1][0] != "blank"
    # every line that is one JSON object without lone surrogates comes back, numbered as in the file
    for line, r in got:
        assert lines[line - 1][0] != "blank"
        assert _no_surrogates(r)
    if err is None:
        assert [line for line, _ in got] == [i + 1 for i, (kind, _) in enumerate(lines) if kind != "blank"]


def _no_surrogates(obj) -> bool:
    return not re.search("[\ud800-\udfff]", json.dumps(obj, ensure_ascii=False))


def test_jsonl_lines_end_at_newlines_only(tmp_path):
    # before: the text-mode reader also split at a lone "\r" (JSON whitespace), so the record below was read as two
    # malformed lines and every later line number was off by one; a BOM made line 1 malformed
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"a": 1,\r"b": 2}\r\n\r\n{"c": "\xe2\x80\xa8"}\n')
    assert list(iter_records(str(p))) == [(1, {"a": 1, "b": 2}), (3, {"c": "\u2028"})]


def test_unreadable_lines_are_skipped_and_reported_with_on_bad(tmp_path):
    p = tmp_path / "d.jsonl"
    lines = [b'{"a": 1}', b'{"a": "\xff"}', b"1" * 5000, b"[" * 5000, b'{"a": "\\udc00"}', b"[]", b'{"b": 2}']
    p.write_bytes(b"\n".join(lines) + b"\n")
    bad: list[DataError] = []
    assert list(iter_records(str(p), on_bad=bad.append)) == [(1, {"a": 1}), (7, {"b": 2})]
    assert [(e.line, e.field) for e in bad] == [(2, None), (3, None), (4, None), (5, "a"), (6, None)]
    assert [e.message.split(" (")[0] for e in bad] == [
        "not valid UTF-8", "malformed JSON", "malformed JSON", "holds a lone UTF-16 surrogate",
        "expected a JSON object, got list"]
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid UTF-8 \(byte 8 of the line"):
        list(iter_records(str(p)))


@pytest.mark.slow  # 16 s: a whole CLI start (tests/test_errors.py covers the DataError -> one line path)
def test_cli_bad_utf8_is_one_line_and_exit_2(tmp_path, cache_dir):
    import subprocess
    import sys

    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "\xc3(", "output": "b"}\n')
    r = subprocess.run([sys.executable, "-m", "llama2_lit", "stage=sft", "data=alpaca", f"data.path={p}",
                        f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path}/run"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"error: {p}:2: not valid UTF-8 (byte 18 of the line" in r.stderr, r.stderr[-2000:]


@fuzz(120)
@given(doc=values, wrap=st.booleans(), prefix=st.sampled_from([b"", b"\xef\xbb\xbf", b"\xff"]),
       suffix=st.sampled_from([b"", b"\n", b" garbage", b"\r\n]"]))
@example(doc=[{"a": "\ud800"}], wrap=False, prefix=b"", suffix=b"")
@example(doc=[{"a": 1}], wrap=True, prefix=b"\xef\xbb\xbf", suffix=b"\r\n")
def test_json_reader_yields_objects_or_names_the_line(doc, wrap, prefix, suffix):
    body = json.dumps({"data": doc} if wrap else doc, indent=1).encode("utf-8", "surrogatepass")
    path = _file(".json", prefix + body + suffix)
    got, err = _consume(path)
    if err is None:
        assert all(_no_surrogates(r) for _, r in got)


@fuzz(40)
@given(data=st.binary(max_size=200) | st.sampled_from([b"", b"PAR1", b"PAR1" + b"\x00" * 64 + b"PAR1"]))
def test_parquet_reader_refuses_random_bytes_with_a_user_error(data):
    got, err = _consume(_file(".parquet", data))
    assert got == [] and isinstance(err, UserError)


def test_parquet_rows_of_wrong_types_are_rejected_naming_the_row_and_field():
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {"prompt": [pa.array([1, 2]), pa.array([None, "p"]), pa.array([["a"], ["b"]]), pa.array([b"\xff", b"p"]),
                       pa.array([{"x": 1}, {"x": 2}]), pa.array(["", "p"])]}
    for i, col in enumerate(cols["prompt"]):
        p = _TMP / f"wrong{i}-{next(_N)}.parquet"
        pq.write_table(pa.table({"prompt": col, "chosen": ["a", "a"], "rejected": ["b", "b"]}), p)
        with pytest.raises(DataError) as e:
            preferences.read_pairs(p)
        rejected_properly(e.value, p, 1)
        with pytest.raises(DataError) as e:
            PromptDataModule(path=str(p)).prompts()
        rejected_properly(e.value, p, 1)
        assert e.value.message in ("is missing", "is empty") or e.value.message.startswith("must be a string, got")


# --------------------------------------------------------------------------- on_error=skip counts the bad rows

def _good_pair(i: int) -> dict:
    return {"prompt": f"question {i}", "chosen": f"good {i}", "rejected": f"bad {i}", "rating": "better"}


BAD_PAIR_ROWS = {  # each is refused, whatever the rest of the file holds
    "missing_chosen": lambda i: json.dumps({"prompt": f"q{i}", "rejected": "r"}).encode(),
    "chosen_number": lambda i: json.dumps({"prompt": f"q{i}", "chosen": 5, "rejected": "r"}).encode(),
    "chosen_null": lambda i: json.dumps({"prompt": f"q{i}", "chosen": None, "rejected": "r"}).encode(),
    "empty_chosen": lambda i: json.dumps({"prompt": f"q{i}", "chosen": " \x00 "[::2], "rejected": "r"}).encode(),
    "identical": lambda i: json.dumps({"prompt": f"q{i}", "chosen": "same", "rejected": " same "}).encode(),
    "bad_rating": lambda i: json.dumps({**_good_pair(i), "rating": "meh"}).encode(),
    "huge_rating": lambda i: json.dumps({**_good_pair(i), "rating": 10 ** 400}).encode(),
    "huge_margin": lambda i: json.dumps({**_good_pair(i), "margin": 10 ** 400}).encode(),
    "nan_margin": lambda i: json.dumps({**_good_pair(i), "margin": float("nan")}).encode(),
    "bad_safety": lambda i: json.dumps({**_good_pair(i), "is_safety": "yes"}).encode(),
    "prompt_dict_no_role": lambda i: json.dumps({"prompt": {"content": "q"}, "chosen": "a", "rejected": "b"}).encode(),
    "bad_role": lambda i: json.dumps({"prompt": [{"role": "tool", "content": "q"}], "chosen": "a",
                                      "rejected": "b"}).encode(),
    "surrogate": lambda i: json.dumps({**_good_pair(i), "chosen": "x\ud800"}).encode(),
    "malformed": lambda i: b'{"prompt": "q", "chosen": ',
    "not_object": lambda i: b"[1, 2]",
    "bad_utf8": lambda i: json.dumps(_good_pair(i)).encode().replace(b"good", b"g\xffood"),
    "huge_int_line": lambda i: b"1" * 5000,
}


@fuzz(60)
@given(kinds=st.lists(st.sampled_from(["good", "good_huge", *BAD_PAIR_ROWS]), min_size=1, max_size=12),
       crlf=st.booleans(), bom=st.booleans())
@example(kinds=["good", "malformed", "bad_utf8", "good"], crlf=False, bom=False)  # before: the bad line raised
def test_read_pairs_skip_counts_exactly_the_bad_rows(kinds, crlf, bom):
    lines = []
    for i, k in enumerate(kinds):
        if k == "good":
            lines.append(json.dumps(_good_pair(i), ensure_ascii=bool(i % 2)).encode())
        elif k == "good_huge":
            lines.append(json.dumps({**_good_pair(i), "chosen": "x" * MB}).encode())
        else:
            lines.append(BAD_PAIR_ROWS[k](i))
    path = _file(".jsonl", (b"\xef\xbb\xbf" if bom else b"") + (b"\r\n" if crlf else b"\n").join(lines) + b"\n")
    n_good = sum(k.startswith("good") for k in kinds)
    bad_lines = [i + 1 for i, k in enumerate(kinds) if not k.startswith("good")]
    if not n_good:
        with pytest.raises(UserError, match="no usable preference pairs"):
            preferences.read_pairs(path, on_error="skip")
    else:
        pairs, stats = preferences.read_pairs(path, on_error="skip")
        assert (stats["read"], stats["kept"], stats["skipped"]) == (len(kinds), n_good, len(bad_lines)), stats
        assert sum(stats["skipped_by_reason"].values()) == len(bad_lines)
        for msg in stats["first_error_by_reason"].values():
            assert re.match(rf"{re.escape(str(path))}:(\d+): ", msg) and int(msg.split(":")[1]) in bad_lines, msg
    if bad_lines:  # on_error=raise stops at the first bad row, naming it
        with pytest.raises(DataError) as e:
            preferences.read_pairs(path)
        assert e.value.line == bad_lines[0] and str(e.value).startswith(f"{path}:{bad_lines[0]}:")


def _ann(i: int, **over) -> dict:
    row = annotations.new_row(f"prompt {i}", False, f"answer a{i}", f"answer b{i}", "s1", "s2")
    return {**row, "choice": "a", "rating": "better", **over}


BAD_ANN_ROWS = {
    "missing_prompt": lambda i: json.dumps({k: v for k, v in _ann(i).items() if k != "prompt"}).encode(),
    "prompt_list": lambda i: json.dumps(_ann(i, prompt=["p"])).encode(),
    "empty_response": lambda i: json.dumps(_ann(i, response_b="")).encode(),
    "identical": lambda i: json.dumps(_ann(i, response_b=f"answer a{i}")).encode(),
    "bad_choice": lambda i: json.dumps(_ann(i, choice="c")).encode(),
    "rating_without_choice": lambda i: json.dumps(_ann(i, choice=None)).encode(),
    "huge_rating": lambda i: json.dumps(_ann(i, rating=10 ** 400)).encode(),
    "safety_without_label": lambda i: json.dumps(_ann(i, is_safety=True)).encode(),
    "surrogate": lambda i: json.dumps(_ann(i, response_a="\udfff")).encode(),
    "malformed": lambda i: b'{"id": ',
    "not_object": lambda i: b"null",
    "bad_utf8": lambda i: json.dumps(_ann(i)).encode().replace(b"prompt ", b"prompt \xc3"),
    "duplicate_id": lambda i: json.dumps(_ann(i, id="dup")).encode(),  # bad from its second occurrence on
}


@fuzz(50)
@given(kinds=st.lists(st.sampled_from(["good", "unannotated", *BAD_ANN_ROWS]), min_size=1, max_size=10),
       crlf=st.booleans(), bom=st.booleans())
@example(kinds=["good", "bad_utf8", "huge_rating", "good"], crlf=True, bom=True)  # before: Unicode/OverflowError
@example(kinds=["good", "surrogate"], crlf=False, bom=False)  # before: UnicodeEncodeError writing the pairs
def test_ingest_skip_counts_exactly_the_bad_rows(kinds, crlf, bom):
    lines, bad, good, unannotated, seen_dup = [], 0, 0, 0, False
    for i, k in enumerate(kinds):
        if k == "good":
            lines.append(json.dumps(_ann(i), ensure_ascii=False).encode())
            good += 1
        elif k == "unannotated":
            lines.append(json.dumps(_ann(i, choice=None, rating=None)).encode())
            unannotated += 1
        else:
            lines.append(BAD_ANN_ROWS[k](i))
            if k == "duplicate_id" and not seen_dup:
                seen_dup, good = True, good + 1
            else:
                bad += 1
    src = _file(".jsonl", (b"\xef\xbb\xbf" if bom else b"") + (b"\r\n" if crlf else b"\n").join(lines))
    rows, errors = annotations.read_annotations(src)
    assert len({e.line for e in errors}) == bad and len(rows) == good + unannotated
    for e in errors:
        rejected_properly(e, src, e.line, field_required=False)
    dst = _TMP / f"pairs{next(_N)}.jsonl"
    if not good:
        with pytest.raises(UserError):
            annotations.ingest(src, dst, on_error="skip")
        return
    stats = annotations.ingest(src, dst, on_error="skip")
    assert (stats["pairs"], stats["unannotated"], stats["bad_rows"]) == (good, unannotated, bad), stats
    pairs, st_ = preferences.read_pairs(dst)  # what ingestion writes reads back whole
    assert st_["kept"] == good


# -------------------------------------------------------------------------------------------- prompt files

PROMPT_RECORD = rec(prompt=texts, is_safety=st.sampled_from([True, False]) | values)


@fuzz(120)
@given(rows=st.lists(PROMPT_RECORD | values, max_size=6), dup=st.booleans())
@example(rows=[{"prompt": "a\ud800"}], dup=False)  # before: UnicodeEncodeError from the prompt id's sha1
@example(rows=[{"prompt": "same", "is_safety": True}], dup=True)
def test_prompt_files_parse_or_name_line_and_field(rows, dup):
    rows = rows + rows[:1] if dup else rows
    path = _file(".jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    dm = PromptDataModule(path=str(path))
    try:
        prompts = dm.prompts()
    except DataError as e:
        rejected_properly(e, path, e.line, field_required=isinstance(rows[e.line - 1], dict))
        return
    except UserError as e:
        assert str(path) in str(e) and ("no prompts" in str(e))
        return
    assert all(re.fullmatch(r"[0-9a-f]{16}", p.id) for p in prompts)  # ids become keys, never paths
    assert all(isinstance(p.text, str) and p.text.strip() and isinstance(p.is_safety, bool) for p in prompts)
    assert dm.stats["data/duplicate_prompts"] == len(rows) - len(prompts)


@fuzz(60)
@given(lines=jsonl_lines, bom=st.booleans(), crlf=st.booleans())
def test_prompt_reader_on_hostile_bytes(lines, bom, crlf):
    path = _file(".jsonl", _jsonl(lines, bom, crlf, True))
    try:
        PromptDataModule(path=str(path), prompt_field="prompt").prompts()
    except UserError as e:
        assert str(e).startswith(str(path)), str(e)


# ------------------------------------------------------------------------------ SFT data module, end to end

sft_lines = st.builds(  # two or three mostly valid records, and perhaps one garbage line among them
    lambda recs, bad, at: recs[:at] + ([bad] if bad else []) + recs[at:],
    st.lists(st.tuples(st.sampled_from(["json", "json_utf8"]), mutated(st.fixed_dictionaries(SFT_FIELDS), SFT_FIELDS,
                                                                             small_values)), min_size=2, max_size=3),
    st.none() | st.tuples(st.sampled_from(GARBAGE), st.lists(st.integers(0, 255), max_size=20)), st.integers(0, 3))


@fuzz(40)
@given(lines=sft_lines, fmt=st.sampled_from(["alpaca", "prompt_response", "messages"]))
@example(lines=[("json", {"prompt": "p\x00", "response": "\x00" * 1000})] * 2, fmt="prompt_response")
@example(lines=[("json", {"instruction": "\u2028\x1b[31m", "output": "é" * (MB // 4)})] * 2, fmt="alpaca")
def test_sft_data_module_on_hostile_files(tok, lines, fmt):
    from data_modules.sft import PackedSFTDataModule

    path = _file(".jsonl", _jsonl(lines, False, False, True))
    dm = PackedSFTDataModule(tok, path=str(path), format=fmt, seq_len=64, batch_size=2)
    try:
        dm.setup("fit")
        event("packed")
    except UserError as e:
        assert str(e).startswith(str(path)), str(e)
        event(f"rejected: {e.message.split(' (')[0] if isinstance(e, DataError) else 'no examples left'}")


# -------------------------------------------------------------------------------------------- path escape

@fuzz(60)
@given(settings_=st.dictionaries(st.text(max_size=8), values, max_size=4), iteration=st.integers(1, 10 ** 6))
def test_bag_sample_set_folders_stay_inside_the_bag(settings_, iteration):
    from llama2_lit.stages.rs_bag import Bag, settings_key

    key = settings_key(settings_)  # settings hold prompt text, model paths, ...: only their hash names a folder
    assert re.fullmatch(r"[0-9a-f]{12}", key)
    root = _TMP / "bag"
    d = Bag(root).set_dir(iteration, key)
    assert d.resolve().parent.parent == root.resolve() and ".." not in d.parts


def test_prompt_and_pair_ids_are_hex_whatever_the_text():
    for text in ["../../x", "/etc/passwd", "a/b\\c", "\x00", "..", "x" * MB]:
        assert re.fullmatch(r"[0-9a-f]{16}", annotations.prompt_id(text))
        assert re.fullmatch(r"[0-9a-f]{16}", annotations.pair_id(text, "a/..", "b"))


# ------------------------------------------------------------------------------------------- safe loading

def _source_files():
    for d in ("llama2_lit", "data_modules", "callbacks", "bench", "conf"):
        yield from (p for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".yaml") and p.is_file())


def test_remote_code_is_never_trusted_and_torch_load_is_weights_only():
    trusted, unsafe_loads = [], []
    for p in _source_files():
        text = p.read_text(encoding="utf-8")
        trusted += [f"{p}: {m.group(0)}" for m in re.finditer(r"trust_remote_code\s*[=:]\s*True", text)]
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                unsafe_loads.append(f"{p}: {m.group(0)}")
    assert not trusted and not unsafe_loads, trusted + unsafe_loads
    # every model load goes through models.loading.load_pretrained (safetensors only, no remote code); the GGUF
    # importer is the one other reader (a GGUF file, then its own safetensors staging folder)
    calls = re.findall(r"auto_cls\.from_pretrained\((.*?)\)\n", (ROOT / "llama2_lit/models/loading.py").read_text(), re.S)
    assert calls and all("use_safetensors=True" in c and "trust_remote_code=False" in c for c in calls), calls
    direct = [f"{p}: {m.group(0)}" for p in _source_files() if not p.name == "gguf_import.py"
              for m in re.finditer(r"(AutoModel\w*|For\w+|PreTrainedModel)\.from_pretrained\(", p.read_text())]
    assert not direct, direct


@pytest.fixture(scope="module")
def pickled_folders(tok, tmp_path_factory):
    """A causal LM and a reward model folder holding only a pickled ``pytorch_model.bin`` (no safetensors)."""
    import torch
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    from llama2_lit.models.loading import llama_config

    cfg = llama_config(tok, dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2))
    out = {}
    for name, cls, labels in (("lm", LlamaForCausalLM, None), ("rm", LlamaForSequenceClassification, 1)):
        if labels:
            cfg.num_labels = labels
        d = tmp_path_factory.mktemp(name)
        model = cls(cfg)
        model.save_pretrained(d)
        tok.save_pretrained(d)
        (d / "model.safetensors").unlink()
        torch.save(model.state_dict(), d / "pytorch_model.bin")
        assert sorted(f.name for f in d.glob("*.bin")) == ["pytorch_model.bin"]
        out[name] = d
    return out


def test_a_pickled_checkpoint_is_refused_with_a_user_error(tok, pickled_folders):
    from llama2_lit.models.loading import load_causal_lm
    from llama2_lit.models.reward import load_exported

    with pytest.raises(UserError) as e:
        load_causal_lm({"path": str(pickled_folders["lm"])}, tok)
    assert str(pickled_folders["lm"]) in str(e.value) and "holds only pickled weights" in str(e.value)
    with pytest.raises(UserError) as e:
        load_exported(pickled_folders["rm"])
    assert str(pickled_folders["rm"]) in str(e.value) and "holds only pickled weights" in str(e.value)
