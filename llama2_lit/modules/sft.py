"""SFTModule: masked next-token training of a causal LM (SFT, and pretraining with every token labelled), and
RSDistillModule: the same training on the samples rejection sampling selected."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning as L
import torch

from llama2_lit.core.losses import IGNORE_INDEX, masked_lm_loss
from llama2_lit.errors import UserError
from llama2_lit.models.loading import load_causal_lm, model_dtype, save_pretrained_as
from llama2_lit.models.lora import merge_lora
from llama2_lit.models.sharding import configure_sharded
from llama2_lit.models.tokenizers import tokenizer_fingerprint
from llama2_lit.modules.optim import adamw_cosine


def token_loss(module: L.LightningModule, logits: torch.Tensor, labels: torch.Tensor, stage: str) -> torch.Tensor:
    """Loss per labelled token of the global batch; logs ``<stage>/loss``.

    With N data-parallel ranks a training micro-batch's loss is its summed token loss divided by the labelled
    tokens of all N micro-batches (times N, which the gradient average divides out again): the gradient is
    then the one of a single process over the whole batch, whatever the ranks' token counts. The logged value
    is the global batch's mean. One process: the plain mean, as ``masked_lm_loss``.
    """
    total = masked_lm_loss(logits, labels, reduction="sum")
    n = (labels[:, 1:] != IGNORE_INDEX).sum()
    trainer = getattr(module, "_trainer", None)
    world = trainer.world_size if trainer is not None else 1
    if stage == "train" and world > 1:
        n_all = trainer.strategy.reduce(n.detach().float().clone(), reduce_op="sum")
        loss = total * world / n_all
        shown = trainer.strategy.reduce(total.detach().clone(), reduce_op="sum") / n_all
    else:
        loss = shown = total / n
    module.log(f"{stage}/loss", shown, prog_bar=True, on_step=stage == "train", on_epoch=True,
               batch_size=int(n), sync_dist=stage != "train")
    return loss


class SFTModule(L.LightningModule):
    """Llama 2 §3.1 SFT: AdamW, cosine schedule, loss on answer tokens only (labels = -100 elsewhere).

    Args:
        model_cfg: the ``model`` config node (path or random-init dimensions, dtype, ...).
        tokenizer: the tokenizer the data was built with (saved next to the model in ``hf/``).
        lr, weight_decay, betas, eps: AdamW settings (paper SFT: lr 2e-5, weight decay 0.1).
        warmup_steps / warmup_ratio: linear warm-up (the larger of the two); min_lr_ratio: cosine floor.

    ``trainer=fsdp`` shards the model in :meth:`configure_model`; ``model.lora.enabled`` trains LoRA adapters
    only, merged into the base weights by :meth:`export`.
    """

    def __init__(self, model_cfg: Mapping[str, Any], tokenizer=None, lr: float = 2e-5, weight_decay: float = 0.1,
                 betas: Sequence[float] = (0.9, 0.95), eps: float = 1e-8, warmup_steps: int = 0,
                 warmup_ratio: float = 0.0, min_lr_ratio: float = 0.0):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer = tokenizer
        self.model = load_causal_lm(dict(model_cfg), tokenizer)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        return self.model(**inputs, use_cache=False).logits  # (B, T, V)

    def configure_model(self) -> None:
        configure_sharded(self, self.model, seed=self.hparams.model_cfg.get("init_seed"))

    def _step(self, batch, stage: str) -> torch.Tensor:
        return token_loss(self, self(batch), batch["labels"], stage)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_cosine(self.model, self.trainer.estimated_stepping_batches, lr=hp.lr,
                            weight_decay=hp.weight_decay, betas=hp.betas, eps=hp.eps, warmup_steps=hp.warmup_steps,
                            warmup_ratio=hp.warmup_ratio, min_lr_ratio=hp.min_lr_ratio)

    def export(self, path: str | Path) -> Path:
        """``hf/``: the causal LM (LoRA adapters merged into its weights, stored in ``model.dtype``) and the
        tokenizer; :meth:`export_metadata` (if any) is recorded in its ``config.json`` under ``llama2_lit``."""
        path = Path(path)
        self.model = merge_lora(self.model)
        meta = self.export_metadata()
        if meta is not None:
            self.model.config.llama2_lit = meta
        save_pretrained_as(self.model, path, model_dtype(self.hparams.model_cfg, trainable=False))
        self.tokenizer.save_pretrained(path)
        return path

    def export_metadata(self) -> dict | None:
        return None


class RSDistillModule(SFTModule):
    """Llama 2 §3.2.3 RS fine-tuning: the SFT objective (loss on response tokens) on the best-of-K samples.

    The student is the ``model`` config: the sampling policy itself (``model.path`` = the checkpoint RS sampled
    from) or a smaller model ("all smaller models are fine-tuned on rejection sampled data from the larger
    model"). It must use the tokenizer the samples were generated with: ``setup`` refuses otherwise.

    An :class:`SFTModule` (model loading, the packed-row forward, the steps, the AdamW + cosine schedule) that adds
    the data check and records the selection it learnt from in the exported ``config.json``. Logs ``train/loss`` and
    ``val/loss`` (per response token). Args: as :class:`SFTModule`.

    Checkpoints written before this class was an :class:`SFTModule` (it wrapped one as ``self.sft``) name the
    weights ``sft.model.*``: :meth:`load_state_dict` reads them as ``model.*``.
    """

    def __init__(self, model_cfg: Mapping[str, Any], tokenizer=None, lr: float = 2e-5, weight_decay: float = 0.1,
                 betas: Sequence[float] = (0.9, 0.95), eps: float = 1e-8, warmup_steps: int = 0,
                 warmup_ratio: float = 0.0, min_lr_ratio: float = 0.0):
        super().__init__(model_cfg, tokenizer, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps,
                         warmup_steps=warmup_steps, warmup_ratio=warmup_ratio, min_lr_ratio=min_lr_ratio)
        self.selection: str | None = None
        self.register_load_state_dict_pre_hook(_from_wrapped_layout)

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

    def export_metadata(self) -> dict:
        return {"stage": "rs_distill", "selection": self.selection}


WRAPPED_PREFIX = "sft."  # RSDistillModule's checkpoints before it subclassed SFTModule: ``sft.model.*``


def _from_wrapped_layout(module, state_dict, prefix, *args) -> None:
    """``load_state_dict`` pre-hook: ``sft.model.*`` keys (the old RSDistillModule layout) renamed ``model.*``."""
    old = prefix + WRAPPED_PREFIX + "model."
    for k in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + k[len(prefix) + len(WRAPPED_PREFIX):]] = state_dict.pop(k)
