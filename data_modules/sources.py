"""Reading records from local files, a `datasets` Dataset saved to disk, or a hub dataset name.

Every record comes back as ``(line, dict)`` where ``line`` is the 1-based line of a JSONL file or
the 1-based row of any other source, so that later errors can name where the bad record is.
"""
from __future__ import annotations

import json
import os
import re
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from llama2_lit.errors import DataError, UserError


def iter_records(path: str, split: str = "train",
                 on_bad: Callable[[DataError], None] | None = None) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_or_row, record)`` from ``path``.

    ``path`` may be a ``.jsonl`` file, a ``.json`` file (a list of objects, or ``{"data": [...]}``),
    a ``.parquet`` file, a folder written by ``datasets.Dataset.save_to_disk`` (or a DatasetDict,
    whose ``split`` is read), or a hub dataset id (only tried when no local path of that name exists).

    Text is UTF-8 (a leading BOM is accepted). A line (JSONL) or row (JSON list) that cannot be read as
    one object (bad UTF-8, malformed JSON, not an object, a lone surrogate such as ``"\\ud800"``)
    raises a :class:`DataError` naming it; with ``on_bad``, that error is passed to ``on_bad`` instead
    and reading goes on. A file that cannot be read at all (a malformed ``.json`` document, a
    corrupt Parquet file) always raises.
    """
    p = Path(os.path.expanduser(str(path)))
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            yield from iter_jsonl(p, on_bad)
        elif suffix == ".json":
            yield from _iter_json(p, on_bad)
        elif suffix == ".parquet":
            yield from _iter_dataset(_load_parquet(p), str(p))
        else:
            raise UserError(f"{p}: unknown data file type '{suffix}' (expected .jsonl, .json, .parquet)")
    elif p.is_dir():
        yield from _iter_dataset(_load_from_disk(p, split), str(p))
    elif "/" in str(path) and not str(path).startswith((".", "/", "~")):
        yield from _iter_dataset(_load_hub(str(path), split), str(path))
    else:
        raise UserError(f"{path}: data path does not exist")


_BOM = b"\xef\xbb\xbf"
_SURROGATE = re.compile("[\ud800-\udfff]")


def _loads(text: str, path: str, line: int | None) -> Any:
    """``json.loads`` whose every failure (digit limit and nesting depth included) is a :class:`DataError`
    naming ``line`` (None: the line the error is on)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        msg, line = f"{e.msg} at column {e.colno}", e.lineno if line is None else line
    except ValueError as e:  # an integer beyond the int-to-str digit limit
        msg = str(e)
    except RecursionError:
        msg = "nested too deeply"
    raise DataError(path, line, None, f"malformed JSON ({msg})")


def lone_surrogate(obj: Any) -> str | None:
    """The field (``a.b[0]``) of the first key or string holding a lone UTF-16 surrogate (``"\\ud800"``
    escapes), which no UTF-8 file, tokenizer or hash can take; None if there is none."""
    stack = [("", obj)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return where or "<value>"
        elif isinstance(v, dict):
            for k, x in v.items():
                name = f"{where}.{_key(k)}" if where else _key(k)
                if isinstance(k, str) and _SURROGATE.search(k):
                    return name
                stack.append((name, x))
        elif isinstance(v, list):
            stack.extend((f"{where}[{i}]", x) for i, x in enumerate(v))
    return None


def brief(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for an error message: one line of about ``limit`` characters at most (a 1 MB field or a
    400-digit number is shortened), lone surrogates escaped."""
    if isinstance(value, str) and len(value) > limit:
        text = repr(value[:limit])  # escapes (a NUL is 4 characters) can make it 4x longer: cut it too
        return (text if len(text) <= limit + 2 else text[:limit]) + f"... ({len(value)} characters)"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10 ** limit:
        return f"<an integer of {len(str(abs(value)))} digits>"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _key(k: Any) -> str:
    return k if isinstance(k, str) and re.fullmatch(r"[\w.-]{1,40}", k, re.ASCII) else brief(k, 40)


def _record(rec: Any, path: str, line: int) -> dict:
    """``rec`` if it is an object whose text is valid Unicode, else a :class:`DataError` naming the line."""
    if not isinstance(rec, dict):
        raise DataError(path, line, None, f"expected a JSON object, got {type(rec).__name__}")
    field = lone_surrogate(rec)
    if field is not None:
        raise DataError(path, line, field, "holds a lone UTF-16 surrogate (an invalid '\\ud800'-style escape)")
    return rec


def _strip_bom(raw: bytes) -> bytes:
    return raw[len(_BOM):] if raw.startswith(_BOM) else raw


def iter_jsonl(path: str | os.PathLike,
               on_bad: Callable[[DataError], None] | None = None) -> Iterator[tuple[int, dict]]:
    """``(line, object)`` of each non-blank line of a JSON Lines file (see :func:`iter_records` for ``on_bad``).

    Lines end at ``\\n`` only (``\\r`` before it is JSON whitespace, so CRLF files read the same), so line
    numbers match what editors show and a stray ``\\r`` inside a line does not split a record.
    """
    p = Path(os.path.expanduser(str(path)))
    with p.open("rb") as f:
        lines = ((i, _strip_bom(raw) if i == 1 else raw) for i, raw in enumerate(f, start=1))
        reads = ((i, partial(_line_record, raw, str(p), i)) for i, raw in lines if raw.strip())
        yield from _tolerant(reads, on_bad)


def _line_record(raw: bytes, path: str, i: int) -> dict:
    """The record on line ``i`` (bytes ``raw``) of a JSON Lines file."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, i, None, f"not valid UTF-8 (byte {e.start + 1} of the line: {e.reason})") from None
    return _record(_loads(text, path, i), path, i)


def _tolerant(reads: Iterable[tuple[int, Callable[[], dict]]],
              on_bad: Callable[[DataError], None] | None) -> Iterator[tuple[int, dict]]:
    """``(i, read())`` for each ``(i, read)``; a ``DataError`` goes to ``on_bad`` (None: raised) and the row is skipped."""
    for i, read in reads:
        try:
            rec = read()
        except DataError as e:
            if on_bad is None:
                raise
            on_bad(e)
            continue
        yield i, rec


def _iter_json(p: Path, on_bad: Callable[[DataError], None] | None = None) -> Iterator[tuple[int, dict]]:
    raw = _strip_bom(p.read_bytes())
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(str(p), raw.count(b"\n", 0, e.start) + 1, None, f"not valid UTF-8 ({e.reason})") from None
    data = _loads(text, str(p), None)
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(str(p), None, None, "expected a JSON list of objects (or {\"data\": [...]})")
    yield from _tolerant(((i, partial(_record, rec, str(p), i)) for i, rec in enumerate(data, start=1)), on_bad)


def _iter_dataset(ds, name: str) -> Iterator[tuple[int, dict]]:
    for i, rec in enumerate(ds, start=1):
        yield i, dict(rec)


def _load_parquet(p: Path):
    import datasets
    import pyarrow as pa

    try:
        return datasets.Dataset.from_parquet(str(p))
    except (pa.ArrowException, OSError, ValueError, datasets.exceptions.DatasetGenerationError) as e:
        raise UserError(f"{p}: not a readable Parquet file ({type(e).__name__}: {e})") from None


def _load_from_disk(p: Path, split: str):
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError as e:
        raise UserError(f"{p}: not a dataset saved with save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{p}: split '{split}' not found (have {sorted(ds)})")
        ds = ds[split]
    return ds


def _load_hub(name: str, split: str):  # pragma: no cover - needs the network
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - any hub failure is the user's to fix
        raise UserError(f"{name}: could not load hub dataset (split '{split}'): {e}") from None
