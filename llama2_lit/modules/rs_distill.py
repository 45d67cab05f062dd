"""RSDistillModule: fine-tune a policy (or a smaller student) on the samples rejection sampling selected."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning as L
import torch

from llama2_lit.errors import UserError
from llama2_lit.models.loading import model_dtype, save_pretrained_as
from llama2_lit.models.lora import merge_lora
from llama2_lit.models.sharding import configure_sharded
from llama2_lit.modules.sft import SFTModule, token_loss
from llama2_lit.stages.rs_bag import tokenizer_fingerprint


class RSDistillModule(L.LightningModule):
    """Llama 2 §3.2.3 RS fine-tuning: the SFT objective (loss on response tokens) on the best-of-K samples.

    The student is the ``model`` config: the sampling policy itself (``model.path`` = the checkpoint RS sampled
    from) or a smaller model ("all smaller models are fine-tuned on rejection sampled data from the larger
    model"). It must use the tokenizer the samples were generated with: ``setup`` refuses otherwise.

    Composition over an :class:`SFTModule` (``self.sft``): model loading, the packed-row forward and the
    AdamW + cosine schedule are its; this module adds the data check, the logging and the export.
    Logs ``train/loss`` and ``val/loss`` (per response token).

    Args: as :class:`SFTModule` (``model_cfg``, ``tokenizer``, ``lr``, ``weight_decay``, ``betas``, ``eps``,
    ``warmup_steps``, ``warmup_ratio``, ``min_lr_ratio``).
    """

    def __init__(self, model_cfg: Mapping[str, Any], tokenizer=None, lr: float = 2e-5, weight_decay: float = 0.1,
                 betas: Sequence[float] = (0.9, 0.95), eps: float = 1e-8, warmup_steps: int = 0,
                 warmup_ratio: float = 0.0, min_lr_ratio: float = 0.0):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer = tokenizer
        self.sft = SFTModule(model_cfg, tokenizer, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps,
                             warmup_steps=warmup_steps, warmup_ratio=warmup_ratio, min_lr_ratio=min_lr_ratio)
        self.selection: str | None = None

    @property
    def model(self) -> torch.nn.Module:
        return self.sft.model

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.sft(batch)  # (B, T, V)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        sources = getattr(dm, "source_tokenizers", None)
        if sources is None:
            raise UserError(f"stage=rs_distill needs the samples an RS run selected, but data is "
                            f"{type(dm).__name__}: add data=rs_bag data.path=<the stage=rs run directory>")
        mine = tokenizer_fingerprint(self.tokenizer)
        if any(s != mine for s in sources):
            raise UserError(
                f"stage=rs_distill: the student's tokenizer (model={self.hparams.model_cfg.get('name')}, "
                f"{len(self.tokenizer)} tokens, fingerprint {mine}) differs from the tokenizer the samples were "
                f"generated with (fingerprint {', '.join(sources)}, policy {', '.join(dm.source_policies)}): "
                f"distil into a student that shares the sampling model's tokenizer")
        self.selection = str(dm.file)

    def configure_model(self) -> None:
        configure_sharded(self, self.model, seed=self.hparams.model_cfg.get("init_seed"))

    def _step(self, batch, stage: str) -> torch.Tensor:
        return token_loss(self, self(batch), batch["labels"], stage)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self):
        return self.sft.configure_optimizers()

    def export(self, path: str | Path) -> Path:
        """``hf/``: the fine-tuned causal LM and its tokenizer, with the selection it learnt from in config.json."""
        path = Path(path)
        self.sft.model = merge_lora(self.sft.model)
        self.model.config.llama2_lit = {"stage": "rs_distill", "selection": self.selection}
        save_pretrained_as(self.model, path, model_dtype(self.hparams.model_cfg, trainable=False))
        self.tokenizer.save_pretrained(path)
        return path
