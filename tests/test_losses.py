import math

import pytest
import torch

from llama2_lit.losses import IGNORE_INDEX, masked_lm_loss, ranking_loss


def test_masked_lm_loss_hand_computed():
    # vocab 2, one row of 3 tokens; logits at t predict labels[t + 1]
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [5.0, 5.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 0, 1]])
    # t=0 predicts 0 from uniform logits: -log(1/2); t=1 predicts 1 from (2, 0): -log(e^0/(e^2+1))
    want = (math.log(2) + math.log(math.exp(2) + 1)) / 2
    assert masked_lm_loss(logits, labels).item() == pytest.approx(want, abs=1e-6)


def test_masked_lm_loss_ignores_prompt_positions_exactly():
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [5.0, 5.0]]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 1]])
    assert masked_lm_loss(logits, labels).item() == pytest.approx(math.log(math.exp(2) + 1), abs=1e-6)


def test_masked_lm_loss_two_examples_token_weighted():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, 3], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 4]])
    logp = torch.log_softmax(logits, -1)
    terms = [-logp[0, 0, 1], -logp[0, 1, 2], -logp[0, 2, 3], -logp[1, 2, 4]]
    assert masked_lm_loss(logits, labels).item() == pytest.approx(float(sum(terms) / 4), abs=1e-6)


def test_masked_lm_loss_refuses_all_masked_and_bad_shapes():
    with pytest.raises(ValueError, match="no position carries a label"):
        masked_lm_loss(torch.zeros(1, 3, 2), torch.full((1, 3), IGNORE_INDEX))
    with pytest.raises(ValueError, match="do not match"):
        masked_lm_loss(torch.zeros(1, 3, 2), torch.zeros(1, 4, dtype=torch.long))


def test_ranking_loss_hand_computed():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # -log sigmoid(1) and -log sigmoid(-1)
    want = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2
    assert ranking_loss(rc, rr).item() == pytest.approx(want, abs=1e-6)
    # a margin of 1 on the first pair: -log sigmoid(0) = log 2
    want_m = (math.log(2) + math.log(1 + math.exp(1))) / 2
    assert ranking_loss(rc, rr, torch.tensor([1.0, 0.0])).item() == pytest.approx(want_m, abs=1e-6)


def test_ranking_loss_refuses_column_vectors():
    with pytest.raises(ValueError, match=r"\(B,\)"):
        ranking_loss(torch.zeros(3, 1), torch.zeros(3))
    with pytest.raises(ValueError, match="margin"):
        ranking_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3, 1))
