"""Preference pairs for reward modelling (Llama 2, section 3.2.2): parsing, rating margins, mixtures.

Pure Python: no Lightning, no torch. Every bad record is reported as a :class:`DataError` naming the
file, the 1-based line (or row) and the field, e.g.
``data/train.jsonl:7: field 'rating' unknown rating 'meh' (expected one of: ...)``.

Record formats accepted by :func:`to_pair` (``fmt``):

``flat``
    ``{"prompt": str, "chosen": str, "rejected": str}`` plus the optional fields below. The prompt
    becomes one user message; if it is itself an HH transcript (``"\\n\\nHuman: ...\\n\\nAssistant:"``,
    as in several HH re-packagings) it is split into its turns and the trailing ``Assistant:`` dropped.
``messages``
    either ``chosen``/``rejected`` are full message lists (``[{"role", "content"}, ...]``) sharing
    every message but the last, which must be the assistant's answer; or ``prompt`` is a message
    list and ``chosen``/``rejected`` are a string, one message, or a one-message list (a list that
    repeats the prompt first is accepted too).
``hh``
    Anthropic HH-RLHF: ``chosen``/``rejected`` are whole transcripts, see :func:`split_hh_transcript`.
``auto``
    ``messages`` if ``prompt``, ``chosen`` or ``rejected`` is a list/dict, else ``flat`` if there is
    a ``prompt`` field, else ``hh`` if ``chosen`` is a string.

Optional fields in every format: ``rating`` (see :func:`parse_rating`; missing/null -> ``"unknown"``),
``is_safety`` (bool or 0/1; default from the reader), ``margin`` (number; overrides the preset),
``source`` (string; overrides the reader's default source name), ``safety_label`` (the paper's three safety bins,
:data:`SAFETY_LABELS`, on safety pairs; null -> none: the pair is in no bin).
"""
from __future__ import annotations

import math
import numbers
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from data_modules.sources import brief, iter_records
from llama2_lit.errors import DataError, UserError

RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")
UNKNOWN = "unknown"
BUCKETS = RATINGS + (UNKNOWN,)  # fixed order: also the metric's state indices

# Paper Table 27. "small" uses exact thirds; floats are what the loss sees.
MARGIN_PRESETS: dict[str, dict[str, float]] = {
    "none": {r: 0.0 for r in RATINGS},
    "small": {"significantly_better": 1.0, "better": 2 / 3, "slightly_better": 1 / 3, "negligibly_better": 0.0},
    "large": {"significantly_better": 3.0, "better": 2.0, "slightly_better": 1.0, "negligibly_better": 0.0},
}

_RATING_ALIASES = {"unsure": "negligibly_better"}
_RATING_INTS = {3: "significantly_better", 2: "better", 1: "slightly_better", 0: "negligibly_better"}
_VALID_RATINGS_TEXT = (
    ", ".join(RATINGS) + ", unsure (= negligibly_better), or an integer 3..0 (3 = significantly_better)"
)

# Llama 2 Table 29's safety bins of a safety pair: the chosen answer safe and the rejected one not, both safe, both
# unsafe. A chosen unsafe answer over a safe one is not a bin: the paper excludes such pairs.
SAFETY_LABELS = ("preferred_safe_other_unsafe", "both_safe", "both_unsafe")


def safety_bin(chosen_safe: bool, rejected_safe: bool) -> str | None:
    """The safety bin of a pair from its answers' safety; None for an unsafe answer chosen over a safe one."""
    if chosen_safe:
        return "both_safe" if rejected_safe else "preferred_safe_other_unsafe"
    return None if rejected_safe else "both_unsafe"


def parse_safety_label(value: Any) -> str | None:
    """A safety label normalised to one of :data:`SAFETY_LABELS` (case, spaces and hyphens ignored), or None for
    None/``""``; anything else raises ``ValueError`` listing the valid labels."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        key = re.sub(r"[\s\-]+", "_", value.strip().lower())
        if key in SAFETY_LABELS:
            return key
    raise ValueError(f"unknown safety label {brief(value)} (expected one of: {', '.join(SAFETY_LABELS)}, or null)")


FORMATS = ("auto", "flat", "messages", "hh")
ROLES = ("system", "user", "assistant")


def parse_rating(value: Any) -> str:
    """Normalise an annotator rating to one of :data:`RATINGS` or ``"unknown"``.

    Accepts a label (case, spaces and hyphens ignored: ``"Slightly Better"``), the alias ``"unsure"``
    (= negligibly_better), an integer 3..0 (3 = significantly_better ... 0 = negligibly_better; also
    an integral float or a digit string), or ``None``/``""`` -> ``"unknown"``. Anything else raises
    ``ValueError`` listing the valid choices.
    """
    if value is None:
        return UNKNOWN
    if isinstance(value, str):
        key = re.sub(r"[\s\-]+", "_", value.strip().lower())
        if key == "":
            return UNKNOWN
        if key in RATINGS or key == UNKNOWN:
            return key
        if key in _RATING_ALIASES:
            return _RATING_ALIASES[key]
        digit = re.fullmatch(r"0*([0-3])", key)  # ASCII digits only; no int() of a 5000-digit string
        if digit:
            return _RATING_INTS[int(digit.group(1))]
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        if value in _RATING_INTS:  # 3 and 3.0 alike; no float() of a huge int (OverflowError)
            return _RATING_INTS[value]
    raise ValueError(f"unknown rating {brief(value)} (expected one of: {_VALID_RATINGS_TEXT})")


def margin_for(rating: str, preset: str) -> float:
    """The margin m(rating) of the ranking loss under ``preset`` ("none", "small", "large").

    ``"unknown"`` gives 0.0 under every preset. An unknown preset or rating raises ``ValueError``.
    """
    if preset not in MARGIN_PRESETS:
        raise ValueError(f"unknown margin preset {preset!r} (expected one of: {', '.join(MARGIN_PRESETS)})")
    if rating == UNKNOWN:
        return 0.0
    table = MARGIN_PRESETS[preset]
    if rating not in table:
        raise ValueError(f"unknown rating {rating!r} (expected one of: {', '.join(BUCKETS)})")
    return table[rating]


@dataclass(frozen=True)
class PreferencePair:
    prompt: list[dict]  # chat messages (role/content) of the shared context, ending with a user turn
    chosen: str  # the preferred final assistant answer
    rejected: str
    rating: str  # one of RATINGS or "unknown"
    is_safety: bool
    margin: float | None  # explicit margin if the row had one (overrides the preset)
    source: str  # a `source` field, else the reader's name for the file
    where: str  # "path:line" for error messages
    safety_label: str | None = None  # one of SAFETY_LABELS (Table 29's bins), or None: in no bin

    def margin_value(self, preset: str) -> float:
        """The explicit margin if the row had one, else the preset's margin for the rating."""
        return self.margin if self.margin is not None else margin_for(self.rating, preset)


class PairError(DataError):
    """A :class:`DataError` with a short machine-readable ``reason`` (used for skip counts)."""

    def __init__(self, path, line, field, message, reason: str):
        super().__init__(path, line, field, message)
        self.reason = reason


# ---------------------------------------------------------------------------------------------- HH

_HUMAN = "\n\nHuman:"
_ASSISTANT = "\n\nAssistant:"
_TURN_RE = re.compile(r"\n\n(Human|Assistant):")


class HHSplitError(ValueError):
    """Why a pair of HH transcripts could not be split; ``field`` and ``reason`` feed :class:`PairError`."""

    def __init__(self, message: str, field: str, reason: str):
        super().__init__(message)
        self.field, self.reason = field, reason


def _normalise_hh(text: str) -> str:
    # HH transcripts start with "\n\nHuman:"; accept "Human:" with other (or no) leading whitespace.
    stripped = text.lstrip()
    if stripped.startswith(("Human:", "Assistant:")):
        return "\n\n" + stripped
    return text


def _hh_turns(text: str) -> list[dict]:
    """Split a normalised transcript (no trailing answer) into alternating user/assistant messages.

    Consecutive turns of the same role (an HH glitch) are merged, joined by a blank line, so that
    the result alternates as chat templates require. Contents are stripped.
    """
    parts = _TURN_RE.split(text)  # [lead, role, content, role, content, ...]
    if parts[0].strip():
        raise HHSplitError("text before the first 'Human:' turn", "chosen", "hh_bad_transcript")
    messages: list[dict] = []
    for i in range(1, len(parts), 2):
        role = "user" if parts[i] == "Human" else "assistant"
        content = parts[i + 1].strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = (messages[-1]["content"] + "\n\n" + content).strip()
        else:
            messages.append({"role": role, "content": content})
    return messages


def split_hh_transcript(chosen: str, rejected: str) -> tuple[list[dict], str, str]:
    """Split two Anthropic HH-RLHF transcripts into ``(prompt messages, chosen answer, rejected answer)``.

    A transcript is ``"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant: <final>"``.
    The final answers start at the *answer boundary*: the latest ``"\\n\\nAssistant:"`` that

    * lies in the common prefix of both strings (same dialogue before it, marker in both), and
    * directly follows a Human turn (so the prompt ends with a user turn).

    Normally that is the last ``"\\n\\nAssistant:"`` of both. When the transcripts differ only after
    an earlier boundary (some HH rows have an extra ``"\\n\\nAssistant:"`` inside one answer), the
    earlier boundary is used and any later markers stay inside the answer text; likewise consecutive
    Assistant turns after the last Human turn are kept in the answer. The prompt is returned as
    user/assistant messages (stripped; consecutive same-role turns merged) ending with the user turn;
    answers are stripped and may be empty (callers decide whether that is an error).

    Raises ``ValueError`` (an :class:`HHSplitError`) when a transcript has no Assistant turn, has
    text before its first Human turn, or the two share no such boundary.
    """
    c, r = _normalise_hh(chosen), _normalise_hh(rejected)
    for name, text in (("chosen", c), ("rejected", r)):
        if _ASSISTANT not in text:
            raise HHSplitError("HH transcript has no '\\n\\nAssistant:' turn", name, "hh_no_assistant_turn")
    n = 0  # length of the common prefix
    limit = min(len(c), len(r))
    while n < limit and c[n] == r[n]:
        n += 1
    boundary = -1
    for m in _TURN_RE.finditer(c, 0, n):
        if m.end() > n:
            break
        if m.group(1) == "Assistant":
            prev = c.rfind(_HUMAN, 0, m.start())
            prev_a = c.rfind(_ASSISTANT, 0, m.start())
            if prev != -1 and prev > prev_a:  # the turn just before is a Human turn
                boundary = m.start()
    if boundary < 0:
        raise HHSplitError(
            "HH transcript does not share its dialogue with 'chosen' up to an Assistant turn that follows a Human turn",
            "rejected",
            "hh_prefix_mismatch",
        )
    prompt = _hh_turns(c[:boundary])
    if not prompt or prompt[-1]["role"] != "user":  # pragma: no cover - guaranteed by the boundary rule
        raise HHSplitError("HH dialogue does not end with a Human turn", "chosen", "hh_bad_transcript")
    start = boundary + len(_ASSISTANT)
    return prompt, c[start:].strip(), r[start:].strip()


# ------------------------------------------------------------------------------------------- records


def _err(path, line, field, message, reason) -> PairError:
    return PairError(None if path is None else str(path), line, field, message, reason)


def _message_list(value, field, path, line) -> list[dict]:
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _err(path, line, field, "must be a non-empty list of messages", "bad_type")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise _err(path, line, field, f"message {i} must be an object with 'role' and 'content'", "bad_type")
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            msg = f"message {i} has role {brief(role)} (expected one of: {', '.join(ROLES)})"
            raise _err(path, line, field, msg, "bad_value")
        if not isinstance(content, str):
            raise _err(path, line, field, f"message {i} content must be a string", "bad_type")
        out.append({"role": role, "content": content})
    return out


def _answer(value, prompt: list[dict], field, path, line) -> str:
    """A completion given as a string, one assistant message, or a list (optionally repeating the prompt)."""
    if isinstance(value, str):
        return value.strip()
    msgs = _message_list(value, field, path, line)
    if len(msgs) > len(prompt) and msgs[: len(prompt)] == prompt:
        msgs = msgs[len(prompt):]
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise _err(path, line, field, "must be one assistant message (or a string) when 'prompt' is given", "bad_value")
    return msgs[0]["content"].strip()


def _detect(record: dict) -> str:
    if any(isinstance(record.get(k), (list, dict)) for k in ("prompt", "chosen", "rejected")):
        return "messages"
    if "prompt" in record:
        return "flat"
    return "hh"


def _require(record, field, path, line):
    if field not in record or record[field] is None:
        raise _err(path, line, field, "missing", "missing_field")
    return record[field]


def _require_str(record, field, path, line) -> str:
    value = _require(record, field, path, line)
    if not isinstance(value, str):
        raise _err(path, line, field, f"must be a string, got {type(value).__name__}", "bad_type")
    return value


def _flat_prompt(text: str, path, line) -> list[dict]:
    t = _normalise_hh(text)
    if t.startswith(_HUMAN):  # an HH-style prompt, usually ending with "\n\nAssistant:"
        t = t.rstrip()
        if t.endswith(_ASSISTANT):
            t = t[: -len(_ASSISTANT)]
        try:
            msgs = _hh_turns(t)
        except HHSplitError as e:
            raise _err(path, line, "prompt", str(e), e.reason) from None
        if msgs and msgs[-1]["role"] == "user":
            return msgs
        raise _err(path, line, "prompt", "HH-style prompt must end with a Human turn", "bad_value")
    if not text.strip():
        raise _err(path, line, "prompt", "is empty", "empty_field")
    return [{"role": "user", "content": text.strip()}]


def _hh_conversation(record, path, line) -> tuple[list[dict], str, str]:
    """``(prompt, chosen, rejected)`` of an Anthropic HH record: two transcripts sharing the dialogue."""
    chosen_t = _require_str(record, "chosen", path, line)
    rejected_t = _require_str(record, "rejected", path, line)
    try:
        return split_hh_transcript(chosen_t, rejected_t)
    except HHSplitError as e:
        raise _err(path, line, e.field, str(e), e.reason) from None


def _flat_conversation(record, path, line) -> tuple[list[dict], str, str]:
    """``(prompt, chosen, rejected)`` of a flat record: a prompt string and two answer strings."""
    prompt = _flat_prompt(_require_str(record, "prompt", path, line), path, line)
    return (prompt, _require_str(record, "chosen", path, line).strip(),
            _require_str(record, "rejected", path, line).strip())


def _messages_conversation(record, path, line) -> tuple[list[dict], str, str]:
    """``(prompt, chosen, rejected)`` of a chat-message record: a prompt with two answers, or two message lists
    that share the prompt messages and end with the assistant's answer."""
    if record.get("prompt") is not None:
        p = record["prompt"]
        prompt = _flat_prompt(p, path, line) if isinstance(p, str) else _message_list(p, "prompt", path, line)
        return (prompt, _answer(_require(record, "chosen", path, line), prompt, "chosen", path, line),
                _answer(_require(record, "rejected", path, line), prompt, "rejected", path, line))
    c = _message_list(_require(record, "chosen", path, line), "chosen", path, line)
    r = _message_list(_require(record, "rejected", path, line), "rejected", path, line)
    for name, msgs in (("chosen", c), ("rejected", r)):
        if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
            msg = "must be prompt messages followed by a final assistant message"
            raise _err(path, line, name, msg, "bad_value")
    if c[:-1] != r[:-1]:
        msg = "does not share the prompt messages with 'chosen'"
        raise _err(path, line, "rejected", msg, "prefix_mismatch")
    return c[:-1], c[-1]["content"].strip(), r[-1]["content"].strip()


_CONVERSATIONS = {"hh": _hh_conversation, "flat": _flat_conversation, "messages": _messages_conversation}


def _check_conversation(prompt: list[dict], chosen: str, rejected: str, path, line) -> None:
    """Refuse a prompt that does not end with a user turn, an empty answer, or identical answers."""
    if not prompt or prompt[-1]["role"] != "user":
        raise _err(path, line, "prompt", "must end with a user turn", "bad_value")
    if not chosen:
        raise _err(path, line, "chosen", "is empty", "empty_answer")
    if not rejected:
        raise _err(path, line, "rejected", "is empty", "empty_answer")
    if chosen == rejected:
        raise _err(path, line, "rejected", "is identical to 'chosen'", "identical_answers")


def _labels(record, default_is_safety: bool, path, line) -> tuple[str, bool, float | None]:
    """``(rating, is_safety, margin)`` of a record (rating: see :func:`parse_rating`; margin None: from the rating)."""
    try:
        rating = parse_rating(record.get("rating"))
    except ValueError as e:
        raise _err(path, line, "rating", str(e), "unknown_rating") from None

    is_safety = record.get("is_safety")
    if is_safety is None:
        is_safety = bool(default_is_safety)
    elif isinstance(is_safety, bool) or (isinstance(is_safety, numbers.Integral) and int(is_safety) in (0, 1)):
        is_safety = bool(is_safety)
    else:
        raise _err(path, line, "is_safety", f"must be true/false, got {brief(is_safety)}", "bad_value")

    margin = record.get("margin")
    if margin is not None:
        try:
            ok = not isinstance(margin, bool) and isinstance(margin, numbers.Real) and math.isfinite(float(margin))
        except OverflowError:  # an integer beyond float range
            ok = False
        if not ok:
            raise _err(path, line, "margin", f"must be a finite number, got {brief(margin)}", "bad_value")
        margin = float(margin)
    return rating, is_safety, margin


def to_pair(
    record: dict,
    *,
    fmt: str = "auto",
    path=None,
    line=None,
    default_is_safety: bool = False,
    source: str | None = None,
) -> PreferencePair:
    """Turn one record into a :class:`PreferencePair` (formats: see the module docstring).

    Raises :class:`PairError` (a :class:`DataError`: ``path:line: field 'x' message``) for a missing
    field, a wrong type, an empty chosen/rejected answer, chosen == rejected, an unknown rating, a bad
    ``is_safety``/``margin``/``safety_label``, or an HH transcript without an Assistant turn / without a shared dialogue.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown preference format {fmt!r} (expected one of: {', '.join(FORMATS)})")
    if not isinstance(record, dict):
        raise _err(path, line, None, f"expected an object, got {type(record).__name__}", "bad_type")
    kind = _detect(record) if fmt == "auto" else fmt
    prompt, chosen, rejected = _CONVERSATIONS[kind](record, path, line)
    _check_conversation(prompt, chosen, rejected, path, line)
    rating, is_safety, margin = _labels(record, default_is_safety, path, line)
    try:
        label = parse_safety_label(record.get("safety_label"))
    except ValueError as e:
        raise _err(path, line, "safety_label", str(e), "unknown_safety_label") from None
    src = record.get("source")
    if not isinstance(src, str) or not src:
        src = source if source is not None else (Path(str(path)).name if path is not None else "")
    where = f"{path if path is not None else '<data>'}" + (f":{line}" if line is not None else "")
    return PreferencePair(prompt, chosen, rejected, rating, is_safety, margin, src, where, label)


def read_pairs(
    path,
    *,
    fmt: str = "auto",
    on_error: str = "raise",
    default_is_safety: bool = False,
    split: str = "train",
    source: str | None = None,
) -> tuple[list[PreferencePair], dict]:
    """Read every record of ``path`` (anything :func:`iter_records` reads) as preference pairs.

    ``on_error="raise"`` stops at the first bad record with its :class:`DataError`; ``"skip"`` drops
    bad records and counts them. Returns ``(pairs, stats)`` with ``stats = {"read", "kept",
    "skipped", "skipped_by_reason": {reason: n}, "first_error_by_reason": {reason: message}}``.
    A line that is no record (malformed JSON, bad UTF-8, not an object) is skipped as reason ``unreadable``;
    input that cannot be read at all (a missing or corrupt file, a malformed ``.json`` document) always raises.
    ``source`` defaults to the file (or folder) name. No pair kept -> :class:`UserError` naming the path.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown preference format {fmt!r} (expected one of: {', '.join(FORMATS)})")
    src = source if source is not None else Path(str(path)).name
    pairs: list[PreferencePair] = []
    reasons: Counter = Counter()
    first: dict[str, str] = {}
    read = 0

    def skip(e: DataError, reason: str) -> None:
        reasons[reason] += 1
        first.setdefault(reason, str(e))

    def unreadable(e: DataError) -> None:  # a line iter_records could not turn into a record: read, and skipped
        nonlocal read
        read += 1
        skip(e, "unreadable")

    for line, rec in iter_records(str(path), split, on_bad=unreadable if on_error == "skip" else None):
        read += 1
        try:
            pairs.append(to_pair(rec, fmt=fmt, path=path, line=line, default_is_safety=default_is_safety, source=src))
        except PairError as e:
            if on_error == "raise":
                raise
            skip(e, e.reason)
    stats = {
        "read": read,
        "kept": len(pairs),
        "skipped": read - len(pairs),
        "skipped_by_reason": dict(sorted(reasons.items())),
        "first_error_by_reason": first,
    }
    if not pairs:
        why = f" (all {read} skipped: {stats['skipped_by_reason']})" if read else " (no records)"
        raise UserError(f"{path}: no usable preference pairs{why}")
    return pairs, stats


# -------------------------------------------------------------------------------------------- mixing

REWARDS = ("helpfulness", "safety")


def _round_half_up(x: float) -> int:
    # Half up, with a little slack so that a value meant to be exactly n.5 but computed as
    # n.4999999... (float error in ratio * count) still rounds up.
    return int(math.floor(x + 0.5 + 1e-9))


def _sample(pool: Sequence, k: int, seed: int, name: str) -> list:
    # One independent stream per pool: resizing one pool does not change what is drawn from another.
    return random.Random(f"{seed}:{name}").sample(list(pool), k)


def mix_for_reward(
    helpful: Sequence,
    safety: Sequence,
    other: Sequence = (),
    *,
    reward: str,
    seed: int,
    helpful_other_ratio: float = 1.0,
    safety_helpful_ratio: float = 0.1,
    safety_helpful_pools: Sequence[str] = ("helpfulness", "other"),
) -> tuple[list, dict]:
    """The reward-model training mixtures of Llama 2 section 3.2.2.

    ``reward="helpfulness"``: every helpful pair, plus ``k = round(helpful_other_ratio * len(helpful))``
    (rounding half up)
    pairs sampled without replacement from ``safety`` and, separately, ``k`` from ``other`` (each
    capped at the pool's size, so a short pool gives fewer: the counts say how many).
    ``reward="safety"``: every safety pair, plus ``k = round(n_s * r / (1 - r))`` helpfulness pairs,
    ``r = safety_helpful_ratio`` (0.1 -> the paper's 90/10 mix), sampled without replacement from the pools named
    in ``safety_helpful_pools`` taken together (capped at their size). The default ``("helpfulness", "other")``
    follows the paper: "mixed with Meta Helpfulness and open-source helpfulness data in a 90/10 proportion";
    ``("helpfulness",)`` draws the 10% from ``helpful`` alone (this module's reading before issue 18).

    Sampling uses ``random.Random(f"{seed}:{pool}")`` per pool, and the result is shuffled with
    ``random.Random(f"{seed}:mix")``, so it is deterministic for ``seed``. Returns ``(pairs, counts)``,
    ``counts = {"helpfulness": n_h, "safety": n_s, "other": n_o, "total": n}``.
    """
    if reward not in REWARDS:
        raise ValueError(f"unknown reward model {reward!r} (expected one of: {', '.join(REWARDS)})")
    if reward == "helpfulness":
        if not helpful_other_ratio >= 0:
            raise ValueError(f"helpful_other_ratio must be >= 0, got {helpful_other_ratio}")
        k = _round_half_up(helpful_other_ratio * len(helpful))
        h = list(helpful)
        s = _sample(safety, min(len(safety), k), seed, "safety")
        o = _sample(other, min(len(other), k), seed, "other")
    else:
        if not 0 <= safety_helpful_ratio < 1:
            raise ValueError(f"safety_helpful_ratio must be in [0, 1), got {safety_helpful_ratio}")
        bad = [x for x in safety_helpful_pools if x not in ("helpfulness", "other")]
        if bad or not safety_helpful_pools:
            raise ValueError(f"safety_helpful_pools must name helpfulness and/or other, got {list(safety_helpful_pools)}")
        s = list(safety)
        k = _round_half_up(len(s) * safety_helpful_ratio / (1 - safety_helpful_ratio))
        # one draw from the named pools together (tagged by pool), so each pool contributes by its size
        pool = ([(0, x) for x in helpful] if "helpfulness" in safety_helpful_pools else []) + (
            [(1, x) for x in other] if "other" in safety_helpful_pools else [])
        drawn = _sample(pool, min(len(pool), k), seed, "helpfulness")
        h = [x for tag, x in drawn if tag == 0]
        o = [x for tag, x in drawn if tag == 1]
    mixed = h + s + o
    random.Random(f"{seed}:mix").shuffle(mixed)
    counts = {"helpfulness": len(h), "safety": len(s), "other": len(o), "total": len(mixed)}
    return mixed, counts
