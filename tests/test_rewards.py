"""The PPO reward pieces against hand-worked numbers (llama2_lit/core/rl.py, llama2_lit/core/losses.py)."""
import math

import pytest
import torch

from llama2_lit.core.losses import explained_variance, masked_entropy, token_logprobs
from llama2_lit.core.rl import RunningMoments, gae, kl_penalty, logit, safety_gated_reward, token_rewards, whiten


def close(t: torch.Tensor, expected, atol=1e-6):
    torch.testing.assert_close(t.double(), torch.tensor(expected, dtype=torch.float64), atol=atol, rtol=0)


def test_gate_switches_at_the_threshold():
    r_s = torch.tensor([0.149, 0.151, 0.151, 0.9])
    r_h = torch.tensor([0.7, 0.7, 0.7, 0.2])
    is_safety = torch.tensor([False, False, True, False])
    # 0.149 < 0.15: the safety score; 0.151 on a helpfulness prompt: the helpfulness score; safety prompt: safety
    assert safety_gated_reward(r_s, r_h, is_safety).tolist() == pytest.approx([0.149, 0.7, 0.151, 0.2])
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        safety_gated_reward(r_s[:, None], r_h, is_safety)


def test_logit_inverts_the_sigmoid_and_clamps():
    p = torch.tensor([0.5, 1 / (1 + math.exp(-2)), 0.0, 1.0], dtype=torch.float64)
    out = logit(p, eps=1e-6)
    assert out[:2].tolist() == pytest.approx([0.0, 2.0], abs=1e-12)
    assert out[2].item() == pytest.approx(math.log(1e-6 / (1 - 1e-6)))
    assert out[3].item() == pytest.approx(-out[2].item())
    assert torch.isfinite(out).all()


def test_whiten_known_vector():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    std = math.sqrt(1.25)
    assert whiten(x).tolist() == pytest.approx([-1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std], abs=1e-7)
    # shift_mean=False: rescaled, mean kept
    assert whiten(x, shift_mean=False).tolist() == pytest.approx([v / std + 2.5 for v in (-1.5, -0.5, 0.5, 1.5)],
                                                                  abs=1e-7)
    # masked: statistics over the masked values, zeros elsewhere
    y = torch.tensor([[1.0, 3.0, 100.0]], dtype=torch.float64)
    close(whiten(y, mask=torch.tensor([[1, 1, 0]])), [[-1.0, 1.0, 0.0]])
    with pytest.raises(ValueError, match="at least 2"):
        whiten(torch.tensor([1.0]))


def test_running_moments_equal_the_statistics_of_everything_seen():
    m = RunningMoments()
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0, 10.0])
    m.update(a)
    m.update(b)
    allv = torch.cat([a, b]).double()
    assert m.count == 5
    assert m.mean == pytest.approx(allv.mean().item())
    assert m.var == pytest.approx(allv.var(unbiased=False).item())
    # a one-value batch whitens against the running statistics (4 then 5 values seen)
    m2 = RunningMoments()
    m2.load_state_dict(m.state_dict())
    out = whiten(torch.tensor([5.0], dtype=torch.float64), moments=m2)
    six = torch.cat([allv, torch.tensor([5.0], dtype=torch.float64)])
    assert out.item() == pytest.approx(((5.0 - six.mean()) / six.var(unbiased=False).sqrt()).item(), rel=1e-6)


def test_kl_estimators_hand_worked():
    lp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    assert kl_penalty(lp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_penalty(lp, ref, "k3").item() == pytest.approx(-0.5 + math.log(2))
    assert kl_penalty(ref, ref, "k3").item() == 0.0
    with pytest.raises(ValueError, match="kind"):
        kl_penalty(lp, ref, "k2")


def test_gae_three_step_trajectory():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0]])  # the 4th token is padding: its value must not leak in
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    close(adv, [[0.46575, 0.385, 0.3, 0.0]])
    close(ret, [[0.96575, 0.985, 1.0, 0.0]])
    # λ = 1: advantage = reward-to-go − V
    adv1, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(adv1, [[0.5, 0.4, 0.3, 0.0]])


def test_token_rewards_place_the_score_on_the_last_response_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    score = torch.tensor([2.0, -1.0])
    per_tok = token_rewards(score, kl, mask, beta=0.1)
    close(per_tok, [[-0.01, -0.02, 2.0 - 0.03], [-1.0 - 0.05, 0.0, 0.0]])
    per_seq = token_rewards(score, kl, mask, beta=0.1, kl_level="sequence")
    close(per_seq, [[0.0, 0.0, 2.0 - 0.06], [-1.05, 0.0, 0.0]])
    with pytest.raises(ValueError, match="no response token"):
        token_rewards(score, kl, torch.tensor([[1, 0, 0], [0, 0, 0]]), beta=0.1)


def test_token_logprobs_entropy_and_explained_variance():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]]))
    close(token_logprobs(logits, torch.tensor([[0, 2]])), [[math.log(0.5), math.log(1 / 3)]])
    # the uniform position only: entropy log 3
    assert masked_entropy(logits, torch.tensor([[0, 1]])).item() == pytest.approx(math.log(3), abs=1e-6)
    ret = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(ret, ret, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(ret, 2.0), ret, mask).item() == pytest.approx(0.0)
