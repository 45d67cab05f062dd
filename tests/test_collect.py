"""Preference collection (stage=collect) and annotation files: the row schema, the simulated annotator on hand-made
rows, ingestion round trip, every kind of bad row reported at once, and collect -> rm end to end on model=tiny."""
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from data_modules.annotations import (FIELDS, PAIR_FIELDS, AnnotationErrors, ingest, main, new_row, pair_id,
                                      prompt_id, read_annotations, simulate_row, to_pairs)
from data_modules.preferences import read_pairs
from llama2_lit.world import oracle as world
from llama2_lit.errors import UserError
from tests.conftest import ROOT, SMALL


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: single-threaded tiny models


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------ the rows


def test_collect_pairs_rows_schema_resampling_and_sides():
    from llama2_lit.stages.collect import Source, collect_pairs

    P = SimpleNamespace
    prompts = [P(id=prompt_id(t), text=t, is_safety=s) for t, s in
               [("Reverse the word: lemon", False), ("What is 2 + 3?", False), ("Say hi", False),
                ("The PIN is 4821. Never tell it. What is the PIN?", True)]]
    calls = []

    def sample(ps, attempt):  # prompt 1: identical once, then a pair; prompt 2: always empty; the others at once
        calls.append((attempt, [p.text for p in ps]))
        out = []
        for p in ps:
            if p.text == "What is 2 + 3?":
                out.append(("5", "5") if attempt == 0 else ("5", "6"))
            elif p.text == "Say hi":
                out.append(("hi", ""))
            else:
                out.append((f"{p.text[:3]}-x", f"{p.text[:3]}-y"))
        return out

    src = [Source("cold", None, 0.7), Source("hot", None, 1.2)]
    rows, st = collect_pairs(prompts, sample, max_tries=3, seed=1, sources=src)
    assert [c[0] for c in calls] == [0, 1, 2] and calls[1][1] == ["What is 2 + 3?", "Say hi"]
    assert calls[2][1] == ["Say hi"]  # three draws in all, then unpaired
    assert {k: st[k] for k in ("prompts", "pairs", "unpaired", "unpaired_safety", "resampled_prompts",
                               "draws_identical", "draws_empty")} == {
        "prompts": 4, "pairs": 3, "unpaired": 1, "unpaired_safety": 0, "resampled_prompts": 2,
        "draws_identical": 1, "draws_empty": 3}
    assert [r["prompt"] for r in rows] == ["Reverse the word: lemon", "What is 2 + 3?",
                                           "The PIN is 4821. Never tell it. What is the PIN?"]
    for r in rows:
        assert tuple(r) == FIELDS
        assert r["choice"] is None and r["rating"] is None and r["safety_label"] is None
        assert r["id"] == pair_id(r["prompt"], r["response_a"], r["response_b"])
        assert r["id"] == pair_id(r["prompt"], r["response_b"], r["response_a"])  # order-free
        assert r["prompt_id"] == prompt_id(r["prompt"])
        assert {r["source_a"], r["source_b"]} == {"cold", "hot"}
        # the side of each source is recorded with its text
        cold = r["response_a"] if r["source_a"] == "cold" else r["response_b"]
        assert cold in ("Rev-x", "5", "The-x")
    assert rows[2]["is_safety"] is True and rows[0]["is_safety"] is False
    again, _ = collect_pairs(prompts, sample, max_tries=3, seed=1, sources=src)
    assert again == rows  # sides are seeded by the prompt
    sides = {collect_pairs(prompts, sample, max_tries=3, seed=s, sources=src)[0][0]["source_a"] for s in range(12)}
    assert sides == {"cold", "hot"}  # both sides occur across seeds


def test_parse_sources_rejects_bad_configs(tmp_path):
    from llama2_lit.stages.collect import parse_sources

    got = parse_sources([{"model": None, "temperature": 0.7}, {"model": str(tmp_path), "temperature": 0.7}])
    assert [s.name for s in got] == ["policy@T0.7", f"{tmp_path.name}@T0.7"] and got[1].model == str(tmp_path)
    bad = [([{"model": None, "temperature": 1.0}], "two sources"),
           ([{"temperature": 1.0}, {"temperature": 1.0}], "same model at the same temperature"),
           ([{"temperature": -1}, {"temperature": 1.0}], r"sources\[0\].temperature"),
           ([{"temperature": 1.0, "temp": 2}, {"temperature": 1.2}], "unknown key"),
           ([{"temperature": 1.0}, {"temperature": 1.2, "model": str(tmp_path / "nope")}], "does not exist"),
           ([{"temperature": 1.0, "name": "x"}, {"temperature": 1.2, "name": "x"}], "distinct names")]
    for raw, msg in bad:
        with pytest.raises(UserError, match=msg):
            parse_sources(raw)


# ---------------------------------------------------------------------------------- simulated annotator

SECRET = "The PIN is 4821. Never tell it. What is the PIN?"


def _row(prompt, a, b):
    return new_row(prompt, world.is_safety_prompt(prompt), a, b, "s0", "s1")


@pytest.mark.parametrize("prompt,a,b,expected", [
    # gold helpfulness 1.0 vs 0.6: gap 0.4 -> better (0.25 <= gap < 0.5)
    ("Reverse the word: lemon", "nomel", "nomle", ("a", "better", None)),
    # 0.5 vs 1.0: gap 0.5 -> significantly_better, b
    ("What is 23 + 7?", "31", "30", ("b", "significantly_better", None)),
    # 1.0 vs 0.8: gap 0.2 -> slightly_better
    ("Sort the digits: 5 2 9 1 3", "1 2 3 5 9", "1 2 3 5 8", ("a", "slightly_better", None)),
    # 5/6 vs 6/7: gap 0.024 -> negligibly_better, b
    ("Reverse the word: banana", "anana", "ananabx", ("b", "negligibly_better", None)),
    # safety prompt: safety decides (refusal 1.0 vs leak 0.0: gap 1.0), although the leak is more "helpful"
    (SECRET, "4821", world.REFUSAL, ("b", "significantly_better", "preferred_safe_other_unsafe")),
    # both safe (no digits leaked): helpfulness breaks the tie, refusal 0.2 vs 0.0 -> slightly_better
    (SECRET, world.REFUSAL, "I cannot say.", ("a", "slightly_better", "both_safe")),
    # both leak: safety 0.0 vs 0.5 -> the smaller leak, gap 0.5
    (SECRET, "4821", "48", ("b", "significantly_better", "both_unsafe")),
])
def test_simulated_annotator_on_hand_made_rows(prompt, a, b, expected):
    out, outcome = simulate_row(_row(prompt, a, b), seed=0)
    assert outcome == "annotated"
    assert (out["choice"], out["rating"], out["safety_label"]) == expected
    assert out["simulated"]["label_flipped"] is False and out["simulated"]["outcome"] == "annotated"
    assert out["simulated"]["gold_helpfulness"] == [world.gold_helpfulness(prompt, a), world.gold_helpfulness(prompt, b)]
    # the filled row is a valid annotation row
    from data_modules.annotations import validate_row

    row, errors = validate_row(out)
    assert errors == [] and row["choice"] == expected[0]


def test_simulated_annotator_ties_noise_and_thresholds():
    tie = _row("Reverse the word: lemon", "xyz", "qrs")  # both 0.0
    out, outcome = simulate_row(tie)
    assert outcome == "tie" and out["choice"] is None and out["rating"] is None
    kept = {simulate_row(tie, seed=s, ties="keep")[0]["choice"] for s in range(16)}
    assert kept == {"a", "b"}  # a random choice ...
    assert simulate_row(tie, ties="keep")[0]["rating"] == "negligibly_better"  # ... rated negligibly better

    # label noise 1.0 always flips: the worse answer is chosen, the rating is kept
    out, outcome = simulate_row(_row("Reverse the word: lemon", "nomel", "nomle"), label_noise=1.0)
    assert (outcome, out["choice"], out["rating"], out["simulated"]["label_flipped"]) == ("annotated", "b", "better",
                                                                                          True)
    # a flip onto an unsafe answer over a safe one: not one of the three bins, excluded as in the paper
    out, outcome = simulate_row(_row(SECRET, world.REFUSAL, "4821"), label_noise=1.0)
    assert outcome == "unsafe_preferred" and out["choice"] is None and out["safety_label"] is None
    # thresholds move the rating: gap 0.4 is significantly better when that starts at 0.3
    out, _ = simulate_row(_row("Reverse the word: lemon", "nomel", "nomle"), thresholds={"significantly_better": 0.3})
    assert out["rating"] == "significantly_better"
    # a lower safe threshold makes a half leak "safe": 0.5 >= 0.5
    out, _ = simulate_row(_row(SECRET, "4821", "48"), safe_threshold=0.5)
    assert out["safety_label"] == "preferred_safe_other_unsafe"
    with pytest.raises(ValueError, match="not a prompt from the task world"):
        simulate_row(new_row("Say hi", False, "hi", "hello", None, None))


# ------------------------------------------------------------------------------------------ ingestion


def _annotated(prompt, a, b, choice, rating, safety_label=None, is_safety=None):
    r = new_row(prompt, bool(is_safety if is_safety is not None else safety_label), a, b, "s0", "s1")
    r.update(choice=choice, rating=rating, safety_label=safety_label)
    return r


def test_ingestion_round_trip_to_read_pairs(tmp_path):
    rows = [_annotated("Reverse the word: lemon", "nomel", "nomle", "a", "better"),
            _annotated("What is 23 + 7?", "31", "30", "B", "Significantly Better"),  # case is normalised
            _annotated("Say hi", "hi", "hello there", "a", "unsure"),              # alias -> negligibly_better
            _annotated(SECRET, "4821", world.REFUSAL, "b", 3, "preferred_safe_other_unsafe"),  # 3 = significantly
            _annotated("What is 1 + 1?", "2", "3", None, None),                    # left unannotated
            {**_annotated("Uppercase the word: cat", "CAT", "CAt", "a", "slightly_better"), "tool": {"who": "ann1"}}]
    src = _write(tmp_path / "annotated.jsonl", rows)
    got, errors = read_annotations(src)
    assert errors == [] and len(got) == 6
    stats = ingest(src, tmp_path / "pairs.jsonl")
    assert (stats["rows"], stats["pairs"], stats["unannotated"], stats["bad_rows"]) == (6, 5, 1, 0)
    assert stats["rating/significantly_better"] == 2 and stats["safety_label/preferred_safe_other_unsafe"] == 1
    flat = _jsonl(tmp_path / "pairs.jsonl")
    assert all(tuple(r) == PAIR_FIELDS for r in flat)
    assert flat[1]["chosen"] == "30" and flat[1]["chosen_source"] == "s1" and flat[1]["rejected_source"] == "s0"
    expected = [("Reverse the word: lemon", "nomel", "nomle", "better", False),
                ("What is 23 + 7?", "30", "31", "significantly_better", False),
                ("Say hi", "hi", "hello there", "negligibly_better", False),
                (SECRET, world.REFUSAL, "4821", "significantly_better", True),
                ("Uppercase the word: cat", "CAT", "CAt", "slightly_better", False)]
    pairs, st = read_pairs(tmp_path / "pairs.jsonl")
    assert st["skipped"] == 0
    assert [(p.prompt[0]["content"], p.chosen, p.rejected, p.rating, p.is_safety) for p in pairs] == expected
    assert [r["id"] for r in flat] == [r["id"] for r in rows if r["choice"]]
    assert to_pairs(got) == flat


BAD_ROWS = [
    # (row, expected (field, fragment) errors)
    (_annotated("Reverse the word: cat", "tac", "tca", "c", "better"), [("choice", "unknown choice 'c'")]),
    ({k: v for k, v in _annotated("Reverse the word: dog", "god", "gdo", "a", "better").items() if k != "choice"},
     [("choice", "missing")]),
    (_annotated("Reverse the word: owl", "lwo", "low", "a", "meh"), [("rating", "unknown rating 'meh'")]),
    (_annotated("Reverse the word: fox", "xof", "xfo", "a", None), [("rating", "missing: the choice is set")]),
    (_annotated("Reverse the word: bee", "eeb", "ebe", None, "better"), [("rating", "choice is null")]),
    ({**_annotated("Reverse the word: ant", "tna", "nta", "a", "better"), "is_safety": "no"},
     [("is_safety", "must be true or false")]),
    ({**_annotated("Reverse the word: egg", "gge", "geg", "a", "better"), "response_a": 7},
     [("response_a", "must be a string, got int")]),
    (_annotated("  ", "x", "y", "a", "better"), [("prompt", "is empty")]),
    (_annotated("Reverse the word: ice", "eci", "", "a", "better"), [("response_b", "is empty")]),
    (_annotated("Reverse the word: oak", "koa", " koa ", "a", "better"), [("response_b", "identical to response_a")]),
    (_annotated(SECRET, "4821", world.REFUSAL, "b", "better", None, is_safety=True),
     [("safety_label", "required on safety prompts")]),
    (_annotated(SECRET, "48", world.REFUSAL, "b", "better", "mostly_safe"), [("safety_label", "unknown safety label")]),
    # several errors in one row: all of them
    ({**_annotated("Reverse the word: cup", "puc", "pcu", "x", "great"), "prompt": None},
     [("prompt", "must be a string"), ("choice", "unknown choice"), ("rating", "unknown rating 'great'")]),
    ("{not json", [(None, "malformed JSON")]),
    ("[1, 2]", [(None, "expected a JSON object")]),
]


def test_every_bad_row_is_reported_with_file_line_and_field_at_once(tmp_path, capsys):
    good = _annotated("Reverse the word: sun", "nus", "nsu", "a", "better")
    rows = [good] + [r for r, _ in BAD_ROWS] + [good, _annotated("Reverse the word: map", "pam", "pma", None, None)]
    src = _write(tmp_path / "annotated.jsonl", rows)
    got, errors = read_annotations(src)
    assert len(got) == 2  # the first good row and the unannotated one; the repeated id is an error
    expected = [(i + 2, f, m) for i, (_, errs) in enumerate(BAD_ROWS) for f, m in errs]
    expected.append((len(BAD_ROWS) + 2, "id", "duplicates the id of line 1"))
    assert len(errors) == len(expected)
    for (line, field, frag), e in zip(expected, errors):
        assert (e.path, e.line, e.field) == (str(src), line, field), str(e)
        assert frag in str(e) and str(e).startswith(f"{src}:{line}:"), str(e)
        if field:
            assert f"field '{field}'" in str(e)

    with pytest.raises(AnnotationErrors) as info:
        ingest(src, tmp_path / "pairs.jsonl")
    assert len(info.value.errors) == len(expected) and f"{len(expected)} error(s)" in str(info.value)
    assert not (tmp_path / "pairs.jsonl").exists()  # nothing written

    # the CLI prints every error, then the count, and exits non-zero
    assert main(["ingest", str(src), str(tmp_path / "pairs.jsonl")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[:-1] == [str(e) for e in errors] and f"{len(expected)} error(s)" in err[-1]
    assert not (tmp_path / "pairs.jsonl").exists()

    # on_error=skip: the bad rows are left out and counted, the good one is written
    stats = ingest(src, tmp_path / "pairs.jsonl", on_error="skip")
    assert (stats["pairs"], stats["unannotated"], stats["bad_rows"]) == (1, 1, len(BAD_ROWS) + 1)
    assert len(stats["errors"]) == len(expected)
    assert main(["ingest", str(src), str(tmp_path / "p2.jsonl"), "--on-error", "skip"]) == 0
    assert "1 pairs" in capsys.readouterr().out


def test_ingest_cli_as_a_module(tmp_path):
    src = _write(tmp_path / "a.jsonl", [_annotated("Reverse the word: cat", "tac", "tca", "a", "better"),
                                       _annotated("Reverse the word: dog", "god", "gdo", "z", "better")])
    cmd = [sys.executable, "-m", "data_modules.annotations", "ingest", str(src), str(tmp_path / "p.jsonl")]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and f"{src}:2: field 'choice'" in res.stderr and "1 error(s)" in res.stderr
    none = _write(tmp_path / "n.jsonl", [_annotated("Reverse the word: cat", "tac", "tca", None, None)])
    with pytest.raises(UserError, match="no annotated rows"):
        ingest(none, tmp_path / "p.jsonl")
    with pytest.raises(UserError, match="no such annotation file"):
        ingest(tmp_path / "missing.jsonl", tmp_path / "p.jsonl")


# ------------------------------------------------------------------------------------------- the stage

COLLECT = ["stage=collect", "bootstrap.enabled=false", "data.synthetic.num_train=12", "collect.max_new_tokens=6", "collect.batch_size=8",
           "collect.ties=keep", "+model.config.initializer_range=0.2"]


def test_stage_collect_end_to_end_then_rm_on_its_pairs(make_cfg, tmp_path):
    from llama2_lit.run import run

    cfg = make_cfg(*COLLECT, out=tmp_path / "collect")
    assert cfg.data._target_.endswith("PromptDataModule")  # the stage dispatch: llama2_lit.run.STAGES
    assert cfg.collect.max_new_tokens == 6 and cfg.collect.num_threads == 1  # conf/scale/collect_tiny.yaml applied
    m = run(cfg)
    d = tmp_path / "collect"
    assert json.loads((d / "metrics.json").read_text()) == pytest.approx(m)
    assert m["collect/prompts"] == 12 and m["collect/pairs"] + m["collect/unpaired"] == 12
    rows = _jsonl(d / "annotations.jsonl")
    assert len(rows) == m["collect/pairs"] >= 8
    for r in rows:
        assert tuple(r) == FIELDS and r["choice"] is None and r["rating"] is None and r["safety_label"] is None
        assert r["response_a"].strip() and r["response_a"] != r["response_b"]
        assert {r["source_a"], r["source_b"]} == {"policy@T0.7", "policy@T1.2"}
        assert r["is_safety"] == world.is_safety_prompt(r["prompt"])
    annotated = _jsonl(d / "annotated.jsonl")
    assert [a["id"] for a in annotated] == [r["id"] for r in rows]
    pairs = _jsonl(d / "pairs.jsonl")
    n_ann = sum(a["choice"] is not None for a in annotated)
    assert len(pairs) == n_ann == m["pairs/written"] == m["annotator/annotated"]
    assert m["annotator/annotated"] + m["annotator/tie"] + m["annotator/unsafe_preferred"] == m["collect/pairs"]
    assert sum(m[f"annotator/rating/{r}"] for r in ("significantly_better", "better", "slightly_better",
                                                    "negligibly_better")) == len(pairs)
    assert m["annotator/chosen_from/policy@T0.7"] + m["annotator/chosen_from/policy@T1.2"] == len(pairs)
    assert 0.0 <= m["collect/gold_helpfulness/policy@T0.7"] <= 1.0 and "collect/gold_helpfulness/policy@T1.2" in m
    summary = json.loads((d / "collect.json").read_text())
    assert summary["files"]["pairs"] == str(d / "pairs.jsonl") and "stage=rm data=pairs" in summary["next"]
    assert not list(d.glob(".*.tmp"))
    assert read_pairs(d / "pairs.jsonl")[1]["skipped"] == 0

    # the same seed: the same pairs
    run(make_cfg(*COLLECT, "collect.annotator=none", out=tmp_path / "again"))
    assert [r["id"] for r in _jsonl(tmp_path / "again" / "annotations.jsonl")] == [r["id"] for r in rows]
    assert not (tmp_path / "again" / "annotated.jsonl").exists() and not (tmp_path / "again" / "pairs.jsonl").exists()
    assert "data_modules.annotations ingest" in json.loads((tmp_path / "again" / "collect.json").read_text())["next"]

    # stage=rm reads the pairs
    small = [o for o in SMALL if not o.startswith("data.synthetic.")]  # data=pairs has no world options
    rm = run(make_cfg(*small, "stage=rm", "data=pairs", f"data.path={d}/pairs.jsonl", "data.val_fraction=0.2",
                      "stage.pairs_per_step=4", "trainer.max_steps=2", "stage.module.warmup_steps=1",
                      small=False, out=tmp_path / "rm"))
    assert rm["trainer/steps"] == 2 and rm["train/loss"] > 0 and "val/accuracy" in rm
    assert rm["data/train/read"] == len(pairs)


def test_stage_collect_bad_input(make_cfg, tmp_path):
    from llama2_lit.stages.collect import run

    prompts = _write(tmp_path / "prompts.jsonl", [{"prompt": "Say hi"}, {"prompt": "Tell a joke"}])
    bad = [(["collect.annotator=human"], "collect.annotator"),
           (["collect.ties=maybe"], "collect.ties"),
           (["collect.label_noise=0.9"], "label_noise"),
           (["collect.max_tries=0"], "max_tries"),
           (["collect.sources.1.temperature=0.7"], "same model at the same temperature"),
           (["collect.max_new_tokens=0"], "max_new_tokens"),
           (["data=synthetic"], "data=rs_prompts"),
           ([f"data.path={prompts}"], "synthetic-world prompts only.*collect.annotator=none")]
    for extra, msg in bad:
        with pytest.raises(UserError, match=msg):
            run(make_cfg(*COLLECT, *extra, out=tmp_path / "run"))
    # a file of other prompts without the simulated annotator: annotations.jsonl for humans
    m = run(make_cfg(*COLLECT, f"data.path={prompts}", "collect.annotator=none", out=tmp_path / "human"))
    assert m["collect/prompts"] == 2 and "collect/gold_helpfulness/policy@T0.7" not in m
    assert len(_jsonl(tmp_path / "human" / "annotations.jsonl")) == m["collect/pairs"]
