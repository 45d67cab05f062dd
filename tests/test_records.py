import json

import pytest

from data_modules.records import to_messages
from data_modules.sources import iter_records
from llama2_lit.errors import DataError, UserError


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_alpaca_with_and_without_input():
    assert to_messages({"instruction": "Add", "input": "1 2", "output": "3"}, "alpaca") == [
        {"role": "user", "content": "Add\n\n1 2"}, {"role": "assistant", "content": "3"}]
    assert to_messages({"instruction": "Hi", "input": "", "output": "Hello"}, "alpaca")[0]["content"] == "Hi"


def test_prompt_response_custom_fields():
    m = to_messages({"q": "a?", "a": "b"}, "prompt_response", prompt_field="q", response_field="a")
    assert [x["content"] for x in m] == ["a?", "b"]


@pytest.mark.parametrize("rec,fmt,field,msg", [
    ({"instruction": "x"}, "alpaca", "output", "is missing"),
    ({"instruction": "x", "output": "  "}, "alpaca", "output", "is empty"),
    ({"prompt": "x", "response": 3}, "prompt_response", "response", "must be a string"),
    ({"messages": [{"role": "user", "content": "x"}]}, "messages", "messages", "must end with an assistant turn"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages", "messages[0].role", "must be one of"),
])
def test_bad_records_name_file_line_and_field(rec, fmt, field, msg):
    with pytest.raises(DataError) as e:
        to_messages(rec, fmt, "d.jsonl", 7)
    assert str(e.value).startswith(f"d.jsonl:7: field '{field}' {msg}")


def test_jsonl_lines_are_numbered_and_malformed_lines_named(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"a": 1}, "", {"a": 2}, "{not json"])
    it = iter_records(str(p))
    assert next(it) == (1, {"a": 1})
    assert next(it) == (3, {"a": 2})
    with pytest.raises(DataError, match=r"d.jsonl:4: malformed JSON"):
        next(it)


def test_json_parquet_and_saved_dataset_sources(tmp_path):
    import datasets

    rows = [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert [r for _, r in iter_records(str(tmp_path / "d.json"))] == rows
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    assert [r for _, r in iter_records(str(tmp_path / "d.parquet"))] == rows
    ds.save_to_disk(str(tmp_path / "saved"))
    assert [(i, r) for i, r in iter_records(str(tmp_path / "saved"))] == [(1, rows[0]), (2, rows[1])]


def test_missing_path_and_unknown_suffix(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        list(iter_records(str(tmp_path / "nope.jsonl")))
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(UserError, match="unknown data file type"):
        list(iter_records(str(tmp_path / "x.csv")))
