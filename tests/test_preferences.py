"""Preference-pair parsing, rating margins and reward-model mixtures (data_modules/preferences.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_modules.preferences import (
    MARGIN_PRESETS,
    RATINGS,
    PreferencePair,
    margin_for,
    mix_for_reward,
    parse_rating,
    read_pairs,
    split_hh_transcript,
    to_pair,
)
from llama2_lit.errors import DataError, UserError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HH_HARMLESS = SHARED_DATA / "preferences" / "hh_harmless"

TWO_TURN_PREFIX = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke.\n\nAssistant:"
TWO_TURN_MESSAGES = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Tell me a joke."},
]


# ------------------------------------------------------------------------------------ ratings/margins


def test_margin_presets_exact_values():
    assert MARGIN_PRESETS["small"] == {
        "significantly_better": 1.0,
        "better": 2 / 3,
        "slightly_better": 1 / 3,
        "negligibly_better": 0.0,
    }
    assert MARGIN_PRESETS["large"] == {
        "significantly_better": 3.0, "better": 2.0, "slightly_better": 1.0, "negligibly_better": 0.0
    }
    assert MARGIN_PRESETS["none"] == {r: 0.0 for r in RATINGS}
    assert margin_for("better", "small") == 2 / 3
    assert margin_for("slightly_better", "small") == 1 / 3
    assert margin_for("significantly_better", "large") == 3.0
    for preset in MARGIN_PRESETS:
        assert margin_for("unknown", preset) == 0.0


def test_margin_for_bad_preset_lists_choices():
    with pytest.raises(ValueError) as e:
        margin_for("better", "huge")
    assert str(e.value) == "unknown margin preset 'huge' (expected one of: none, small, large)"
    with pytest.raises(ValueError, match="unknown rating 'meh'"):
        margin_for("meh", "small")


def test_explicit_margin_overrides_preset():
    rec = {"prompt": "q", "chosen": "a", "rejected": "b", "rating": "better"}
    assert to_pair(rec).margin_value("large") == 2.0
    assert to_pair({**rec, "margin": 0.25}).margin_value("large") == 0.25
    assert to_pair({**rec, "rating": None}).margin_value("large") == 0.0


@pytest.mark.parametrize(
    "value, expected",
    [
        ("significantly_better", "significantly_better"),
        ("better", "better"),
        ("slightly_better", "slightly_better"),
        ("negligibly_better", "negligibly_better"),
        ("unsure", "negligibly_better"),
        ("Unsure", "negligibly_better"),
        ("Significantly Better", "significantly_better"),
        ("slightly-better", "slightly_better"),
        (3, "significantly_better"),
        (2, "better"),
        (1, "slightly_better"),
        (0, "negligibly_better"),
        (2.0, "better"),
        ("3", "significantly_better"),
        (None, "unknown"),
        ("", "unknown"),
        ("unknown", "unknown"),
    ],
)
def test_parse_rating_forms(value, expected):
    assert parse_rating(value) == expected


@pytest.mark.parametrize("value", ["meh", "much_better", 4, -1, 2.5, True, [3]])
def test_parse_rating_error_lists_choices(value):
    with pytest.raises(ValueError) as e:
        parse_rating(value)
    msg = str(e.value)
    assert msg.startswith(f"unknown rating {value!r} (expected one of: ")
    for r in RATINGS:
        assert r in msg
    assert "unsure" in msg and "3..0" in msg


# ------------------------------------------------------------------------------------------- HH split


def test_split_hh_two_turns_exact():
    chosen = TWO_TURN_PREFIX + " Why did the chicken cross the road?  "
    rejected = TWO_TURN_PREFIX + " No."
    prompt, c, r = split_hh_transcript(chosen, rejected)
    assert prompt == TWO_TURN_MESSAGES
    assert c == "Why did the chicken cross the road?"
    assert r == "No."


def test_split_hh_without_leading_newlines():
    prompt, c, r = split_hh_transcript("Human: hi\n\nAssistant: a", "Human: hi\n\nAssistant: b")
    assert prompt == [{"role": "user", "content": "hi"}] and (c, r) == ("a", "b")


def test_split_hh_extra_assistant_marker_inside_one_answer():
    # As in hh_harmless/train.jsonl:1281: one answer holds a second "\n\nAssistant:" of its own.
    chosen = TWO_TURN_PREFIX + " Here is one:\n\nAssistant: a joke about chickens."
    rejected = TWO_TURN_PREFIX + " No."
    prompt, c, r = split_hh_transcript(chosen, rejected)
    assert prompt == TWO_TURN_MESSAGES
    assert c == "Here is one:\n\nAssistant: a joke about chickens."
    assert r == "No."


def test_split_hh_merges_consecutive_assistant_turns_in_prefix():
    base = "\n\nHuman: q1\n\nAssistant: a1\n\nAssistant: a2\n\nHuman: q2\n\nAssistant:"
    prompt, c, r = split_hh_transcript(base + " yes", base + " no")
    assert prompt == [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1\n\na2"},
        {"role": "user", "content": "q2"},
    ]
    assert (c, r) == ("yes", "no")


def test_split_hh_errors():
    with pytest.raises(ValueError, match="no '\\\\n\\\\nAssistant:' turn"):
        split_hh_transcript("\n\nHuman: hi", "\n\nHuman: hi\n\nAssistant: x")
    with pytest.raises(ValueError, match="does not share its dialogue"):
        split_hh_transcript("\n\nHuman: hi\n\nAssistant: x", "\n\nHuman: hello\n\nAssistant: y")


def _hh_rows(name):
    path = HH_HARMLESS / name
    if not path.is_file():
        pytest.skip(f"real HH data not found at {path} (shared data folder absent)")
    with path.open(encoding="utf-8") as f:
        return path, [json.loads(x) for x in f if x.strip()]


@pytest.mark.parametrize(
    "name, n_rows, mismatched_last_prefix",
    [("train.jsonl", 1512, [543, 1281, 1447]), ("dev.jsonl", 300, [155])],
)
def test_split_hh_all_real_rows(name, n_rows, mismatched_last_prefix):
    _, rows = _hh_rows(name)
    assert len(rows) == n_rows
    mismatched = []
    for i, row in enumerate(rows, start=1):
        c, r = row["chosen"], row["rejected"]
        if c[: c.rfind("\n\nAssistant:")] != r[: r.rfind("\n\nAssistant:")]:
            mismatched.append(i)
        prompt, chosen, rejected = split_hh_transcript(c, r)
        assert prompt[-1]["role"] == "user", i
        assert prompt[0]["role"] == "user", i
        assert all(a["role"] != b["role"] for a, b in zip(prompt, prompt[1:])), i
        assert chosen != rejected, i
    # Rows whose last "\n\nAssistant:" prefixes differ: an extra marker inside one answer; they split
    # at the earlier shared boundary instead.
    assert mismatched == mismatched_last_prefix


@pytest.mark.parametrize(
    "name, kept, empty_line", [("train.jsonl", 1509, 371), ("dev.jsonl", 299, 178)]
)
def test_read_pairs_real_hh(name, kept, empty_line):
    path, rows = _hh_rows(name)
    pairs, stats = read_pairs(path, on_error="skip", default_is_safety=True)
    assert stats["read"] == len(rows) and stats["kept"] == kept == len(pairs)
    assert stats["skipped_by_reason"] == {"empty_answer": len(rows) - kept}  # empty chosen answers
    assert all(p.is_safety and p.rating == "unknown" and p.source == name for p in pairs)
    with pytest.raises(DataError) as e:
        read_pairs(path)
    assert str(e.value) == f"{path}:{empty_line}: field 'chosen' is empty"


# ------------------------------------------------------------------------------------------- to_pair


def test_to_pair_flat_all_fields():
    rec = {"prompt": " Why? ", "chosen": " Because. ", "rejected": "No.", "rating": 3, "is_safety": True,
           "margin": 1.5, "source": "meta_safety"}
    p = to_pair(rec, path="d.jsonl", line=4)
    assert p == PreferencePair(
        prompt=[{"role": "user", "content": "Why?"}], chosen="Because.", rejected="No.",
        rating="significantly_better", is_safety=True, margin=1.5, source="meta_safety", where="d.jsonl:4",
    )
    q = to_pair({"prompt": "q", "chosen": "a", "rejected": "b"}, path="x/d.jsonl", line=1)
    assert (q.rating, q.is_safety, q.margin, q.source) == ("unknown", False, None, "d.jsonl")
    assert to_pair({"prompt": "q", "chosen": "a", "rejected": "b"}, default_is_safety=True).is_safety


def test_to_pair_flat_hh_style_prompt():
    p = to_pair({"prompt": TWO_TURN_PREFIX, "chosen": " yes", "rejected": " no"})
    assert p.prompt == TWO_TURN_MESSAGES and (p.chosen, p.rejected) == ("yes", "no")


def test_to_pair_messages_forms():
    ctx = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "hi"}]
    full = to_pair({"chosen": ctx + [{"role": "assistant", "content": "hello"}],
                    "rejected": ctx + [{"role": "assistant", "content": "go away"}]})
    assert full.prompt == ctx and (full.chosen, full.rejected) == ("hello", "go away")
    split = to_pair({"prompt": ctx, "chosen": [{"role": "assistant", "content": "hello"}],
                     "rejected": {"role": "assistant", "content": "go away"}})
    assert split == full
    assert to_pair({"prompt": ctx, "chosen": "hello", "rejected": "go away"}) == full


def test_to_pair_auto_detects_hh():
    p = to_pair({"chosen": TWO_TURN_PREFIX + " a", "rejected": TWO_TURN_PREFIX + " b", "rating": "unsure"})
    assert p.prompt == TWO_TURN_MESSAGES and p.rating == "negligibly_better"


@pytest.mark.parametrize(
    "record, fmt, expected",
    [
        ({"prompt": "q", "chosen": "a"}, "auto", "d.jsonl:7: field 'rejected' missing"),
        ({"chosen": "a", "rejected": "b"}, "flat", "d.jsonl:7: field 'prompt' missing"),
        ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "auto", "d.jsonl:7: field 'chosen' is empty"),
        ({"prompt": "q", "chosen": "same", "rejected": "same "}, "auto",
         "d.jsonl:7: field 'rejected' is identical to 'chosen'"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "rating": "meh"}, "auto",
         "d.jsonl:7: field 'rating' unknown rating 'meh' (expected one of: significantly_better, better, "
         "slightly_better, negligibly_better, unsure (= negligibly_better), or an integer 3..0 "
         "(3 = significantly_better))"),
        ({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi\n\nAssistant: x"}, "hh",
         "d.jsonl:7: field 'chosen' HH transcript has no '\\n\\nAssistant:' turn"),
        ({"chosen": "\n\nHuman: hi\n\nAssistant: x", "rejected": "\n\nHuman: bye\n\nAssistant: y"}, "auto",
         "d.jsonl:7: field 'rejected' HH transcript does not share its dialogue with 'chosen' up to an "
         "Assistant turn that follows a Human turn"),
        ({"prompt": "q", "chosen": 5, "rejected": "b"}, "auto", "d.jsonl:7: field 'chosen' must be a string, got int"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "is_safety": "yes"}, "auto",
         "d.jsonl:7: field 'is_safety' must be true/false, got 'yes'"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "auto",
         "d.jsonl:7: field 'margin' must be a finite number, got 'big'"),
        ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
          "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "b"}]}, "auto",
         "d.jsonl:7: field 'rejected' does not share the prompt messages with 'chosen'"),
        ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
          "chosen": "a", "rejected": "b"}, "auto", "d.jsonl:7: field 'prompt' must end with a user turn"),
    ],
)
def test_to_pair_errors_name_path_line_field(record, fmt, expected):
    with pytest.raises(DataError) as e:
        to_pair(record, fmt=fmt, path="d.jsonl", line=7)
    assert str(e.value) == expected


def test_to_pair_bad_format_name():
    with pytest.raises(ValueError, match="expected one of: auto, flat, messages, hh"):
        to_pair({}, fmt="csv")


# ----------------------------------------------------------------------------------------- read_pairs


def _write_jsonl(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_read_pairs_skip_counts_by_reason(tmp_path):
    path = _write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "q1", "chosen": "a", "rejected": "b", "rating": "better"},
        {"prompt": "q2", "chosen": "a"},
        {"prompt": "q3", "chosen": "a", "rejected": "a"},
        {"prompt": "q4", "chosen": "a", "rejected": "b", "rating": "meh"},
        {"prompt": "q5", "chosen": "a", "rejected": "b", "rating": 0},
        {"prompt": "q6", "chosen": "x", "rejected": "x"},
    ])
    pairs, stats = read_pairs(path, on_error="skip")
    assert [p.prompt[0]["content"] for p in pairs] == ["q1", "q5"]
    assert [p.where for p in pairs] == [f"{path}:1", f"{path}:5"]
    assert stats["read"] == 6 and stats["kept"] == 2 and stats["skipped"] == 4
    assert stats["skipped_by_reason"] == {"identical_answers": 2, "missing_field": 1, "unknown_rating": 1}
    assert stats["first_error_by_reason"]["missing_field"] == f"{path}:2: field 'rejected' missing"
    with pytest.raises(DataError) as e:
        read_pairs(path)  # on_error="raise"
    assert str(e.value) == f"{path}:2: field 'rejected' missing"


def test_read_pairs_zero_kept_is_user_error(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"}])
    with pytest.raises(UserError) as e:
        read_pairs(path, on_error="skip")
    assert str(e.value) == f"{path}: no usable preference pairs (all 1 skipped: {{'identical_answers': 1}})"


def test_read_pairs_bad_on_error():
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip'"):
        read_pairs("whatever.jsonl", on_error="ignore")


# -------------------------------------------------------------------------------------------- mixing


def test_mix_helpfulness_counts():
    helpful = [f"h{i}" for i in range(10)]
    safety = [f"s{i}" for i in range(7)]
    other = [f"o{i}" for i in range(20)]
    mixed, counts = mix_for_reward(helpful, safety, other, reward="helpfulness", seed=0)
    # k = round(1.0 * 10) = 10 from each pool, capped: safety has only 7.
    assert counts == {"helpfulness": 10, "safety": 7, "other": 10, "total": 27}
    assert len(mixed) == 27 and len(set(mixed)) == 27
    assert set(helpful) <= set(mixed) and set(safety) <= set(mixed)
    assert sum(x.startswith("o") for x in mixed) == 10

    _, counts = mix_for_reward(helpful, safety, other, reward="helpfulness", seed=0, helpful_other_ratio=0.25)
    assert counts == {"helpfulness": 10, "safety": 3, "other": 3, "total": 16}  # round(2.5) -> 3 (half up)
    _, counts = mix_for_reward(helpful, safety, reward="helpfulness", seed=0, helpful_other_ratio=0.0)
    assert counts == {"helpfulness": 10, "safety": 0, "other": 0, "total": 10}


def test_mix_safety_counts():
    helpful = [f"h{i}" for i in range(100)]
    safety = [f"s{i}" for i in range(45)]
    mixed, counts = mix_for_reward(helpful, safety, ["o1"], reward="safety", seed=1)
    assert counts == {"helpfulness": 5, "safety": 45, "other": 0, "total": 50}  # 45/50 = 90%, 5/50 = 10%
    assert set(safety) <= set(mixed) and len(set(mixed)) == 50
    _, counts = mix_for_reward(helpful[:3], safety, reward="safety", seed=1)
    assert counts["helpfulness"] == 3  # capped by the pool
    _, counts = mix_for_reward(helpful, safety, reward="safety", seed=1, safety_helpful_ratio=0.5)
    assert counts["helpfulness"] == 45


def test_mix_safety_draws_its_helpfulness_share_from_both_helpfulness_pools():
    # paper: "mixed with Meta Helpfulness and open-source helpfulness data in a 90/10 proportion"
    helpful = [f"h{i}" for i in range(30)]
    other = [f"o{i}" for i in range(30)]
    safety = [f"s{i}" for i in range(90)]
    mixed, counts = mix_for_reward(helpful, safety, other, reward="safety", seed=1)
    assert counts["safety"] == 90 and counts["helpfulness"] + counts["other"] == 10 and counts["total"] == 100
    assert counts["helpfulness"] > 0 and counts["other"] > 0  # 10 of 60, drawn together: P(all from one) < 0.002
    assert sum(x.startswith("o") for x in mixed) == counts["other"]
    # the earlier reading, kept as an option: the 10% from Meta-style helpfulness pairs only
    _, counts = mix_for_reward(helpful, safety, other, reward="safety", seed=1, safety_helpful_pools=["helpfulness"])
    assert (counts["helpfulness"], counts["other"]) == (10, 0)
    _, counts = mix_for_reward(helpful, safety, other, reward="safety", seed=1, safety_helpful_pools=["other"])
    assert (counts["helpfulness"], counts["other"]) == (0, 10)
    with pytest.raises(ValueError, match="safety_helpful_pools"):
        mix_for_reward(helpful, safety, other, reward="safety", seed=1, safety_helpful_pools=["safety"])


def test_the_safety_reward_config_mixes_open_source_helpfulness_in(make_cfg):
    cfg = make_cfg("stage=rm", "reward=safety", small=False)
    assert list(cfg.reward.mixture.safety_helpful_pools) == ["helpfulness", "other"]


def test_mix_is_deterministic():
    helpful = list(range(50))
    safety = list(range(100, 300))
    other = list(range(1000, 1100))
    a = mix_for_reward(helpful, safety, other, reward="helpfulness", seed=3)
    b = mix_for_reward(helpful, safety, other, reward="helpfulness", seed=3)
    c = mix_for_reward(helpful, safety, other, reward="helpfulness", seed=4)
    assert a == b
    assert a[0] != c[0] and a[1] == c[1]
    # The safety sample does not depend on the other pool.
    d = mix_for_reward(helpful, safety, other[:10], reward="helpfulness", seed=3)
    assert sorted(x for x in a[0] if 100 <= x < 300) == sorted(x for x in d[0] if 100 <= x < 300)


def test_mix_bad_arguments():
    with pytest.raises(ValueError, match="expected one of: helpfulness, safety"):
        mix_for_reward([], [], reward="harmless", seed=0)
    with pytest.raises(ValueError, match="safety_helpful_ratio must be in"):
        mix_for_reward([], [], reward="safety", seed=0, safety_helpful_ratio=1.0)
    with pytest.raises(ValueError, match="helpful_other_ratio must be >= 0"):
        mix_for_reward([], [], reward="helpfulness", seed=0, helpful_other_ratio=-1)
