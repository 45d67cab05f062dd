"""The optimizer recipe the Llama 2 stages share: AdamW without decay on norms/biases, linear warm-up, cosine."""
from __future__ import annotations

import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup


def adamw_cosine(model: torch.nn.Module, total_steps: int, lr: float, weight_decay: float = 0.1,
                 betas=(0.9, 0.95), eps: float = 1e-8, warmup_steps: int = 0, warmup_ratio: float = 0.0,
                 min_lr_ratio: float = 0.0) -> dict:
    """Lightning's ``configure_optimizers`` dict: AdamW + per-step cosine schedule to ``min_lr_ratio * lr``.

    Warm-up lasts ``max(warmup_steps, warmup_ratio * total_steps)`` steps (the paper's RM: 3%, at least 5),
    capped at ``total_steps``. Parameters with fewer than 2 dimensions (norms, biases) get no weight decay.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=tuple(betas), eps=eps)
    total = max(1, int(total_steps))
    warmup = min(total, max(int(warmup_steps), int(warmup_ratio * total)))
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=total,
                                                        min_lr_rate=min_lr_ratio)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
