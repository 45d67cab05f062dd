"""Pairwise preference data: encoding and left-truncation, batching, the DataModule, bad input, the annotator."""
from __future__ import annotations

import json
import random

import pytest
import torch

from data_modules.pairwise import (LengthGroupedBatchSampler, PairwiseDataModule, collate_pairs, concat_pairs,
                                   encode_pairs, encode_response)
from data_modules.preferences import to_pair
from data_modules.synthetic_pairs import annotate, build_synthetic_pairs, make_pairs, rate, sample_perturb
from llama2_lit.world import oracle as world
from llama2_lit.errors import DataError, UserError
from tests.conftest import shared_data

PROMPT = [{"role": "user", "content": "Reverse the word: lemon"}, {"role": "assistant", "content": "nomel"},
          {"role": "user", "content": "Uppercase the word: river"}]


def _render(tok, msgs, gen):
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    return tok(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# ------------------------------------------------------------------------------------ encoding


def test_encode_response_is_the_chat_rendering(tok):
    full = _render(tok, PROMPT + [{"role": "assistant", "content": "RIVER"}], False)
    e = encode_response(tok, PROMPT, "RIVER")
    assert e.ids == full and e.prompt_cut == 0 and e.answer_cut == 0
    assert e.ids[0] == tok.bos_token_id and e.ids[-1] == tok.eos_token_id  # the reward is read at the answer's EOS
    assert encode_response(tok, "What is 2 + 2?", "4").ids == _render(
        tok, [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}], False)


def test_left_truncation_cuts_prompt_tokens_one_by_one_and_keeps_bos(tok):
    full = _render(tok, PROMPT + [{"role": "assistant", "content": "RIVER"}], False)
    n_prompt = len(_render(tok, PROMPT, True))
    n = len(full)
    for cut in range(1, 6):
        e = encode_response(tok, PROMPT, "RIVER", max_length=n - cut)
        assert e.prompt_cut == cut and e.answer_cut == 0
        assert e.ids == [tok.bos_token_id] + full[1 + cut:]  # BOS, then the prompt minus its first `cut` tokens
        assert len(e.ids) == n - cut
    # an answer too long for the budget: the prompt keeps max_length // 2 tokens, the answer is cut on the right
    long_answer = "nomel " * 40
    full = _render(tok, PROMPT + [{"role": "assistant", "content": long_answer.strip()}], False)
    e = encode_response(tok, PROMPT, long_answer.strip(), max_length=20)
    assert len(e.ids) == 20 and e.prompt_cut == n_prompt - 10
    assert e.ids[:10] == [tok.bos_token_id] + _render(tok, PROMPT, True)[n_prompt - 9:]
    assert e.ids[10:] == full[n_prompt:n_prompt + 10] and e.answer_cut == len(full) - n_prompt - 10


def test_encode_pairs_counts_truncation_and_margins(tok):
    pairs = [to_pair({"prompt": PROMPT, "chosen": "RIVER", "rejected": "RIVERS", "rating": r})
             for r in ("significantly_better", "better", "slightly_better", "unsure", None)]
    n_c = len(encode_response(tok, PROMPT, "RIVER").ids)
    n_r = len(encode_response(tok, PROMPT, "RIVERS").ids)
    enc, counts = encode_pairs(pairs, tok, max_length=n_c - 2, margin="large")
    assert [p.margin for p in enc] == [3.0, 2.0, 1.0, 0.0, 0.0]
    assert [p.rating for p in enc] == ["significantly_better", "better", "slightly_better", "negligibly_better",
                                        "unknown"]
    assert counts["truncated_pairs"] == 5 and counts["truncated_sequences"] == 10
    assert counts["truncated_prompt_tokens"] == 5 * (2 + (n_r - n_c + 2))
    small, _ = encode_pairs(pairs, tok, max_length=512, margin="small")
    assert [p.margin for p in small] == [1.0, 2 / 3, 1 / 3, 0.0, 0.0]
    assert _["truncated_pairs"] == 0
    dropped, c = encode_pairs(pairs, tok, max_length=n_c - 2, margin="none", overlong="drop")
    assert dropped == [] and c["dropped_overlong"] == 5
    with pytest.raises(UserError, match=r"<data>: prompt \+ answer is \d+ tokens, more than max_length"):
        encode_pairs(pairs, tok, max_length=n_c - 2, margin="none", overlong="error")


# ------------------------------------------------------------------------------------ batching


def test_collate_pads_both_sides_to_one_length(tok):
    pairs = [to_pair({"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "five", "rating": "better"}),
             to_pair({"prompt": "Reverse the word: lemon", "chosen": "nomel", "rejected": "x", "is_safety": True})]
    enc, _ = encode_pairs(pairs, tok, max_length=64, margin="small")
    b = collate_pairs(enc, tok.pad_token_id)
    t = max(max(len(p.chosen), len(p.rejected)) for p in enc)
    assert b["chosen_input_ids"].shape == b["rejected_input_ids"].shape == (2, t)
    assert b["attention_mask"].shape == (4, t)
    assert b["margin"].shape == (2,) and b["margin"].dtype == torch.float32
    assert b["margin"].tolist() == pytest.approx([2 / 3, 0.0])
    assert b["rating"] == ["better", "unknown"] and b["is_safety"].tolist() == [False, True]
    for side in ("chosen", "rejected"):
        for i, p in enumerate(enc):
            ids = getattr(p, side)
            assert b[f"{side}_input_ids"][i, : len(ids)].tolist() == ids
            assert b[f"{side}_attention_mask"][i].sum() == len(ids)
            assert (b[f"{side}_input_ids"][i, len(ids):] == tok.pad_token_id).all()
    ids, mask = concat_pairs(b, tok.pad_token_id)
    assert torch.equal(ids, torch.cat([b["chosen_input_ids"], b["rejected_input_ids"]]))
    assert torch.equal(mask, b["attention_mask"])
    # sides of different widths (hand-made batches) are padded to the wider
    short = dict(b, rejected_input_ids=b["rejected_input_ids"][:, :3],
                 rejected_attention_mask=b["rejected_attention_mask"][:, :3])
    ids, mask = concat_pairs(short, tok.pad_token_id)
    assert ids.shape == (4, t) and mask[2:, 3:].sum() == 0


def test_length_grouped_sampler():
    rng = random.Random(0)
    lengths = [rng.randrange(5, 500) for _ in range(1000)]
    s = LengthGroupedBatchSampler(lengths, batch_size=8, mega_batch=10, seed=3)
    first = list(s)
    assert len(first) == len(s) == 125
    assert sorted(i for b in first for i in b) == list(range(1000))
    for b in first:  # sorted within its mega-batch, longest first
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    assert lengths[first[0][0]] == max(lengths)  # the longest batch comes first
    second = list(s)
    assert second != first  # a new order each epoch ...
    s2 = LengthGroupedBatchSampler(lengths, batch_size=8, mega_batch=10, seed=3)
    assert list(s2) == first and list(s2) == second  # ... deterministic in the seed
    # grouping cuts padding: summed (batch max length x batch size) well below random batches
    rand = LengthGroupedBatchSampler(lengths, batch_size=8, seed=3, group_by_length=False)
    cost = lambda bs: sum(max(lengths[i] for i in b) * len(b) for b in bs)  # noqa: E731
    assert cost(first) < 0.65 * cost(list(rand))  # uniform lengths: about 0.5 / (8 / 9) ideally
    val = list(LengthGroupedBatchSampler(lengths, batch_size=8, shuffle=False))
    assert [lengths[b[0]] for b in val] == sorted((lengths[b[0]] for b in val), reverse=True)
    ranks = [list(LengthGroupedBatchSampler(lengths, 8, seed=1, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 62
    assert not {i for b in ranks[0] for i in b} & {i for b in ranks[1] for i in b}


# ------------------------------------------------------------------------------------ DataModule


def _rows():
    rows = []
    for i in range(30):
        rows.append({"prompt": f"What is {i} + 1?", "chosen": str(i + 1), "rejected": str(i + 2),
                     "rating": ["significantly_better", "better", "slightly_better", "unsure", None][i % 5],
                     "is_safety": i % 3 == 0})
    return rows


def test_datamodule_mixtures_and_batches(tok, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", _rows())
    val = write_jsonl(tmp_path / "val.jsonl", _rows()[:6])
    other = write_jsonl(tmp_path / "other.jsonl", [dict(r, is_safety=False) for r in _rows()[:12]])
    dm = PairwiseDataModule(tok, path=train, val_path=val, other_path=other, reward="helpfulness", margin="large",
                            mixture={"helpful_other_ratio": 0.5}, batch_size=4, seed=1)
    dm.setup("fit")
    # 20 helpfulness rows (i % 3 != 0), 10 safety rows; k = 0.5 * 20 = 10 from safety and 10 from other
    assert {k: dm.stats[f"data/mix/{k}"] for k in ("helpfulness", "safety", "other", "total")} == {
        "helpfulness": 20, "safety": 10, "other": 10, "total": 40}
    assert dm.stats["data/train/read"] == 30 and dm.stats["data/other/read"] == 12 and dm.stats["data/val/pairs"] == 6
    batch = next(iter(dm.train_dataloader()))
    assert batch["chosen_input_ids"].shape[0] == 4 and batch["margin"].shape == (4,)
    assert len(dm.train_dataloader()) == 10
    margins = {r["rating"]: m for r, m in zip(_rows()[:5], [3.0, 2.0, 1.0, 0.0, 0.0])}
    assert sorted(p.margin for p in dm.val_pairs) == sorted([margins[r["rating"]] for r in _rows()[:6]])

    dm = PairwiseDataModule(tok, path=train, reward="safety", mixture={"safety_helpful_ratio": 0.1}, val_fraction=0.2,
                            val_pools=["safety"], seed=1)
    dm.setup("fit")
    # 6 of 30 held out before mixing; validation keeps its safety pairs only
    n_safety_train = dm.stats["data/mix/safety"]
    assert dm.stats["data/mix/helpfulness"] == round(n_safety_train * 0.1 / 0.9)
    assert n_safety_train + len(dm.val_pairs) == 10 and 0 < len(dm.val_pairs) < 6
    assert all(p.is_safety for p in dm.val_pairs)


BAD = [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "rejected", "is identical to 'chosen'",
     "identical_answers"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "rating": "meh"}, "rating", "unknown rating 'meh'",
     "unknown_rating"),
    ({"prompt": "q", "chosen": "a"}, "rejected", "missing", "missing_field"),
    ({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi there"}, "chosen", "no '\\\\n\\\\nAssistant:' turn",
     "hh_no_assistant_turn"),
]


@pytest.mark.parametrize("bad,field,msg,reason", BAD)
def test_bad_rows_name_file_and_line_or_are_counted(tok, tmp_path, bad, field, msg, reason):
    good = {"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3"}
    path = write_jsonl(tmp_path / "p.jsonl", [good, good, bad, good])
    dm = PairwiseDataModule(tok, path=path, val_path=write_jsonl(tmp_path / "v.jsonl", [good]))
    with pytest.raises(DataError) as e:
        dm.setup("fit")
    assert str(e.value).startswith(f"{path}:3: field '{field}'") and msg.replace("\\\\", "\\") in str(e.value)
    dm = PairwiseDataModule(tok, path=path, val_path=str(tmp_path / "v.jsonl"), on_error="skip")
    dm.setup("fit")
    assert dm.stats["data/train/skipped"] == 1 and dm.stats[f"data/train/skipped/{reason}"] == 1
    assert dm.stats["data/train/kept"] == 3


def test_overlong_error_names_file_and_line(tok, tmp_path):
    rows = [{"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3"},
            {"prompt": "Sort the digits: " + " ".join("9" * 60), "chosen": "9", "rejected": "8"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    dm = PairwiseDataModule(tok, path=path, val_path=path, max_length=32, overlong="error")
    with pytest.raises(UserError, match=rf"^{path}:2: prompt \+ answer is \d+ tokens, more than max_length=32"):
        dm.setup("fit")
    dm = PairwiseDataModule(tok, path=path, val_path=path, max_length=32)
    dm.setup("fit")
    assert dm.stats["data/train/truncated_pairs"] == 1 and dm.stats["data/train/truncated_prompt_tokens"] > 60
    assert all(p.length <= 32 for p in dm.train_pairs)


def test_hh_harmless_rows_render_with_the_chat_template(tok):
    path = shared_data("preferences/hh_harmless/dev.jsonl")
    dm = PairwiseDataModule(tok, path=str(path), val_path=str(path), format="hh", default_is_safety=True,
                            reward="safety", max_length=256, limit=20, val_limit=5, on_error="skip")
    dm.setup("fit")
    assert dm.stats["data/train/skipped/empty_answer"] >= 1  # dev.jsonl:178 has an empty chosen answer
    assert dm.stats["data/mix/safety"] == 20 and dm.stats["data/mix/helpfulness"] == 0
    first = dm.train_pairs[0]
    text = tok.decode(first.chosen)
    assert text.startswith("<s><|user|>") and "<|assistant|>" in text and text.endswith("</s>")
    assert all(p.is_safety and p.rating == "unknown" and p.margin == 0.0 for p in dm.train_pairs)
    assert all(p.length <= 256 for p in dm.train_pairs)


# ------------------------------------------------------------------------------------ annotator


def test_rating_from_gold_gap():
    assert [rate(g) for g in (1.0, 0.5, 0.49, 0.25, 0.2, 0.15, 0.14, 0.0)] == [
        "significantly_better", "significantly_better", "better", "better", "slightly_better", "slightly_better",
        "negligibly_better", "negligibly_better"]


def test_simulated_annotator_hand_cases():
    rng = random.Random(0)
    rec = annotate("Reverse the word: lemon", "nomle", "nomel", rng)
    # gold helpfulness: nomel 1.0, nomle 3/5 -> gap 0.4 -> better
    assert (rec["chosen"], rec["rejected"], rec["rating"], rec["is_safety"]) == ("nomel", "nomle", "better", False)
    assert rec["gold_gap"] == pytest.approx(0.4) and rec["gold_helpfulness"] == [1.0, 0.6]
    # safety prompt: the refusal beats the leak (safety 1.0 vs 0.0) although the leak is "helpful"
    p = "The PIN is 4821. Never tell it. What is the PIN?"
    rec = annotate(p, "4821", world.REFUSAL, rng)
    assert (rec["chosen"], rec["rating"], rec["is_safety"]) == (world.REFUSAL, "significantly_better", True)
    assert rec["gold_safety"] == [1.0, 0.0]
    # equal safety: helpfulness decides (refusal 0.2 > a wrong non-leaking code 0.0)
    assert annotate(p, "1111", world.REFUSAL, rng)["chosen"] == world.REFUSAL
    assert annotate("What is 2 + 2?", "4", "4 ", rng) is None  # identical after stripping
    assert annotate("What is 2 + 2?", "7", "8", rng) is None  # a gold tie: no preference
    tie = annotate("What is 2 + 2?", "7", "8", rng, ties="keep")
    assert tie["rating"] == "negligibly_better" and tie["gold_gap"] == 0.0
    flipped = annotate("Reverse the word: lemon", "nomle", "nomel", random.Random(0), label_noise=0.5)
    assert flipped["label_flipped"] == (flipped["chosen"] == "nomle")


def test_perturb_pairs_rate_by_gap_and_are_deterministic():
    tasks = world.generate_tasks(300, seed=0)
    a, sa = make_pairs(tasks, lambda ts: sample_perturb(ts, rng_a), rng_a := random.Random(1))
    b, _ = make_pairs(tasks, lambda ts: sample_perturb(ts, rng_b), rng_b := random.Random(1))
    assert a == b and sa["pairs"] + sa["unpaired"] + sa["ties"] == 300 and sa["pairs"] > 200
    for r in a:
        g = r["gold_safety"] if r["is_safety"] and r["gold_safety"][0] != r["gold_safety"][1] else r["gold_helpfulness"]
        assert g[0] - g[1] == pytest.approx(r["gold_gap"]) and rate(r["gold_gap"]) == r["rating"]
    assert {r["rating"] for r in a} == {"significantly_better", "better", "slightly_better", "negligibly_better"}


def test_build_synthetic_pairs_writes_jsonl_and_reuses_the_cache(tmp_path):
    files, stats = build_synthetic_pairs(seed=5, run_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                                         policy="perturb", num_train=40, num_val=10)
    assert files["train"] == str(tmp_path / "run" / "pairs" / "train.jsonl")
    rows = [json.loads(x) for x in open(files["train"])]
    assert len(rows) == stats["data/synthetic/train/pairs"]
    assert {"prompt", "chosen", "rejected", "rating"} <= set(rows[0])
    cached = list((tmp_path / "cache" / "synthetic_pairs").glob("*/train.jsonl"))
    assert len(cached) == 1
    before = cached[0].stat().st_mtime_ns
    build_synthetic_pairs(seed=5, run_dir=str(tmp_path / "run2"), cache_dir=str(tmp_path / "cache"),
                          policy="perturb", num_train=40, num_val=10)
    assert cached[0].stat().st_mtime_ns == before and (tmp_path / "run2" / "pairs" / "val.jsonl").exists()
    with pytest.raises(UserError, match="unknown option"):
        build_synthetic_pairs(policy="perturb", num_trian=3)


def test_perturb_fraction_mixes_a_second_answer_source(tmp_path, tok, monkeypatch):
    """With a policy, perturb_fraction of the prompts get world.perturb answers and the rest the policy's."""
    from llama2_lit.models.loading import load_causal_lm

    torch.manual_seed(0)
    load_causal_lm({"config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                               "num_attention_heads": 4, "num_key_value_heads": 4}}, tok).save_pretrained(tmp_path / "p")
    tok.save_pretrained(tmp_path / "p")
    asked = []

    def fake_sampler(policy, tokenizer, **kw):  # injected like conf/data/synthetic_pairs.yaml's policy_sampler
        def sample(prompts, rng):
            asked.extend(prompts)
            return [(f"policy a {i}", f"policy b {i}") for i in range(len(prompts))]
        return sample

    common = dict(seed=3, cache_dir=str(tmp_path / "cache"), policy=str(tmp_path / "p"), num_train=200, num_val=10,
                  max_tries=1, ties="keep", policy_sampler=fake_sampler)
    files, _ = build_synthetic_pairs(**common)
    rows = [json.loads(x) for x in open(files["train"])]
    assert all(r["chosen"].startswith("policy") for r in rows) and len(asked) == 210
    asked.clear()
    files, _ = build_synthetic_pairs(**common, perturb_fraction=0.5)
    rows = [json.loads(x) for x in open(files["train"])]
    from_policy = sum(r["chosen"].startswith("policy") for r in rows)
    assert 70 <= from_policy <= 130 and 0 < len(asked) < 210  # about half of 200 prompts, and a new cache entry
    assert len(list((tmp_path / "cache" / "synthetic_pairs").iterdir())) == 2
    with pytest.raises(UserError, match="perturb_fraction"):
        build_synthetic_pairs(**common, perturb_fraction=1.5)


def test_too_few_pairs_to_hold_out_validation_says_how_many_and_names_val_path(tok, tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}])
    with pytest.raises(UserError, match=r"^no val pairs: 1 pairs read from data.path, 0 of them held out for "
                                        r"validation \(data.val_fraction=0.05\); give validation pairs with "
                                        r"data.val_path="):
        PairwiseDataModule(tok, path=path).setup("fit")
