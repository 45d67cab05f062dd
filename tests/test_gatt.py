"""Ghost Attention (stage=gatt): the world's dialogues and instructions, the rows' loss mask, the instruction kept on
the first turn only, best-of-K sampling carried turn to turn, and hostile dialogue files."""
from __future__ import annotations

import json
import random

import pytest

from callbacks.gatt_eval import adherence_by_turn, converse
from data_modules.records import tokenize_chat
from llama2_lit.core.losses import IGNORE_INDEX
from llama2_lit.errors import DataError, UserError
from llama2_lit.generation.engine import Sampling
from llama2_lit.stages.gatt import gold_score, read_dialogues, sample_dialogues, training_rows
from llama2_lit.world import dialogue as wd
from llama2_lit.world import oracle as world

D = wd.Dialogue("exclaim", "Rule: end with !", ("Reverse the word: lemon", "What is 2 + 3?", "Uppercase the word: cat"))


@pytest.mark.parametrize("key, response, adheres", [
    ("exclaim", "nomel!", 1.0), ("exclaim", " nomel! ", 1.0), ("exclaim", "nomel", 0.0), ("exclaim", "!nomel", 0.0),
    ("smile", "nomel :)", 1.0), ("smile", "nomel:)", 1.0), ("smile", ":) nomel", 0.0), ("smile", "nomel :(", 0.0),
    ("upper", "NOMEL", 1.0), ("upper", "NoMEL", 0.0), ("upper", "47", 0.0), ("upper", "", 0.0),
    ("exclaim", "", 0.0),
])
def test_adherence_by_hand(key, response, adheres):
    assert wd.adheres(key, response) == adheres


@pytest.mark.parametrize("key, prompt, response, gold", [
    ("exclaim", "Reverse the word: lemon", "nomel!", 1.0),
    ("exclaim", "Reverse the word: lemon", "nomle!", 3 / 5),
    ("smile", "What is 23 + 7?", "30 :)", 1.0),
    ("smile", "What is 23 + 7?", "30", 1.0),            # the rule broken, the content right
    ("smile", "What is 23 + 7?", "31 :) :)", 0.0),      # "31 :)" is not a number
    ("upper", "Reverse the word: lemon", "NOMEL", 1.0),   # lowercased for a family that answers in lowercase
    ("upper", "Uppercase the word: lemon", "LEMON", 1.0),  # as written for one that asks for uppercase
    ("upper", "Write 2 words that end with e, in uppercase.", "HORSE ROSE", 1.0),
    ("exclaim", "Reverse the word: lemon", "nomel!!", 0.0 + sum(a == b for a, b in zip("nomel", "nomel!")) / 6),
])
def test_content_gold_undoes_the_rule_by_hand(key, prompt, response, gold):
    assert wd.content_gold(key, prompt, response) == pytest.approx(gold)


def test_follow_is_what_adheres_checks_and_keeps_the_content():
    for t in world.generate_tasks(60, seed=3):
        if t.is_safety:
            continue
        for key, ins in wd.INSTRUCTIONS.items():
            if t.family in ins.families:
                a = wd.follow(key, t.answer)
                assert wd.adheres(key, a) == 1.0 and wd.content_gold(key, t.prompt, a) == 1.0, (key, t.prompt, a)


def test_generated_dialogues_are_deterministic_held_out_and_respect_families():
    a = wd.generate_dialogues(30, 5, seed=1, split="heldout")
    assert a == wd.generate_dialogues(30, 5, seed=1, split="heldout") != wd.generate_dialogues(30, 5, seed=2,
                                                                                                split="heldout")
    assert {d.key for d in a} == set(wd.INSTRUCTIONS)
    assert {d.instruction for d in a} <= {t for i in wd.INSTRUCTIONS.values() for t in (i.long, i.short)}
    for d in a:
        assert len(d.prompts) == 5 and all(world.split_of(p) == "heldout" for p in d.prompts)
        assert all(world.family_of(p) in wd.INSTRUCTIONS[d.key].families for p in d.prompts)
        assert wd.instruction_of(d.instruction) == d.key
    with pytest.raises(ValueError):
        wd.generate_dialogues(2, 0)
    with pytest.raises(ValueError):
        wd.instruction_of("Speak like a pirate.")


def test_messages_put_the_instruction_where_asked():
    first = wd.messages(D, ["nomel!"], "first")
    assert first == [{"role": "user", "content": "Rule: end with ! Reverse the word: lemon"},
                     {"role": "assistant", "content": "nomel!"},
                     {"role": "user", "content": "What is 2 + 3?"}]
    every = wd.messages(D, ["nomel!"], "every")
    assert [m["content"] for m in every if m["role"] == "user"] == ["Rule: end with ! Reverse the word: lemon",
                                                                   "Rule: end with ! What is 2 + 3?"]
    assert wd.messages(D, ["a", "b"], "none", open_turn=False)[-1] == {"role": "assistant", "content": "b"}
    with pytest.raises(ValueError):
        wd.messages(D, ["a", "b", "c", "d"])


def test_sft_rows_never_carry_an_instruction_past_its_turn():
    rng = random.Random(0)
    rows = [wd.sft_dialogue(rng) for _ in range(300)]
    assert sum(len(r) > 6 for r in rows) and sum(len(r) == 2 for r in rows)
    def split(user):  # (instruction key, prompt) of a user message, key None without an instruction
        for ins in wd.INSTRUCTIONS.values():
            for text in (ins.long, ins.short):
                if user.startswith(text + " "):
                    return ins.key, user[len(text) + 1:]
        return None, user

    for r in rows:
        pairs = [(split(u["content"]), a["content"]) for u, a in zip(r[::2], r[1::2])]
        keys = {k for (k, _), _ in pairs}
        assert len(keys) == 1  # a plain dialogue, or one whose every user turn repeats the same instruction
        key = keys.pop()
        assert (2 <= len(pairs) <= 6) if key is None else (1 <= len(pairs) <= 3)
        for (_, prompt), a in pairs:
            world.family_of(prompt)  # a world prompt (raises otherwise)
            if key is None:
                assert world.gold_helpfulness(prompt, a) == 1.0
            else:
                assert wd.adheres(key, a) == 1.0 and wd.content_gold(key, prompt, a) == 1.0


def test_the_gatt_row_masks_every_earlier_token_answers_included(tok):
    """A 3-turn row: labels are IGNORE on the first two turns (assistant answers too) and equal the ids on the last
    answer and its end-of-turn token, token by token."""
    msgs = wd.messages(D, ["nomel!", "5!", "CAT!"], "first", open_turn=False)
    ids, labels = tokenize_chat(msgs, tok, last_only=True)
    text = tok.apply_chat_template(msgs, tokenize=False)
    prefix = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    k = len(tok(prefix, add_special_tokens=False)["input_ids"])
    answer = tok("CAT!", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert labels == [IGNORE_INDEX] * k + answer
    assert len(ids) == k + len(answer)
    # without last_only every answer carries the loss (the SFT rows' mask): the first two answers differ
    _, all_labels = tokenize_chat(msgs, tok)
    kept = [i for i, x in enumerate(all_labels) if x != IGNORE_INDEX]
    assert tok.decode([ids[i] for i in kept]).count("!") == 3
    assert sum(x != IGNORE_INDEX for x in labels) == len(answer)


def test_training_rows_keep_the_instruction_on_the_first_turn_only():
    rows = training_rows([D], [["nomel!", "5!", "CAT!"]])
    assert len(rows) == 3
    for t, r in enumerate(rows, start=1):
        m = r["messages"]
        assert len(m) == 2 * t and m[-1]["role"] == "assistant"
        users = [x["content"] for x in m if x["role"] == "user"]
        assert users[0] == "Rule: end with ! Reverse the word: lemon"
        assert users[1:] == list(D.prompts[1:t])  # later turns: the bare prompts
    last = training_rows([D], [["nomel!", "5!", "CAT!"]], rows="last_turn")
    assert last == [rows[-1]]
    with pytest.raises(UserError, match="gatt.rows"):
        training_rows([D], [["a"]], rows="all")


class FakeEngine:
    """Answers turn t of a conversation with candidates [f"{t}a", f"{t}b!", f"{t}c"] (K=3) and records the prompts."""

    def __init__(self):
        self.seen = []

    def generate_text(self, convs, sampling, batch_size):
        self.seen.append(convs)
        out = []
        for c in convs:
            t = sum(m["role"] == "user" for m in c)
            out.append([f"{t}a", f"{t}b!", f"{t}c"][:sampling.num_samples])
        return out


def test_best_of_k_is_kept_and_carried_into_the_next_turn():
    eng = FakeEngine()
    d = wd.Dialogue("exclaim", "Rule: end with !", ("What is 2 + 3?", "What is 1 + 1?"))

    def score(idx, t, convs, answers):
        return [gold_score(d, t, a) for a in answers]

    answers, m = sample_dialogues(eng, [d], Sampling(num_samples=3, temperature=1.0), score)
    assert answers == [["1b!", "2b!"]]  # the only ones that follow the rule (content gold 0: "1b" is not 5)
    # turn 2 sees turn 1's chosen answer and the instruction on both user turns
    assert eng.seen[1][0] == [{"role": "user", "content": "Rule: end with ! What is 2 + 3?"},
                              {"role": "assistant", "content": "1b!"},
                              {"role": "user", "content": "Rule: end with ! What is 1 + 1?"}]
    assert m["gatt/selected_score"] == pytest.approx(1.0) and m["gatt/sample_score"] == pytest.approx(1 / 3)


def test_adherence_by_turn_by_hand():
    d2 = wd.Dialogue("upper", "Rule: uppercase.", ("Reverse the word: lemon", "Uppercase the word: cat"))
    answers = [["nomel!", "5"], ["NOMEL", "cat"]]
    m = adherence_by_turn([D, d2], answers, [1, 2, 3])
    assert m["gatt/adherence@turn1"] == 1.0 and m["gatt/adherence@turn2"] == 0.0
    assert m["gatt/content_gold@turn2"] == pytest.approx((1.0 + 0.0) / 2)  # "5" answers 2 + 3; "cat" is not CAT
    assert "gatt/adherence@turn3" not in m  # no dialogue reaches turn 3


def test_converse_answers_turn_by_turn_with_the_instruction_on_turn_one():
    eng = FakeEngine()
    answers = converse(eng, [D], Sampling(temperature=0.0), "first")
    assert answers == [["1a", "2a", "3a"]]
    assert [m["content"] for m in eng.seen[2][0] if m["role"] == "user"] == [
        "Rule: end with ! Reverse the word: lemon", "What is 2 + 3?", "Uppercase the word: cat"]


@pytest.mark.parametrize("record, field", [
    ({"turns": ["hi"]}, "instruction"),
    ({"instruction": "  ", "turns": ["hi"]}, "instruction"),
    ({"instruction": "Be brief.", "turns": []}, "turns"),
    ({"instruction": "Be brief.", "turns": "hi"}, "turns"),
    ({"instruction": "Be brief.", "turns": ["hi", 3]}, "turns[1]"),
])
def test_a_bad_dialogue_file_names_file_line_and_field(tmp_path, record, field):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"instruction": "Be brief.", "turns": ["hi", "and?"]}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError) as e:
        read_dialogues(str(p))
    assert f"{p}:2" in str(e.value) and f"'{field}'" in str(e.value)
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({"instruction": "Be brief.", "turns": ["hi", "and?"]}) + "\n")
    assert read_dialogues(str(ok)) == [wd.Dialogue("", "Be brief.", ("hi", "and?"))]


def test_the_world_sft_data_mixes_in_the_dialogue_rows(tok):
    from data_modules.sft import PackedSFTDataModule

    dm = PackedSFTDataModule(tok, synthetic={"num_train": 40, "num_val": 4, "dialogue_fraction": 0.25}, seq_len=512)
    rows = dm._synthetic_examples("train", 40, 0)
    texts = [tok.decode(ids) for ids, _ in rows]
    multi = [t for t in texts if t.count("<|user|>") > 1]
    instructed = [t for t in texts if any(x in t for i in wd.INSTRUCTIONS.values() for x in (i.long, i.short))]
    assert len(rows) == 40 and len(set(multi) | set(instructed)) == 10
    plain = PackedSFTDataModule(tok, synthetic={"num_train": 40, "num_val": 4}, seq_len=512)
    assert all(t.count("<|user|>") == 1 for t in (tok.decode(i) for i, _ in plain._synthetic_examples("train", 40, 0)))
    with pytest.raises(UserError, match="dialogue_fraction"):
        PackedSFTDataModule(tok, synthetic={"dialogue_fraction": 1.5})


def test_a_messages_file_with_loss_turns_last_trains_the_last_answer_only(tok, tmp_path):
    from data_modules.sft import PackedSFTDataModule

    p = tmp_path / "rows.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in training_rows([D], [["nomel!", "5!", "CAT!"]])))
    dm = PackedSFTDataModule(tok, path=str(p), format="messages", loss_turns="last", packing="none", seq_len=512,
                             val_fraction=0.0)
    rows = dm._file_examples(str(p))
    for (ids, labels), last in zip(rows, ["nomel!", "5!", "CAT!"]):
        kept = [i for i, x in zip(ids, labels) if x != IGNORE_INDEX]
        assert kept == tok(last, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with pytest.raises(UserError, match="data.loss_turns: unknown 'first'"):
        PackedSFTDataModule(tok, path=str(p), format="messages", loss_turns="first")


def test_rows_whose_answer_breaks_the_rule_are_left_out_on_the_world():
    rows = training_rows([D], [["nomel!", "5", "CAT!"]], follows_rule=True)
    assert [r["messages"][-1]["content"] for r in rows] == ["nomel!", "CAT!"]
    assert rows[1]["messages"][3] == {"role": "assistant", "content": "5"}  # kept in the history, loss-free
    assert len(training_rows([D], [["nomel!", "5", "CAT!"]])) == 3


def test_replay_rows_are_gold_world_rows():
    from llama2_lit.stages.gatt import replay_rows

    rows = replay_rows(40, 3)
    assert rows == replay_rows(40, 3) and len(rows) == 40
    for r in rows:
        m = r["messages"]
        assert m[-1]["role"] == "assistant" and all(x["content"] for x in m)
    assert any(len(r["messages"]) == 2 for r in rows) and any(len(r["messages"]) > 2 for r in rows)


def test_a_dialogue_file_needs_the_reward_model_scorer(make_cfg, tmp_path):
    from llama2_lit.run import run

    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"instruction": "Be brief.", "turns": ["hi"]}) + "\n")
    with pytest.raises(UserError, match=r"gatt.scorer=gold checks the world's instructions only; gatt.dialogues is"):
        run(make_cfg("stage=gatt", f"gatt.dialogues={f}", "model.path=/nowhere", out=tmp_path / "run"))
    with pytest.raises(UserError, match=r"gatt.scorer: unknown 'oracle' \(choose gold, rm, rm_rule\)"):
        run(make_cfg("stage=gatt", "gatt.scorer=oracle", out=tmp_path / "run2"))
