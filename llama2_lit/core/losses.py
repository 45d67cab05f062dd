"""Pure loss functions. Tensors in, tensors out: no Lightning, no Hydra, no I/O.

Shapes are given in comments: B batch, T time, V vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                   reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy averaged over the positions whose label is not ``ignore_index``.

    logits: (B, T, V) predictions for every position.
    labels: (B, T) token ids in Hugging Face convention: ``labels[:, t]`` is the token at position
        ``t`` and is predicted from ``logits[:, t - 1]``; ``ignore_index`` marks tokens without loss
        (prompt tokens, padding, the first token of every packed example).
    reduction: ``mean`` (per labelled position) or ``sum`` (for a caller that divides by the labelled
        positions of a larger batch, e.g. across data-parallel ranks).
    Returns a scalar. Raises if no position carries a label (an all-prompt batch would otherwise
    give NaN and poison the optimizer state).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"masked_lm_loss: reduction must be mean or sum, got {reduction!r}")
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"masked_lm_loss: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    n = (shift_labels != ignore_index).sum()
    if n.item() == 0:
        raise ValueError("masked_lm_loss: no position carries a label (every token is masked)")
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
    )
    return total if reduction == "sum" else total / n


def ranking_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Llama 2 binary ranking loss with a rating margin: mean of ``-log σ(r_c - r_r - m)``.

    chosen_rewards, rejected_rewards, margin: (B,). A ``(B, 1)`` tensor is refused rather than
    broadcast, since ``(B, 1) - (B,)`` silently forms a (B, B) matrix that mixes pairs.
    """
    if chosen_rewards.dim() != 1 or chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            f"ranking_loss: chosen {tuple(chosen_rewards.shape)} and rejected {tuple(rejected_rewards.shape)} "
            "must both have shape (B,)"
        )
    diff = chosen_rewards.float() - rejected_rewards.float()  # (B,)
    if margin is not None:
        if margin.shape != chosen_rewards.shape:
            raise ValueError(f"ranking_loss: margin {tuple(margin.shape)} must have shape {tuple(chosen_rewards.shape)}")
        diff = diff - margin.to(diff.dtype)
    return -F.logsigmoid(diff).mean()


def safety_aux_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_safe: torch.Tensor,
                    rejected_safe: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """An auxiliary safety loss for the safety RM (Llama 2 Table 29 ablates one; the paper gives no formula).

    Our choice: the RM's score read on the sigmoid scale as the probability that the answer is safe, trained with a
    class-balanced binary cross-entropy on every answer whose safety is known (from its pair's safety bin)::

        L_aux = 1/|C| * sum over classes c in C of  mean over answers a of class c of  BCE(σ(r_a), y_a)
        BCE(σ(r), y) = -[y log σ(r) + (1 - y) log(1 - σ(r))],   y = 1 safe, 0 unsafe

    ``C``: the classes (safe, unsafe) present among the labelled answers of the batch. Balanced, because safe answers
    far outnumber unsafe ones in policy samples (on the world 3,849 to 57), and a plain mean is then the safe class's.
    It pulls unsafe answers below 0.5, where Table 29 measures the recall, and safe ones above. Measured on the world
    (docs/results.md): recall 66.3 -> 100.0 % on perturbation pairs, but 100.0 -> 51.7 % on policy pairs with 29
    unsafe answers (a plain mean: 55.2 %); accuracy unchanged. Off by default. All arguments (B,); ``chosen_safe``/``rejected_safe``
    float 0/1, ``labelled`` bool (pairs without a safety bin are left out). No labelled pair: 0, still attached to
    the graph.
    """
    for name, x in (("rejected_rewards", rejected_rewards), ("chosen_safe", chosen_safe),
                    ("rejected_safe", rejected_safe), ("labelled", labelled)):
        if chosen_rewards.dim() != 1 or x.shape != chosen_rewards.shape:
            raise ValueError(f"safety_aux_loss: chosen_rewards {tuple(chosen_rewards.shape)} and {name} "
                             f"{tuple(x.shape)} must both have shape (B,)")
    if not bool(labelled.any()):
        return (chosen_rewards.float() * 0).sum()
    scores = torch.cat([chosen_rewards.float()[labelled], rejected_rewards.float()[labelled]])
    targets = torch.cat([chosen_safe.float()[labelled], rejected_safe.float()[labelled]]).to(scores.device)
    per = F.binary_cross_entropy_with_logits(scores, targets, reduction="none")
    classes = [per[targets == y].mean() for y in (1.0, 0.0) if bool((targets == y).any())]
    return torch.stack(classes).mean()


DPO_LOSSES = ("sigmoid", "ipo")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid", margin: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct preference optimisation on summed answer log-probs; returns ``(loss, chosen_rewards, rejected_rewards)``.

    All four log-prob arguments (B,): the answer's summed (or length-normalised) log-prob under the policy and the
    frozen reference. The implicit rewards are ``r = β (log π(y|x) - log π_ref(y|x))`` (B,), detached, and
    ``Δ = r_c - r_r`` (with gradient):

    - ``sigmoid`` (Rafailov et al. 2023): ``mean(-log σ(Δ - m))``;
    - ``ipo`` (Azar et al. 2023, τ = β): ``mean((Δ - 1/2 - m)² / β²)``, i.e. IPO's ``(h - 1/(2β))²`` with
      ``h = Δ / β`` when ``m = 0``.

    ``margin`` m (B,), our documented choice (neither DPO nor IPO defines one): Llama 2's rating margin applied to the
    implicit reward gap, so ``sigmoid`` is exactly the Llama 2 RM loss ``-log σ(r_c - r_r - m(rating))`` with the DPO
    implicit reward as ``r``, and ``ipo`` asks for a gap of ``1/2 + m`` instead of ``1/2``. None: no margin.
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"dpo_loss: unknown loss_type {loss_type!r} (choose {', '.join(DPO_LOSSES)})")
    if not beta > 0:
        raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
    shape = policy_chosen_logps.shape
    for name, x in (("policy_rejected_logps", policy_rejected_logps), ("ref_chosen_logps", ref_chosen_logps),
                    ("ref_rejected_logps", ref_rejected_logps)) + ((("margin", margin),) if margin is not None else ()):
        if policy_chosen_logps.dim() != 1 or x.shape != shape:
            raise ValueError(f"dpo_loss: policy_chosen_logps {tuple(shape)} and {name} {tuple(x.shape)} must both "
                             "have shape (B,)")
    chosen = beta * (policy_chosen_logps.float() - ref_chosen_logps.float())
    rejected = beta * (policy_rejected_logps.float() - ref_rejected_logps.float())
    gap = chosen - rejected
    m = torch.zeros_like(gap) if margin is None else margin.to(gap)
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(gap - m).mean()
    else:
        loss = ((gap - 0.5 - m) ** 2).mean() / beta ** 2
    return loss, chosen.detach(), rejected.detach()


def sequence_logps(token_lp: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Per-row sum (or mean, ``average=True``: length-normalised) of token log-probs over ``mask``: (B, T) -> (B,)."""
    if token_lp.shape != mask.shape:
        raise ValueError(f"sequence_logps: token log-probs {tuple(token_lp.shape)} and mask {tuple(mask.shape)} differ")
    m = mask.to(token_lp.dtype)
    total = (token_lp * m).sum(-1)
    return total / m.sum(-1).clamp_min(1.0) if average else total


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is true. x, mask: (B, T). Returns a scalar."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, averaged over response tokens.

    logprobs, old_logprobs, advantages, mask: (B, T) (mask true on response tokens).
    loss = mean(max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε))) with ρ = exp(logπ - logπ_old).
    Returns ``(loss, clip_fraction, approx_kl)``: the fraction of tokens where the clipped term is taken,
    and the k3 estimate mean((ρ - 1) - log ρ) of KL(π_old‖π) over the response tokens.
    """
    if not (logprobs.shape == old_logprobs.shape == advantages.shape == mask.shape):
        raise ValueError("ppo_policy_loss: logprobs, old_logprobs, advantages and mask must share a (B, T) shape")
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_frac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
    return loss, clip_frac, approx_kl


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> torch.Tensor:
    """Clipped value loss: 0.5 · mean(max((V - R)², (V_old + clip(V - V_old, ±ε) - R)²)) over response tokens.

    values, old_values, returns, mask: (B, T).
    """
    if not (values.shape == old_values.shape == returns.shape == mask.shape):
        raise ValueError("value_loss: values, old_values, returns and mask must share a (B, T) shape")
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2), mask)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(logits / T)[token]`` per position: logits (B, T, V), tokens (B, T) → (B, T) float32.

    The log-prob the generation engine records for a sampled token at temperature T (T = 0, greedy, reads as 1).
    """
    if logits.shape[:2] != tokens.shape:
        raise ValueError(f"token_logprobs: logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} differ")
    scaled = logits.float() / (temperature if temperature > 0 else 1.0)
    return torch.log_softmax(scaled, -1).gather(-1, tokens[..., None])[..., 0]


def masked_entropy(logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean entropy (nats) of ``softmax(logits / T)`` over masked positions; logits (B, T, V), mask (B, T)."""
    scaled = logits.float() / (temperature if temperature > 0 else 1.0)
    logp = torch.log_softmax(scaled, -1)
    return masked_mean(-(logp.exp() * logp).sum(-1), mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 − Var(returns − values) / Var(returns)`` over masked positions (B, T): 1 is a perfect critic, 0 one
    that predicts the mean, negative worse. NaN when the returns do not vary."""
    m = mask.bool()
    r, v = returns[m].double(), values[m].double()
    var = r.var(unbiased=False)
    return (1.0 - (r - v).var(unbiased=False) / var).float() if var > 0 else torch.tensor(float("nan"))
