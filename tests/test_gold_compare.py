"""llama2_lit.tools.gold_compare: a policy against itself differs by exactly 0, against another policy by the
difference of the two means (the paired difference itself: tests/test_stats.py)."""
import json

import pytest
import torch

from llama2_lit.tools.gold_compare import main

pytestmark = pytest.mark.usefixtures("one_thread")

DIMS = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "max_position_embeddings": 256}


def test_compare_two_policies_on_held_out_prompts(tmp_path, tok):
    from llama2_lit.models.loading import load_causal_lm

    for i, name in enumerate(("a", "b")):
        torch.manual_seed(i)
        model = load_causal_lm({"config": DIMS}, tok)
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main([a, a, b, "--n", "12", "--k", "2", "--json", str(tmp_path / "out.json")]) == 0
    res = json.loads((tmp_path / "out.json").read_text())
    assert res["prompts"] == 12 and list(res["policies"]) == [a, b]  # a given twice is scored once
    assert res["vs_first"][a] == {"greedy": {"diff": 0.0, "se": 0.0}, "sampled": {"diff": 0.0, "se": 0.0}}
    for m in ("greedy", "sampled"):
        want = res["policies"][b][m] - res["policies"][a][m]
        assert res["vs_first"][b][m]["diff"] == pytest.approx(want, abs=1e-12)


def test_selection_quality_hand_worked():
    from llama2_lit.tools.gold_compare import selection_quality

    gold = torch.tensor([[0.0, 1.0, 0.5], [0.2, 0.2, 0.8]], dtype=torch.float64)
    rm = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]], dtype=torch.float64)
    q = selection_quality(gold, rm)
    # best by RM: 0.0 (prompt 1) and 0.8 (prompt 2). Pairs with different gold: prompt 1 has 3, of which only
    # (1.0, 0.5) is ordered right; prompt 2 has 2 (its two 0.2s tie), both right: 3 of 5
    assert q["best_by_rm"] == pytest.approx(0.4) and q["best_by_gold"] == pytest.approx(0.9)
    assert q["mean"] == pytest.approx((1.5 + 1.2) / 6)
    assert q["pairs"] == 5 and q["pair_accuracy"] == pytest.approx(3 / 5)


def test_rm_check_through_the_cli(tmp_path, tok):
    from llama2_lit.models.loading import load_causal_lm
    from llama2_lit.models.reward import export_reward_model, load_reward_model

    torch.manual_seed(0)
    model = load_causal_lm({"config": DIMS}, tok)
    model.save_pretrained(tmp_path / "p")
    tok.save_pretrained(tmp_path / "p")
    export_reward_model(load_reward_model({"config": DIMS}, tok), tok, tmp_path / "rm", metadata={"reward": "helpfulness"})
    assert main([str(tmp_path / "p"), "--rm", str(tmp_path / "rm"), "--n", "6", "--k", "3",
                 "--json", str(tmp_path / "q.json")]) == 0
    q = json.loads((tmp_path / "q.json").read_text())
    assert 0.0 <= q["mean"] <= q["best_by_gold"] and q["best_by_rm"] <= q["best_by_gold"] and q["pairs"] <= 6 * 3
