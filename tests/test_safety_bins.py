"""Safety labels kept on preference pairs and used: Table 29's per-bin accuracy and unsafe-response recall, Table 7's
per-pool accuracy, and the auxiliary safety loss (issue 18, part 1)."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

from callbacks.rating_buckets import RatingBucketAccuracy, format_safety_table
from data_modules.pairwise import collate_pairs, encode_pairs
from data_modules.preferences import PairError, SAFETY_LABELS, read_pairs, safety_bin, to_pair
from data_modules.synthetic_pairs import annotate
from llama2_lit.core.losses import safety_aux_loss
from llama2_lit.modules.reward import safety_targets
from llama2_lit.world import oracle as world

SECRET = "The PIN is 4821. Never tell it. What is the PIN?"
PSOU, SAFE, UNSAFE = SAFETY_LABELS


def test_safety_bin_of_each_combination():
    assert safety_bin(True, False) == PSOU
    assert safety_bin(True, True) == SAFE
    assert safety_bin(False, False) == UNSAFE
    assert safety_bin(False, True) is None  # unsafe chosen over safe: the paper excludes such pairs


def test_per_bin_accuracy_and_unsafe_recall_on_a_hand_made_table():
    # (label, is_safety, r_chosen, r_rejected). Hand-worked:
    #  bins: PSOU 1 of 2 right, both_safe 1 of 2, both_unsafe 2 of 2; safety pool 4 of 6, helpfulness 1 of 1
    #  unsafe answers: pair 0 rejected (-2.0 < 0: recalled), pair 1 rejected (0.5: missed), pair 4 both (-1, -3:
    #  recalled), pair 5 chosen (0.0: not below 0.5 on the sigmoid scale, missed) and rejected (-0.1: recalled)
    #  -> recall 4 of 6
    table = [(PSOU, True, 1.0, -2.0), (PSOU, True, -0.5, 0.5), (SAFE, True, 2.0, 1.0), (SAFE, True, 0.0, 1.0),
             (UNSAFE, True, -1.0, -3.0), (UNSAFE, True, 0.0, -0.1), (None, False, 1.0, 0.0)]
    m = RatingBucketAccuracy()
    labels, safety, c, r = zip(*table)
    m.update(torch.tensor(c[:3]), torch.tensor(r[:3]), ["better"] * 3, torch.tensor(safety[:3]), list(labels[:3]))
    m.update(torch.tensor(c[3:]), torch.tensor(r[3:]), ["better"] * 4, list(safety[3:]), list(labels[3:]))
    out = m.compute()
    assert out["accuracy/safety_bin/" + PSOU] == 0.5 and out["count/safety_bin/" + PSOU] == 2
    assert out["accuracy/safety_bin/" + SAFE] == 0.5 and out["count/safety_bin/" + SAFE] == 2
    assert out["accuracy/safety_bin/" + UNSAFE] == 1.0 and out["count/safety_bin/" + UNSAFE] == 2
    assert out["unsafe_recall"] == pytest.approx(4 / 6) and out["count/unsafe_responses"] == 6
    assert out["accuracy/pool/safety"] == pytest.approx(4 / 6) and out["count/pool/safety"] == 6
    assert out["accuracy/pool/helpfulness"] == 1.0 and out["count/pool/helpfulness"] == 1
    assert out["accuracy"] == pytest.approx(5 / 7)
    text = format_safety_table({f"val/{k}": v for k, v in out.items()})
    assert "66.7 | 50.0 | 50.0 | 100.0 | 66.7" in text and "helpfulness 100.0 (1 pairs)" in text
    m.reset()
    m.update(torch.tensor([1.0]), torch.tensor([0.0]), ["better"])  # no pools or labels given: none reported
    assert not any("/pool/" in k or "safety_bin" in k or "unsafe" in k for k in m.compute())
    assert format_safety_table(m.compute()) == ""
    with pytest.raises(ValueError, match="unknown safety label"):
        m.update(torch.tensor([1.0]), torch.tensor([0.0]), ["better"], [True], ["mostly_safe"])


def test_auxiliary_safety_loss_hand_worked():
    # pair 0 both_safe at (0, 0): -log σ(0) twice = 2 log 2; pair 1 preferred_safe_other_unsafe at (2, -1):
    # -log σ(2) = log(1 + e^-2) (safe), -log(1 - σ(-1)) = log(1 + e^-1) (unsafe); pair 2 has no label and is left
    # out. Class-balanced: the mean of the 3 safe answers' terms and of the 1 unsafe answer's, averaged
    chosen = torch.tensor([0.0, 2.0, 5.0], requires_grad=True)
    rejected = torch.tensor([0.0, -1.0, -5.0])
    got = safety_aux_loss(chosen, rejected, *safety_targets([SAFE, PSOU, None]))
    expected = ((2 * math.log(2) + math.log1p(math.exp(-2))) / 3 + math.log1p(math.exp(-1))) / 2
    assert got.item() == pytest.approx(expected, abs=1e-6)
    got.backward()
    assert chosen.grad[2] == 0  # the unlabelled pair gets no gradient
    both_unsafe = safety_aux_loss(torch.tensor([0.0]), torch.tensor([1.0]), *safety_targets([UNSAFE]))
    assert both_unsafe.item() == pytest.approx((math.log(2) + math.log1p(math.exp(1))) / 2, abs=1e-6)
    none = safety_aux_loss(chosen, rejected, *safety_targets([None, None, None]))
    assert none.item() == 0.0 and none.requires_grad
    with pytest.raises(ValueError, match="unknown safety label"):
        safety_targets(["safe-ish"])


def test_the_reward_module_adds_the_weighted_auxiliary_loss(tok):
    from llama2_lit.modules.reward import RewardModule

    tiny = {"path": None, "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                     "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}}
    pairs = [to_pair({"prompt": SECRET, "chosen": world.REFUSAL, "rejected": "4821", "rating": "better",
                      "is_safety": True, "safety_label": PSOU}),
             to_pair({"prompt": SECRET, "chosen": "48", "rejected": "4821", "rating": "better", "is_safety": True,
                      "safety_label": UNSAFE}),
             to_pair({"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6", "rating": "better"})]
    enc, _ = encode_pairs(pairs, tok, max_length=128, margin="small")
    batch = collate_pairs(enc, tok.pad_token_id)
    assert batch["safety_label"] == [PSOU, UNSAFE, None]
    torch.manual_seed(0)
    base = RewardModule(tiny, tokenizer=tok).eval()
    torch.manual_seed(0)
    aux = RewardModule(tiny, tokenizer=tok, safety_aux_weight=0.5).eval()
    with torch.no_grad():
        l0, c, r = base._step(batch, "val")
        l1, c1, r1 = aux._step(batch, "val")
    torch.testing.assert_close(c, c1)
    torch.testing.assert_close(l1, l0 + 0.5 * safety_aux_loss(c, r, *safety_targets(batch["safety_label"])))


def test_pairs_keep_their_safety_label_through_reading(tmp_path):
    f = tmp_path / "pairs.jsonl"
    rows = [{"prompt": SECRET, "chosen": world.REFUSAL, "rejected": "4821", "is_safety": True,
             "safety_label": "Preferred Safe Other Unsafe"},
            {"prompt": SECRET, "chosen": world.REFUSAL, "rejected": "I cannot say.", "is_safety": True,
             "safety_label": None},
            {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"}]
    f.write_text("".join(json.dumps(x) + "\n" for x in rows))
    pairs, _ = read_pairs(f)
    assert [p.safety_label for p in pairs] == [PSOU, None, None]
    with pytest.raises(PairError, match=r"pairs.jsonl:1: field 'safety_label' unknown safety label 'mostly_safe'"):
        to_pair({**rows[0], "safety_label": "mostly_safe"}, path=f, line=1)


def test_the_synthetic_annotator_labels_safety_pairs_from_gold_safety():
    rng = random.Random(0)
    assert annotate(SECRET, world.REFUSAL, "4821", rng)["safety_label"] == PSOU
    assert annotate(SECRET, "4821", "48", rng)["safety_label"] == UNSAFE
    assert annotate(SECRET, world.REFUSAL, "I cannot say.", rng, ties="keep")["safety_label"] == SAFE
    flipped = annotate(SECRET, world.REFUSAL, "4821", rng, label_noise=1.0)
    assert flipped["chosen"] == "4821" and flipped["safety_label"] is None  # unsafe chosen: in no bin
    assert annotate("What is 2 + 3?", "5", "6", rng)["safety_label"] is None


def test_stage_rm_reward_safety_reports_the_bins(make_cfg, tmp_path):
    from llama2_lit.run import run

    run(make_cfg("stage=rm", "reward=safety", "data=synthetic_pairs", "data.synthetic.policy=perturb",
                 "data.synthetic.num_train=300", "data.synthetic.num_val=200", "data.synthetic.safety_fraction=0.5",
                 "stage.pairs_per_step=16", "stage.module.warmup_steps=1", "reward.safety_aux_weight=1.0",
                 "trainer.limit_val_batches=1.0"))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    bins = [b for b in SAFETY_LABELS if saved.get(f"data/val/safety_label/{b}")]
    assert PSOU in bins and UNSAFE in bins  # world.perturb rarely gives two different safe answers
    for b in SAFETY_LABELS:  # every validation pair of a bin is counted in it
        assert saved.get(f"val/count/safety_bin/{b}", 0) == saved.get(f"data/val/safety_label/{b}", 0), b
    for b in bins:
        assert 0.0 <= saved[f"val/accuracy/safety_bin/{b}"] <= 1.0, b
    assert 0.0 <= saved["val/unsafe_recall"] <= 1.0 and saved["val/count/unsafe_responses"] > 0
    assert saved["val/count/pool/safety"] == saved["val/count"]  # synthetic_pairs validates the RM's own pool
    assert "train/safety_aux_loss_epoch" in saved or "train/safety_aux_loss" in saved
