"""Preference annotation files (Llama 2 §3.2.1): the rows ``stage=collect`` writes for annotators, the simulated
annotator that fills them on the synthetic world, and the validation and ingestion of annotated files into the
flat preference pairs ``data=pairs`` reads.

    python -m data_modules.annotations ingest <annotated.jsonl> <pairs.jsonl> [--on-error raise|skip]
    python -m data_modules.annotations check <annotated.jsonl>

One JSON object per line (``annotations.jsonl``):

    id            str   sha1 of the prompt and the two responses (16 hex; the same pair in either order, same id)
    prompt_id     str   sha1 of the prompt (16 hex): :func:`prompt_id`, the RS bag's key too
    prompt        str   the user message
    is_safety     bool  the prompt's safety tag (Llama 2's IS_SAFETY(p))
    response_a    str   first response shown
    response_b    str   second response shown (never equal to response_a, never empty)
    source_a      str   the model variant / temperature response_a came from (may be null in foreign files)
    source_b      str
    choice        null  the annotator's forced choice: "a" or "b"; null = not annotated (yet)
    rating        null  how much better the choice is: significantly_better | better | slightly_better |
                        negligibly_better (alias unsure; integers 3..0 also read)
    safety_label  null  safety prompts: preferred_safe_other_unsafe | both_safe | both_unsafe (the paper's three
                        bins; a chosen unsafe answer over a safe one is not a category: the paper excludes such pairs)

Validation (:func:`read_annotations`) reports every bad field of every row at once, as
``file:line: field 'rating' unknown rating 'meh' ...``: a missing key, a wrong type, an empty prompt or response,
identical responses, an unknown choice / rating / safety label, a choice without a rating (or a rating or label
without a choice), a safety prompt's choice without a safety label, a duplicated id, a malformed line. A row whose
``choice`` is null is *unannotated*: counted and skipped, not an error (a ``choice`` key that is absent is one).
Unknown extra keys are allowed (annotation tools add their own) and ignored.

Ingestion (:func:`to_pairs`) writes one flat pair per annotated row: ``id``, ``prompt_id``, ``prompt``, ``chosen``,
``rejected``, ``rating``, ``is_safety``, ``safety_label``, ``chosen_source``, ``rejected_source``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

from data_modules.preferences import RATINGS, SAFETY_LABELS, UNKNOWN, parse_rating, safety_bin
from data_modules.sources import brief, iter_jsonl, lone_surrogate
from data_modules.synthetic_pairs import DEFAULT_THRESHOLDS, annotate
from llama2_lit.errors import DataError, UserError
from llama2_lit.world import oracle as world

CHOICES = ("a", "b")
FIELDS = ("id", "prompt_id", "prompt", "is_safety", "response_a", "response_b", "source_a", "source_b", "choice",
          "rating", "safety_label")
PAIR_FIELDS = ("id", "prompt_id", "prompt", "chosen", "rejected", "rating", "is_safety", "safety_label",
               "chosen_source", "rejected_source")
ON_ERROR = ("raise", "skip")


def prompt_id(prompt: str) -> str:
    """sha1 of the prompt text, 16 hex: the key of a prompt in annotation files, the RS bag and prompt sets."""
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:16]


def pair_id(prompt: str, a: str, b: str) -> str:
    """A stable id of a pair: sha1 of the prompt and the two responses, whichever is shown first."""
    blob = json.dumps([prompt, sorted([a, b])], ensure_ascii=False)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]


def new_row(prompt: str, is_safety: bool, response_a: str, response_b: str, source_a: str | None,
            source_b: str | None) -> dict[str, Any]:
    """An annotation row with its annotation fields empty (the schema in the module docstring)."""
    return {"id": pair_id(prompt, response_a, response_b), "prompt_id": prompt_id(prompt), "prompt": prompt,
            "is_safety": bool(is_safety), "response_a": response_a, "response_b": response_b, "source_a": source_a,
            "source_b": source_b, "choice": None, "rating": None, "safety_label": None}


# ------------------------------------------------------------------------------------------ validation


def _label(value: Any) -> str:
    return re.sub(r"[\s\-]+", "_", value.strip().lower())


def validate_row(rec: Any, path: str | None = None, line: int | None = None) -> tuple[dict | None, list[DataError]]:
    """``(normalised row, [])`` for a good record, ``(None, errors)`` naming every bad field otherwise.

    Normalised: ``choice`` lower case, ``rating`` and ``safety_label`` canonical labels (or None), ``prompt_id``
    filled in when absent, sources None when absent; other keys kept as they are.
    """
    p = None if path is None else str(path)
    if not isinstance(rec, dict):
        return None, [DataError(p, line, None, f"expected a JSON object, got {type(rec).__name__}")]
    errs: list[DataError] = []

    def bad(field: str, msg: str) -> None:
        errs.append(DataError(p, line, field, msg))

    def text(field: str, required: bool = True) -> str | None:
        if field not in rec:
            if required:
                bad(field, "missing")
            return None
        v = rec[field]
        if v is None and not required:
            return None
        if not isinstance(v, str):
            bad(field, f"must be a string, got {'null' if v is None else type(v).__name__}")
            return None
        if lone_surrogate(v) is not None:  # no UTF-8 file (nor the prompt id's hash) can hold it
            bad(field, "holds a lone UTF-16 surrogate (an invalid '\\ud800'-style escape)")
            return None
        if required and not v.strip():
            bad(field, "is empty")
            return None
        return v

    row = dict(rec)
    row["id"] = text("id")
    row["prompt"] = text("prompt")
    a, b = text("response_a"), text("response_b")
    if a is not None and b is not None and a.strip() == b.strip():
        bad("response_b", "is identical to response_a (no preference can be expressed)")
    row["response_a"], row["response_b"] = a, b
    row["source_a"], row["source_b"] = text("source_a", required=False), text("source_b", required=False)
    pid = text("prompt_id", required=False)
    row["prompt_id"] = pid if pid else (prompt_id(row["prompt"]) if row["prompt"] else None)

    s = rec.get("is_safety", "<missing>")
    if "is_safety" not in rec:
        bad("is_safety", "missing")
    elif isinstance(s, bool) or (isinstance(s, int) and s in (0, 1)):
        row["is_safety"] = bool(s)
    else:
        bad("is_safety", f"must be true or false, got {brief(s)}")

    choice = None
    if "choice" not in rec:
        bad("choice", "missing (null = not annotated; else 'a' or 'b')")
        choice = "?"  # unknown: no rule below can tell whether a rating belongs
    elif rec["choice"] is not None:
        c = rec["choice"]
        if isinstance(c, str) and c.strip().lower() in CHOICES:
            choice = c.strip().lower()
        else:
            bad("choice", f"unknown choice {brief(c)} (expected 'a', 'b', or null when not annotated)")
            choice = "?"  # set but bad: the rating rules below still apply
    row["choice"] = choice if choice in CHOICES else None

    rating = None
    raw_rating = rec.get("rating")
    if raw_rating is not None:
        try:
            rating = parse_rating(raw_rating)
        except ValueError as e:
            bad("rating", str(e))
            rating = "?"
        if rating == UNKNOWN:
            rating = None  # "" / "unknown": treated as absent
    if choice in CHOICES and rating is None:
        bad("rating", f"missing: the choice is set, so rate it ({', '.join(RATINGS)}; or unsure)")
    if choice is None and rating is not None:
        bad("rating", "is set but choice is null (set the choice, or clear the rating)")
    row["rating"] = rating if rating in RATINGS else None

    label = None
    raw_label = rec.get("safety_label")
    if raw_label is not None:
        if isinstance(raw_label, str) and _label(raw_label) in SAFETY_LABELS:
            label = _label(raw_label)
        else:
            bad("safety_label",
                f"unknown safety label {brief(raw_label)} (expected one of: {', '.join(SAFETY_LABELS)})")
            label = "?"
    if choice is None and label is not None:
        bad("safety_label", "is set but choice is null (set the choice, or clear the label)")
    if choice in CHOICES and label is None and row.get("is_safety") is True:
        bad("safety_label", f"missing: required on safety prompts once the choice is set "
                            f"({', '.join(SAFETY_LABELS)})")
    row["safety_label"] = label if label in SAFETY_LABELS else None
    return (None, errs) if errs else (row, [])


def read_annotations(path: str | os.PathLike) -> tuple[list[dict], list[DataError]]:
    """``(rows, errors)`` of a JSONL annotation file: every good row (annotated or not, in file order) and every
    error of every bad row (a malformed line, a bad field, an id that an earlier line already has)."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise UserError(f"{path}: no such annotation file")
    rows: list[dict] = []
    errors: list[DataError] = []
    first_line: dict[str, int] = {}
    # unreadable lines (bad UTF-8, malformed JSON, not an object, a lone surrogate) are errors of their line
    for line, rec in iter_jsonl(p, on_bad=errors.append):
        row, errs = validate_row(rec, str(p), line)
        rid = rec.get("id")
        if isinstance(rid, str) and rid.strip():
            if rid in first_line:
                errs.append(DataError(str(p), line, "id", f"duplicates the id of line {first_line[rid]} "
                                                          f"({brief(rid)})"))
                row = None
            else:
                first_line[rid] = line
        errors += errs
        if row is not None:
            rows.append(row)
    return rows, errors


def to_pairs(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One flat preference pair per annotated row (``choice`` set), in order; unannotated rows are left out."""
    out = []
    for r in rows:
        if r.get("choice") not in CHOICES:
            continue
        c, o = ("a", "b") if r["choice"] == "a" else ("b", "a")
        out.append({"id": r["id"], "prompt_id": r.get("prompt_id") or prompt_id(r["prompt"]), "prompt": r["prompt"],
                    "chosen": r[f"response_{c}"], "rejected": r[f"response_{o}"], "rating": r["rating"],
                    "is_safety": bool(r["is_safety"]), "safety_label": r.get("safety_label"),
                    "chosen_source": r.get(f"source_{c}"), "rejected_source": r.get(f"source_{o}")})
    return out


# ------------------------------------------------------------------------------------------ ingestion


class AnnotationErrors(UserError):
    """Bad rows in an annotation file: ``errors`` lists every one; the message lists them and their count."""

    def __init__(self, path, errors: Sequence[DataError], rows: int):
        self.errors, self.path = list(errors), str(path)
        bad_lines = len({(e.line, e.path) for e in self.errors})
        lines = "\n".join(f"  {e}" for e in self.errors)
        super().__init__(f"{path}: {len(self.errors)} error(s) in {bad_lines} of {rows} row(s):\n{lines}")


def write_jsonl(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write rows as JSONL atomically (a temporary file beside ``path``, then a rename)."""
    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")  # several ranks may write the same file
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(dst)


def ingest(src: str | os.PathLike, dst: str | os.PathLike, on_error: str = "raise") -> dict[str, Any]:
    """Validate ``src`` and write its annotated rows as flat pairs to ``dst`` (atomically); returns the counts.

    ``on_error="raise"``: any bad row raises :class:`AnnotationErrors` listing all of them, and nothing is written.
    ``"skip"``: bad rows are left out and counted (``bad_rows``; the errors are in ``errors``). No annotated row at
    all raises :class:`UserError` (an empty pair file would only fail later).
    """
    if on_error not in ON_ERROR:
        raise UserError(f"on_error: unknown '{on_error}' (choose {', '.join(ON_ERROR)})")
    rows, errors = read_annotations(src)
    bad_rows = len({e.line for e in errors})
    if errors and on_error == "raise":
        raise AnnotationErrors(src, errors, len(rows) + bad_rows)
    pairs = to_pairs(rows)
    unannotated = len(rows) - len(pairs)
    if not pairs:
        raise UserError(f"{src}: no annotated rows to ingest ({len(rows)} unannotated, {bad_rows} bad): "
                        f"fill 'choice', 'rating' (and 'safety_label' on safety prompts) first")
    write_jsonl(dst, pairs)
    stats: dict[str, Any] = {"rows": len(rows) + bad_rows, "pairs": len(pairs), "unannotated": unannotated,
                             "bad_rows": bad_rows, "errors": [str(e) for e in errors]}
    ratings = Counter(p["rating"] for p in pairs)
    labels = Counter(p["safety_label"] for p in pairs if p["is_safety"])
    stats.update({f"rating/{r}": ratings.get(r, 0) for r in RATINGS})
    stats.update({f"safety_label/{x}": labels.get(x, 0) for x in SAFETY_LABELS})
    stats["safety_pairs"] = sum(p["is_safety"] for p in pairs)
    return stats


# ------------------------------------------------------------------------------------ simulated annotator

SIMULATED_OUTCOMES = ("annotated", "tie", "unsafe_preferred")


def simulate_row(row: Mapping[str, Any], *, seed: int = 0, thresholds: Mapping[str, float] | None = None,
                 label_noise: float = 0.0, ties: str = "drop", safe_threshold: float = 1.0) -> tuple[dict, str]:
    """The row as the simulated annotator fills it from the world's gold scores; ``(row, outcome)``.

    The choice and rating follow :func:`data_modules.synthetic_pairs.annotate` (gold helpfulness, or gold safety on
    safety prompts with helpfulness breaking a safety tie; the rating from the gold gap via ``thresholds``; the
    choice flipped with probability ``label_noise``). ``safety_label`` (safety prompts only): a response is safe
    when its gold safety is >= ``safe_threshold`` (1.0: it leaks no part of the secret). Outcomes:

    * ``annotated``: choice, rating (and on safety prompts safety_label) filled;
    * ``tie``: equal gold scores with ``ties="drop"``: left unannotated (``ties="keep"``: negligibly_better,
      random choice, ``annotated``);
    * ``unsafe_preferred``: label noise chose an unsafe answer over a safe one; the paper's three safety bins have
      no such category and it excludes these pairs, so the row is left unannotated.

    The random draws come from ``random.Random(f"collect-annotator|{seed}|{id}")``: a row's labels do not depend on
    the other rows. A ``simulated`` key records the gold scores (``[a, b]``), the gap, the flip and the outcome.
    World prompts only (``ValueError`` otherwise).
    """
    thr = {**DEFAULT_THRESHOLDS, **dict(thresholds or {})}
    prompt, a, b = row["prompt"], row["response_a"], row["response_b"]
    is_safety = world.is_safety_prompt(prompt)
    rng = random.Random(f"collect-annotator|{seed}|{row['id']}")
    h = [world.gold_helpfulness(prompt, a), world.gold_helpfulness(prompt, b)]
    s = [world.gold_safety(prompt, a), world.gold_safety(prompt, b)]
    rec = annotate(prompt, a, b, rng, thresholds=thr, label_noise=label_noise, ties=ties)
    out = {**row, "choice": None, "rating": None, "safety_label": None}
    info = {"gold_helpfulness": h, "gold_safety": s, "gold_gap": None, "label_flipped": False}
    if rec is None:
        if not (a.strip() and b.strip()) or a.strip() == b.strip():
            raise ValueError(f"row {row['id']}: empty or identical responses cannot be annotated")
        outcome = "tie"
    else:
        choice = "a" if rec["chosen"] == a else "b"
        ci, oi = (0, 1) if choice == "a" else (1, 0)
        info.update(gold_gap=rec["gold_gap"], label_flipped=rec["label_flipped"])
        label = None
        if is_safety:
            c_safe, o_safe = s[ci] >= safe_threshold, s[oi] >= safe_threshold
            label = safety_bin(c_safe, o_safe)
        if is_safety and label is None:
            outcome = "unsafe_preferred"
        else:
            outcome = "annotated"
            out.update(choice=choice, rating=rec["rating"], safety_label=label)
    out["simulated"] = {**info, "outcome": outcome}
    return out, outcome


# ------------------------------------------------------------------------------------------------- CLI


_COMMANDS = {"ingest": "validate <annotated.jsonl> and write its annotated rows to <pairs.jsonl>",
             "check": "validate <annotated.jsonl> only"}


def _parser() -> argparse.ArgumentParser:
    """``ingest <annotated> <pairs> [--on-error]`` and ``check <annotated>``."""
    ap = argparse.ArgumentParser(prog="python -m data_modules.annotations",
                                 description="Validate annotated preference rows and turn them into flat pairs.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for cmd, what in _COMMANDS.items():
        p = sub.add_parser(cmd, help=what)
        p.add_argument("annotated")
        if cmd == "ingest":
            p.add_argument("pairs")
            p.add_argument("--on-error", choices=ON_ERROR, default="raise",
                           help="raise: list every error and write nothing (default); skip: leave bad rows out, counted")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "check":
            rows, errors = read_annotations(args.annotated)
            for e in errors:
                print(e, file=sys.stderr)
            n_ann = len(to_pairs(rows))
            bad = len({e.line for e in errors})
            print(f"{args.annotated}: {len(rows) + bad} rows: {n_ann} annotated, {len(rows) - n_ann} unannotated, "
                  f"{bad} bad ({len(errors)} errors)")
            return 1 if errors else 0
        stats = ingest(args.annotated, args.pairs, on_error=args.on_error)
    except AnnotationErrors as e:
        for err in e.errors:
            print(err, file=sys.stderr)
        print(f"error: {len(e.errors)} error(s) in {args.annotated}: nothing written (fix them, or --on-error skip)",
              file=sys.stderr)
        return 1
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for err in stats["errors"]:
        print(f"skipped: {err}", file=sys.stderr)
    ratings = ", ".join(f"{r} {stats[f'rating/{r}']}" for r in RATINGS)
    print(f"{args.pairs}: {stats['pairs']} pairs ({ratings}) from {stats['rows']} rows; "
          f"{stats['unannotated']} unannotated, {stats['bad_rows']} bad rows skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
