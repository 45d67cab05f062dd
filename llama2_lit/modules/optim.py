"""The one optimizer recipe of the Llama 2 stages: AdamW without weight decay on norms and biases. SFT and the reward
model add a linear warm-up and a cosine decay (:func:`adamw_cosine`); PPO steps two models at their own constant
learning rates (:func:`adamw_per_model`)."""
from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

log = logging.getLogger(__name__)


def decay_groups(model: torch.nn.Module, weight_decay: float, **group) -> list[dict]:
    """AdamW parameter groups of ``model``'s trainable parameters, each in ``model.parameters()`` order: weight decay on
    the matrices, none on parameters of fewer than 2 dimensions (norms, biases). ``group``: more settings of both
    groups (PPO: the model's ``lr``)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, **group},
            {"params": no_decay, "weight_decay": 0.0, **group}]


def adamw_cosine(model: torch.nn.Module, total_steps: int, lr: float, weight_decay: float = 0.1,
                 betas=(0.9, 0.95), eps: float = 1e-8, warmup_steps: int = 0, warmup_ratio: float = 0.0,
                 min_lr_ratio: float = 0.0) -> dict:
    """Lightning's ``configure_optimizers`` dict: AdamW + per-step cosine schedule to ``min_lr_ratio * lr``.

    Warm-up lasts ``max(warmup_steps, ceil(warmup_ratio * total_steps))`` steps, capped at ``total_steps``: one
    rounding for every stage (a ratio never rounds to less warm-up than it asks; the reward model's "3%, at least 5").
    Logs the plan.
    """
    opt = torch.optim.AdamW(decay_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps)
    total = max(1, int(total_steps))
    warmup = min(total, max(int(warmup_steps), math.ceil(warmup_ratio * total)))
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=total,
                                                        min_lr_rate=min_lr_ratio)
    log.info("optimizer: %d steps, %d warm-up, lr %.3g -> %.3g", total, warmup, lr, lr * min_lr_ratio)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def adamw_per_model(models: Sequence[tuple[torch.nn.Module, float]], weight_decay: float, betas=(0.9, 0.95),
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """One AdamW over several ``(model, lr)``, each model at its own constant learning rate (no schedule; PPO: the
    policy and the critic). Groups without trainable parameters are left out."""
    groups = [g for model, lr in models for g in decay_groups(model, weight_decay, lr=lr)]
    return torch.optim.AdamW([g for g in groups if g["params"]], betas=tuple(betas), eps=eps)
