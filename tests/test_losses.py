import math

import pytest
import torch

from llama2_lit.core.losses import IGNORE_INDEX, masked_lm_loss, ranking_loss


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


def test_adamw_cosine_schedule_warms_up_then_decays_to_the_floor():
    from llama2_lit.modules.optim import adamw_cosine

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    cfg = adamw_cosine(model, total_steps=100, lr=1.0, warmup_ratio=0.03, warmup_steps=5, min_lr_ratio=0.1)
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert len(opt.param_groups[0]["params"]) == 1 and len(opt.param_groups[1]["params"]) == 3
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:6] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])  # max(5, 3% of 100) = 5 warm-up steps
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 94 / 95)), abs=1e-6)
    assert min(lrs[5:]) >= 0.1 - 1e-9


def test_ppo_policy_loss_clipped_ratio_example():
    from llama2_lit.core.losses import ppo_policy_loss

    # ratios 1.5, 0.5, 1.1 on three tokens, advantages +1, +1, -1, clip 0.2
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, clip_frac, approx_kl = ppo_policy_loss(new, old, adv, mask, clip=0.2)
    # token 1: max(-1.5, -1.2) = -1.2 (clipped); token 2: max(-0.5, -0.8) = -0.5; token 3: max(1.1, 1.1) = 1.1
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1) / 3, abs=1e-6)
    assert clip_frac.item() == pytest.approx(1 / 3)
    want_kl = sum((r - 1) - math.log(r) for r in (1.5, 0.5, 1.1)) / 3
    assert approx_kl.item() == pytest.approx(want_kl, abs=1e-6)
    # masked tokens do not count
    loss_m, _, _ = ppo_policy_loss(new, old, adv, torch.tensor([[True, False, False]]))
    assert loss_m.item() == pytest.approx(-1.2, abs=1e-6)


def test_value_loss_clips_the_update():
    from llama2_lit.core.losses import value_loss

    old = torch.tensor([[0.0, 0.0]])
    values = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[1.0, 1.0]])
    # token 1: unclipped (1-1)^2 = 0, clipped (0.2-1)^2 = 0.64 -> 0.64; token 2: (0.1-1)^2 = 0.81 both ways
    got = value_loss(values, old, returns, torch.ones(1, 2, dtype=torch.bool), clip=0.2)
    assert got.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2, abs=1e-6)


def test_warm_up_from_a_ratio_rounds_up_in_every_stage():
    """50 steps x 3% = 1.5 warm-up steps: 2 (ceil), so the lr after one step is half the peak (int gave 1 step:
    the full peak at once). One rounding for SFT, RS fine-tuning and the RM (issue 18)."""
    import torch

    from llama2_lit.modules.optim import adamw_cosine

    model = torch.nn.Linear(2, 2)
    conf = adamw_cosine(model, total_steps=50, lr=1e-3, warmup_ratio=0.03)
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert opt.param_groups[0]["lr"] == 0.0
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5e-3)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_dpo_loss_two_pairs_hand_worked():
    import math

    from llama2_lit.core.losses import dpo_loss

    # pair 1: policy (-10, -12), reference (-11, -11): log-ratios +1 / -1, Δ = 0.1 x (1 - (-1)) = 0.2
    # pair 2: policy (-5, -4), reference (-5, -5): log-ratios 0 / +1, Δ = 0.1 x (0 - 1) = -0.1
    pc, pr = torch.tensor([-10.0, -5.0], requires_grad=True), torch.tensor([-12.0, -4.0])
    rc, rr = torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    loss, c, r = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert loss.item() == pytest.approx(-(math.log(sig(0.2)) + math.log(sig(-0.1))) / 2, abs=1e-6)
    torch.testing.assert_close(c, torch.tensor([0.1, 0.0]))
    torch.testing.assert_close(r, torch.tensor([-0.1, 0.1]))
    # Llama 2's margin on the implicit reward gap: m = (2/3, 0) ("better", "negligibly_better" under small)
    loss_m, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, margin=torch.tensor([2 / 3, 0.0]))
    assert loss_m.item() == pytest.approx(-(math.log(sig(0.2 - 2 / 3)) + math.log(sig(-0.1))) / 2, abs=1e-6)
    # IPO: (Δ - 1/2)² / β² = (h - 1/(2β))², h = Δ/β: ((0.2 - 0.5)² + (-0.1 - 0.5)²) / 2 / 0.01 = 22.5
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo")
    assert ipo.item() == pytest.approx(((0.2 - 0.5) ** 2 + (-0.1 - 0.5) ** 2) / 2 / 0.01, abs=1e-4)
    assert ipo.item() == pytest.approx(22.5, abs=1e-4)
    ipo_m, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo", margin=torch.tensor([0.5, 0.0]))
    assert ipo_m.item() == pytest.approx(((0.2 - 1.0) ** 2 + (-0.1 - 0.5) ** 2) / 2 / 0.01, abs=1e-4)
    loss.backward()  # the gradient reaches the policy's log-probs: -β σ(-Δ) / B for the chosen side of pair 1
    assert pc.grad[0].item() == pytest.approx(-0.1 * sig(-0.2) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pr, rc, rr, loss_type="hinge")
    with pytest.raises(ValueError, match=r"\(B,\)"):
        dpo_loss(pc[:, None], pr, rc, rr)


def test_sequence_logps_sum_and_length_normalised():
    from llama2_lit.core.losses import sequence_logps

    lp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[0, 1, 1], [0, 0, 1]])
    torch.testing.assert_close(sequence_logps(lp, mask), torch.tensor([-5.0, -6.0]))
    torch.testing.assert_close(sequence_logps(lp, mask, average=True), torch.tensor([-2.5, -6.0]))
