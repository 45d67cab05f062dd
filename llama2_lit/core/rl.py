"""Reward functions on tensors (pure: no Lightning, no I/O). Shapes in comments: ``(B,)`` one value per sample.

Llama 2 §3.2.3 combines the two reward models piecewise (scores on the sigmoid scale, as the RMs' outputs
are read in the paper):

    R_c(g | p) = R_s(g | p)   if IS_SAFETY(p) or R_s(g | p) < 0.15
                 R_h(g | p)   otherwise
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SAFETY_THRESHOLD = 0.15  # paper: precision 0.89, recall 0.55 on Meta Safety


def _check_1d(name: str, x: torch.Tensor, n: int | None = None) -> None:
    if x.ndim != 1:
        raise ValueError(f"{name} must have shape (B,), got {tuple(x.shape)}")
    if n is not None and x.shape[0] != n:
        raise ValueError(f"{name} has {x.shape[0]} values, expected {n}")


def safety_gated_reward(r_safety: torch.Tensor, r_helpful: torch.Tensor, is_safety: torch.Tensor,
                        threshold: float = SAFETY_THRESHOLD) -> torch.Tensor:
    """R_c (B,): the safety score where the prompt is a safety prompt or the safety score is below
    ``threshold``, else the helpfulness score.

    Args:
        r_safety: (B,) safety RM scores on the sigmoid scale, in [0, 1].
        r_helpful: (B,) helpfulness RM scores on the sigmoid scale, in [0, 1].
        is_safety: (B,) bool (or 0/1) tag of the prompt.
        threshold: the safety score below which safety overrides helpfulness (paper: 0.15).

    Example: r_safety [0.9, 0.1, 0.9], r_helpful [0.3, 0.8, 0.7], is_safety [True, False, False]
    gives [0.9, 0.1, 0.7].
    """
    _check_1d("r_safety", r_safety)
    _check_1d("r_helpful", r_helpful, r_safety.shape[0])
    _check_1d("is_safety", is_safety, r_safety.shape[0])
    gate = is_safety.to(torch.bool) | (r_safety < threshold)  # (B,)
    return torch.where(gate, r_safety, r_helpful)


def logit(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The inverse sigmoid, ``log(p / (1 - p))`` (same shape as ``p``), with ``p`` clamped to [eps, 1 - eps]
    so scores of exactly 0 or 1 map to finite values (±13.8 at eps 1e-6). Computed in float64 when ``p`` is.

    Example: logit([0.5, 0.8807971]) = [0, 2].
    """
    if not 0.0 < eps < 0.5:
        raise ValueError(f"logit: eps must be in (0, 0.5), got {eps}")
    p = p.clamp(eps, 1.0 - eps)
    return torch.log(p) - torch.log1p(-p)


class RunningMoments:
    """Running mean and variance of every value seen (Chan et al.'s parallel update), for whitening rewards when a
    batch is too small to give stable statistics. ``update(x)`` merges a batch; ``mean``, ``var`` read them."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        if x.numel():
            b_mean = float(x.mean())
            self.merge(x.numel(), b_mean, float(((x - b_mean) ** 2).sum()))

    def merge(self, n: int, b_mean: float, b_m2: float) -> None:
        """Merge a batch given by its count, mean and sum of squared deviations (a batch spread over ranks)."""
        n = int(n)
        if n == 0:
            return
        total = self.count + n
        delta = b_mean - self.mean
        self.mean += delta * n / total
        self.m2 += b_m2 + delta ** 2 * self.count * n / total
        self.count = total

    @property
    def var(self) -> float:
        """Population variance of every value seen (0 before two values)."""
        return self.m2 / self.count if self.count > 1 else 0.0

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def whiten(x: torch.Tensor, shift_mean: bool = True, mask: torch.Tensor | None = None,
           moments: RunningMoments | None = None, eps: float = 1e-8, all_reduce=None) -> torch.Tensor:
    """``(x - mean) / std`` with population statistics; same shape as ``x``.

    Args:
        x: (B,) or (B, T) values.
        shift_mean: False keeps the mean (``x / std`` plus the mean back: only the scale changes), as PPO
            implementations do for advantages they want to keep signed.
        mask: (like x) bool: statistics over the true positions only; false positions are returned as 0.
        moments: running statistics: ``x`` is merged into them first and whitened with the running mean and
            variance (the option for small batches); None: statistics of this batch.
        all_reduce: a function returning the sum of a tensor over the data-parallel ranks: the statistics (and
            the running moments' update) are then those of the global batch, each rank holding a part ``x``.
            None: ``x`` is the whole batch.

    Example: whiten([1, 2, 3, 4]) = [-1.3416, -0.4472, 0.4472, 1.3416] (mean 2.5, population std 1.118).
    """
    sel = x if mask is None else x[mask.bool()]
    if all_reduce is None:
        n, mean = sel.numel(), (sel.mean() if sel.numel() else None)
    else:  # two passes over the global batch: its mean, then the squared deviations from it
        n = int(all_reduce(torch.tensor([float(sel.numel())], dtype=torch.float64)).item())
        mean = (all_reduce(sel.detach().double().sum().reshape(1)) / max(n, 1)).to(x.dtype)[0]
    if n < 2 and moments is None:
        raise ValueError(f"whiten: needs at least 2 values (got {n}); pass running moments for tiny batches")
    if n:
        m2 = ((sel - mean) ** 2).sum()
        if all_reduce is not None:
            m2 = all_reduce(m2.detach().double().reshape(1)).to(x.dtype)[0]
    if moments is not None:
        if n:
            moments.merge(n, float(mean), float(m2))
        mean = torch.tensor(moments.mean, dtype=x.dtype, device=x.device)
        var = torch.tensor(moments.var, dtype=x.dtype, device=x.device)
    else:
        var = m2 / n
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    if mask is not None:
        out = out * mask.to(out.dtype)
    return out


KL_KINDS = ("k1", "k3")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π‖π₀) from the log-probs of the sampled tokens; (B, T) in, (B, T) out.

    ``k1``: ``logπ − logπ₀`` (unbiased, may be negative per token); ``k3``: ``(r − 1) − log r`` with
    ``r = π₀/π`` (unbiased, always >= 0, lower variance; Schulman's estimator).
    Example: logπ = log 0.5, logπ₀ = log 0.25: k1 = 0.6931, k3 = (0.5 − 1) + 0.6931 = 0.1931.
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"kl_penalty: logprobs {tuple(logprobs.shape)} and ref_logprobs "
                         f"{tuple(ref_logprobs.shape)} differ")
    log_ratio = logprobs - ref_logprobs  # log π/π₀
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl_penalty: kind must be one of {KL_KINDS}, got '{kind}'")


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float,
                  kl_level: str = "token") -> torch.Tensor:
    """The per-token PPO reward of Llama 2's ``R = R̃_c − β·KL(π‖π₀)``; (B, T).

    Args:
        score: (B,) the (whitened) sequence score R̃_c, added on each row's last response token.
        kl: (B, T) per-token KL estimates (``kl_penalty``).
        mask: (B, T) 1 on response tokens (a prefix of each row: responses are right-padded).
        kl_level: ``token``: ``−β·KL_t`` on every response token; ``sequence``: ``−β·Σ_t KL_t`` on the last token.
    """
    if kl.shape != mask.shape or score.shape != kl.shape[:1]:
        raise ValueError(f"token_rewards: score {tuple(score.shape)}, kl {tuple(kl.shape)}, mask {tuple(mask.shape)}")
    m = mask.to(kl.dtype)
    lengths = mask.long().sum(1)
    if bool((lengths == 0).any()):
        raise ValueError("token_rewards: a row has no response token")
    last = F.one_hot(lengths - 1, kl.shape[1]).to(kl.dtype)  # (B, T)
    if kl_level == "token":
        out = -beta * kl * m
    elif kl_level == "sequence":
        out = -beta * (kl * m).sum(1, keepdim=True) * last
    else:
        raise ValueError(f"token_rewards: kl_level must be 'token' or 'sequence', got '{kl_level}'")
    return out + score.to(kl.dtype)[:, None] * last


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; ``(advantages, returns)``, each (B, T).

    rewards, values, mask: (B, T); ``mask`` is 1 on response tokens (a prefix of each row). The value after the
    last response token is 0 (the episode ends), so with γ = λ = 1 the advantage is the reward-to-go minus V.
    δ_t = r_t + γ·V_{t+1} − V_t; A_t = δ_t + γ·λ·A_{t+1}; returns = A + V. Zero off the mask.

    Example (γ = 1, λ = 0.95): rewards [0, 0, 1], values [0.5, 0.6, 0.7] give δ = [0.1, 0.1, 0.3],
    A = [0.1 + 0.95·(0.1 + 0.95·0.3), 0.1 + 0.95·0.3, 0.3] = [0.46575, 0.385, 0.3].
    """
    if not (rewards.shape == values.shape == mask.shape) or rewards.ndim != 2:
        raise ValueError(f"gae: rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask "
                         f"{tuple(mask.shape)} must share a (B, T) shape")
    m = mask.to(rewards.dtype)
    v = values * m
    r = rewards * m
    adv = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        next_v = v[:, t + 1] if t + 1 < r.shape[1] else torch.zeros_like(running)
        delta = r[:, t] + gamma * next_v - v[:, t]
        running = (delta + gamma * lam * running) * m[:, t]
        adv[:, t] = running
    return adv, (adv + v) * m
