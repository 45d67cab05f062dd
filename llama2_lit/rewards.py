"""Reward functions on tensors (pure: no Lightning, no I/O). Shapes in comments: ``(B,)`` one value per sample.

Llama 2 §3.2.3 combines the two reward models piecewise (scores on the sigmoid scale, as the RMs' outputs
are read in the paper):

    R_c(g | p) = R_s(g | p)   if IS_SAFETY(p) or R_s(g | p) < 0.15
                 R_h(g | p)   otherwise
"""
from __future__ import annotations

import torch

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
