"""SFTModule: masked next-token training of a causal LM (SFT, and pretraining with every token labelled)."""
from __future__ import annotations

from typing import Any, Mapping

import lightning as L
import torch

from llama2_lit.losses import IGNORE_INDEX, masked_lm_loss
from llama2_lit.models.loading import load_causal_lm
from llama2_lit.modules.optim import adamw_cosine


class SFTModule(L.LightningModule):
    """Llama 2 §3.1 SFT: AdamW, cosine schedule, loss on answer tokens only (labels = -100 elsewhere).

    Args:
        model_cfg: the ``model`` config node (path or random-init dimensions, dtype, ...).
        tokenizer: the tokenizer the data was built with (saved next to the model in ``hf/``).
        lr, weight_decay, betas, eps: AdamW settings (paper SFT: lr 2e-5, weight decay 0.1).
        warmup_steps / warmup_ratio: linear warm-up (the larger of the two); min_lr_ratio: cosine floor.
    """

    def __init__(self, model_cfg: Mapping[str, Any], tokenizer=None, lr: float = 2e-5, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, warmup_steps: int = 0,
                 warmup_ratio: float = 0.0, min_lr_ratio: float = 0.0):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer = tokenizer
        self.model = load_causal_lm(dict(model_cfg), tokenizer)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        return self.model(**inputs, use_cache=False).logits  # (B, T, V)

    def _step(self, batch, stage: str) -> torch.Tensor:
        logits = self(batch)
        loss = masked_lm_loss(logits, batch["labels"])
        n_label = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=stage == "train", on_epoch=True,
                 batch_size=int(n_label), sync_dist=stage != "train")
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_cosine(self.model, self.trainer.estimated_stepping_batches, lr=hp.lr,
                            weight_decay=hp.weight_decay, betas=hp.betas, eps=hp.eps, warmup_steps=hp.warmup_steps,
                            warmup_ratio=hp.warmup_ratio, min_lr_ratio=hp.min_lr_ratio)
