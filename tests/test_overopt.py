"""The best-of-n over-optimisation probe: KL_bon and the unbiased best-of-k estimator against hand-worked numbers
(llama2_lit.core.overopt), and llama2_lit.tools.overopt end to end on a tiny random-init policy and RM."""
import json
import math

import pytest
import torch

from llama2_lit.core.overopt import best_of_k_expectation, best_of_k_weights, kl_best_of_n
from llama2_lit.tools.overopt import ks_for, main


def test_kl_best_of_n_hand_worked():
    assert kl_best_of_n(1) == 0.0
    assert kl_best_of_n(2) == pytest.approx(0.6931471805599453 - 0.5)
    assert kl_best_of_n(2) == pytest.approx(0.193147, abs=1e-6)
    assert kl_best_of_n(4) == pytest.approx(math.log(4) - 0.75)
    assert kl_best_of_n(64) == pytest.approx(math.log(64) - 63 / 64)
    with pytest.raises(ValueError):
        kl_best_of_n(0)


def test_best_of_k_weights():
    assert best_of_k_weights(3, 2) == pytest.approx([0.0, 1 / 3, 2 / 3])  # C(0,1), C(1,1), C(2,1) over C(3,2)
    assert best_of_k_weights(4, 1) == pytest.approx([0.25] * 4)
    assert best_of_k_weights(4, 4) == [0.0, 0.0, 0.0, 1.0]
    assert sum(best_of_k_weights(64, 7)) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        best_of_k_weights(3, 4)


def test_best_of_k_expectation_hand_worked():
    proxy, gold = [0.2, 0.9, 0.5], [1.0, 0.0, 0.6]
    # k=1: the plain means
    assert best_of_k_expectation(proxy, gold, 1) == pytest.approx((1.6 / 3, 1.6 / 3))
    # k=3=n: the proxy-argmax (proxy 0.9, gold 0.0)
    assert best_of_k_expectation(proxy, gold, 3) == pytest.approx((0.9, 0.0))
    # k=2: sorted by proxy 0.2, 0.5, 0.9 (gold 1.0, 0.6, 0.0), weights 0, 1/3, 2/3; the three pairs' winners are
    # (0.2,0.5)->0.5, (0.2,0.9)->0.9, (0.5,0.9)->0.9
    assert best_of_k_expectation(proxy, gold, 2) == pytest.approx(((0.5 + 0.9 + 0.9) / 3, (0.6 + 0.0 + 0.0) / 3))
    # a proxy tie: the tied samples share their mean gold (random tie-breaking)
    assert best_of_k_expectation([1.0, 1.0], [0.0, 1.0], 2) == pytest.approx((1.0, 0.5))


def test_best_of_k_expectation_matches_enumeration():
    from itertools import combinations

    g = torch.Generator().manual_seed(0)
    proxy, gold = torch.rand(7, generator=g).tolist(), torch.rand(7, generator=g).tolist()
    for k in range(1, 8):
        subsets = list(combinations(range(7), k))
        best = [max(s, key=lambda i: proxy[i]) for s in subsets]
        want = (sum(proxy[i] for i in best) / len(best), sum(gold[i] for i in best) / len(best))
        assert best_of_k_expectation(proxy, gold, k) == pytest.approx(want)


def test_ks_for():
    assert ks_for(1) == [1] and ks_for(4) == [1, 2, 4] and ks_for(64) == [1, 2, 4, 8, 16, 32, 64]
    assert ks_for(6) == [1, 2, 4, 6]


@pytest.mark.usefixtures("one_thread")
def test_probe_end_to_end(tmp_path, tok, monkeypatch):
    from llama2_lit.models.loading import load_causal_lm
    from llama2_lit.models.reward import export_reward_model, load_reward_model
    from llama2_lit.tools import overopt

    dims = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 4, "max_position_embeddings": 256}
    torch.manual_seed(0)
    model = load_causal_lm({"config": dims}, tok)
    model.save_pretrained(tmp_path / "p")
    tok.save_pretrained(tmp_path / "p")
    export_reward_model(load_reward_model({"config": dims}, tok), tok, tmp_path / "rm",
                        metadata={"reward": "helpfulness"})
    seen = {}
    real = overopt.sample_and_score

    def spy(*args, **kwargs):
        seen["proxy"], seen["gold"] = real(*args, **kwargs)
        return seen["proxy"], seen["gold"]

    monkeypatch.setattr(overopt, "sample_and_score", spy)
    out = tmp_path / "out"
    hist = tmp_path / "ppo_history.jsonl"
    hist.write_text("".join(json.dumps({"ppo/iteration": i, "ppo/kl": 0.01 * i * i, "ppo/helpfulness_score": 0.5,
                                        "ppo/gold_helpfulness": 0.3}) + "\n" for i in (1, 2)))
    with pytest.raises(SystemExit):  # a missing PPO history is refused before any sampling
        main([str(tmp_path / "p"), "--rm", str(tmp_path / "rm"), "--ppo", str(tmp_path / "nope.jsonl")])
    assert main([str(tmp_path / "p"), "--rm", str(tmp_path / "rm"), "--n", "4", "--prompts", "6",
                 "--out", str(out), "--ppo", str(hist)]) == 0
    res = json.loads((out / "overopt.json").read_text())
    assert res["ppo"]["iteration"] == [1, 2] and res["ppo"]["sqrt_kl"] == pytest.approx([0.1, 0.2])
    assert {"policy", "rm", "prompts", "n", "seed", "k", "kl_bon", "gold", "gold_se", "proxy", "proxy_se"} <= set(res)
    assert res["k"] == [1, 2, 4] and res["prompts"] == 6 and res["n"] == 4
    assert res["kl_bon"] == pytest.approx([0.0, math.log(2) - 0.5, math.log(4) - 0.75])
    assert len(seen["gold"]) == 6 and all(len(row) == 4 for row in seen["gold"])
    flat_gold = [x for row in seen["gold"] for x in row]
    flat_proxy = [x for row in seen["proxy"] for x in row]
    assert res["gold"][0] == pytest.approx(sum(flat_gold) / len(flat_gold))  # k=1: the plain mean
    assert res["proxy"][0] == pytest.approx(sum(flat_proxy) / len(flat_proxy))
    assert all(b >= a - 1e-12 for a, b in zip(res["proxy"], res["proxy"][1:]))  # more by the proxy never lowers it
    assert all(0.0 <= x <= 1.0 for x in res["gold"] + res["proxy"])
    assert (out / "overopt.png").stat().st_size > 0


def test_ppo_curve_from_history(tmp_path):
    from llama2_lit.tools.overopt import ppo_curve

    rows = [{"ppo/iteration": 1.0, "ppo/kl": 0.04, "ppo/helpfulness_score": 0.5, "ppo/gold_helpfulness": 0.3},
            {"ppo/iteration": 2.0, "ppo/kl": -0.01, "ppo/helpfulness_score": 0.6, "ppo/gold_helpfulness": 0.35},
            {"ppo/iteration": 3.0, "ppo/kl": 0.25, "ppo/helpfulness_score": 0.7}]  # not world prompts: no gold
    f = tmp_path / "ppo_history.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = ppo_curve(f)
    assert c["iteration"] == [1, 2] and c["kl"] == [0.04, -0.01]
    assert c["sqrt_kl"] == pytest.approx([0.2, 0.0])  # an estimate below 0 (k1 estimator) counts as 0
    assert c["proxy"] == [0.5, 0.6] and c["gold"] == [0.3, 0.35]
    f.write_text(json.dumps(rows[2]) + "\n")
    with pytest.raises(SystemExit, match="no iteration with ppo/gold_helpfulness"):
        ppo_curve(f)
