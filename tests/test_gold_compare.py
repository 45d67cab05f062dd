"""llama2_lit.gold_compare: paired differences hand-worked; a policy against itself differs by exactly 0, against
another policy by the difference of the two means."""
import json

import pytest
import torch

from llama2_lit.gold_compare import main, paired_difference

pytestmark = pytest.mark.usefixtures("one_thread")

DIMS = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "max_position_embeddings": 256}


def test_paired_difference_hand_worked():
    # differences 0.1, 0.3, 0.2: mean 0.2, sample sd 0.1, se 0.1 / sqrt(3)
    d, se = paired_difference([0.5, 0.2, 0.0], [0.6, 0.5, 0.2])
    assert d == pytest.approx(0.2) and se == pytest.approx(0.1 / 3 ** 0.5)
    assert paired_difference([0.4], [0.9]) == (pytest.approx(0.5), 0.0)
    with pytest.raises(ValueError, match="same non-zero number"):
        paired_difference([0.1], [0.1, 0.2])


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
