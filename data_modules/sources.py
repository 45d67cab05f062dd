"""Reading records from local files, a `datasets` Dataset saved to disk, or a hub dataset name.

Every record comes back as ``(line, dict)`` where ``line`` is the 1-based line of a JSONL file or
the 1-based row of any other source, so that later errors can name where the bad record is.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from llama2_lit.errors import DataError, UserError


def iter_records(path: str, split: str = "train") -> Iterator[tuple[int, dict]]:
    """Yield ``(line_or_row, record)`` from ``path``.

    ``path`` may be a ``.jsonl`` file, a ``.json`` file (a list of objects, or ``{"data": [...]}``),
    a ``.parquet`` file, a folder written by ``datasets.Dataset.save_to_disk`` (or a DatasetDict,
    whose ``split`` is read), or a hub dataset id (only tried when no local path of that name exists).
    """
    p = Path(os.path.expanduser(str(path)))
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            yield from _iter_jsonl(p)
        elif suffix == ".json":
            yield from _iter_json(p)
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


def _iter_jsonl(p: Path) -> Iterator[tuple[int, dict]]:
    with p.open(encoding="utf-8") as f:
        for i, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(str(p), i, None, f"malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(str(p), i, None, f"expected a JSON object, got {type(rec).__name__}")
            yield i, rec


def _iter_json(p: Path) -> Iterator[tuple[int, dict]]:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(str(p), e.lineno, None, f"malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(str(p), None, None, "expected a JSON list of objects (or {\"data\": [...]})")
    for i, rec in enumerate(data, start=1):
        if not isinstance(rec, dict):
            raise DataError(str(p), i, None, f"row {i}: expected an object, got {type(rec).__name__}")
        yield i, rec


def _iter_dataset(ds, name: str) -> Iterator[tuple[int, dict]]:
    for i, rec in enumerate(ds, start=1):
        yield i, dict(rec)


def _load_parquet(p: Path):
    import datasets

    return datasets.Dataset.from_parquet(str(p))


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
