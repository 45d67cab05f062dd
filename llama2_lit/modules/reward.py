"""RewardModule: a scalar-head (or likelihood-head) Llama trained on preference pairs with the Llama 2 ranking loss."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning as L
import torch

from callbacks.rating_buckets import RatingBucketAccuracy, RatingBucketCallback
from data_modules.pairwise import concat_pairs
from llama2_lit.errors import UserError
from llama2_lit.core.losses import ranking_loss, safety_aux_loss
from llama2_lit.models.loading import model_dtype
from llama2_lit.models.lora import merge_lora
from llama2_lit.models.reward import export_reward_model, load_reward_model, reward_head, rewards, score
from llama2_lit.models.sharding import configure_sharded
from llama2_lit.modules.optim import adamw_cosine

log = logging.getLogger(__name__)


class RewardModule(L.LightningModule):
    """Llama 2 section 3.2.2 reward model: ``-log σ(r(x, y_c) - r(x, y_r) - m(rating))``.

    Chosen and rejected answers are scored in one forward pass over ``cat([chosen, rejected])``
    (2B rows, right-padded to one length). Logs ``train/loss``, ``train/accuracy``, ``val/loss``,
    ``val/accuracy``, and feeds ``self.bucket_metric`` (a :class:`RatingBucketAccuracy`) in validation;
    a :class:`RatingBucketCallback` is added unless the trainer already has one, so ``val/accuracy/<bucket>``,
    ``val/reward_gap/<bucket>`` and ``val/count/<bucket>`` are logged and Table 8 is printed at the end.

    Args:
        model_cfg: the ``model`` config node: a causal LM checkpoint (``path``; its LM head becomes a scalar
            head) or random-init dimensions.
        tokenizer: the tokenizer the pairs were built with (pad distinct from EOS; saved in ``hf/``).
            ``model_cfg.lora.enabled``: LoRA adapters on the transformer, the scalar head fully trained.
        lr, weight_decay, betas, eps: AdamW (paper: 1e-5 (5e-6 for 70B), 0.1, (0.9, 0.95), 1e-5).
        warmup_ratio / warmup_steps: warm-up over ``max(warmup_steps, ceil(warmup_ratio * total))`` steps
            (paper: 3%, at least 5); min_lr_ratio: the cosine floor (paper: 10% of peak).
        pairs_per_step: pairs per optimizer step over all ranks (paper: 512), recorded here; ``run.build``
            derives each rank's gradient accumulation from it, the micro-batch (``stage.batch_size``) and the
            world size (``llama2_lit.core.batching``).
        freeze_layers: freeze embeddings and the lowest N decoder layers (negative: all but the top -N);
            null = ``model_cfg.freeze_layers`` or 0.
        reward_name, margin: recorded in the exported ``config.json`` (``llama2_lit``), nothing else.
        head: ``scalar`` (the paper: a new linear head on the last token) or ``likelihood`` (the checkpoint's LM
            head kept; the reward is the answer's mean token log-prob, see ``llama2_lit.models.reward``).
        contrast: the likelihood head's weight on the answer's prompt-free log-prob (``models.reward.rewards``).
        safety_aux_weight: w > 0 adds ``w x`` :func:`llama2_lit.core.losses.safety_aux_loss` (binary cross-entropy of
            σ(r) against each answer's safety, from the pairs' safety bins) to the ranking loss; logged as
            ``train/safety_aux_loss``. 0 (default): the ranking loss alone. Table 29's ablation.

    Validation also feeds the pairs' ``is_safety`` and ``safety_label`` to the metric: ``val/accuracy/pool/<pool>``
    (Table 7), ``val/accuracy/safety_bin/<bin>`` and ``val/unsafe_recall`` (Table 29).
    """

    def __init__(self, model_cfg: Mapping[str, Any], tokenizer=None, lr: float = 1e-5, weight_decay: float = 0.1,
                 betas: Sequence[float] = (0.9, 0.95), eps: float = 1e-5, warmup_steps: int = 5,
                 warmup_ratio: float = 0.03, min_lr_ratio: float = 0.1, pairs_per_step: int = 512,
                 freeze_layers: int | None = None, reward_name: str | None = None, margin: str | None = None,
                 safety_aux_weight: float = 0.0, head: str = "scalar", contrast: float = 0.0):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer = tokenizer
        self.model = load_reward_model(dict(model_cfg), tokenizer, freeze_layers=freeze_layers, head=head,
                                       contrast=contrast)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes as they are
        self.bucket_metric = RatingBucketAccuracy()

    # -- scoring --------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                answer_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards (N,) float32 for (N, T) right-padded rows (a likelihood head needs the answer mask)."""
        return rewards(self.model, input_ids, attention_mask, answer_mask)

    def pair_rewards(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(chosen (B,), rejected (B,))`` rewards from one forward over the 2B concatenated rows."""
        ids, mask = concat_pairs(batch, self.model.config.pad_token_id)  # (2B, T)
        amask = None
        if reward_head(self.model) == "likelihood":
            amask = torch.cat([batch["chosen_answer_mask"], batch["rejected_answer_mask"]]).to(ids.device)
            amask = torch.nn.functional.pad(amask, (0, ids.shape[1] - amask.shape[1]))
        r = self(ids, mask, amask)  # (2B,)
        b = batch["chosen_input_ids"].shape[0]
        return r[:b], r[b:]

    def score(self, prompts: Sequence[str | list[dict]], responses: Sequence[str], batch_size: int = 16,
              max_length: int | None = None) -> torch.Tensor:
        """Rewards (N,) for prompt/response pairs, rendered with the chat template (see ``models.reward.score``)."""
        return score(self.model, self.tokenizer, prompts, responses, batch_size=batch_size, max_length=max_length)

    # -- steps ----------------------------------------------------------------------------------
    def _step(self, batch, stage: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        chosen, rejected = self.pair_rewards(batch)
        margin = batch.get("margin")
        loss = ranking_loss(chosen, rejected, None if margin is None else margin.to(chosen.device))
        b = chosen.shape[0]
        w = float(self.hparams.get("safety_aux_weight") or 0.0)
        if w > 0:
            aux = safety_aux_loss(chosen, rejected, *safety_targets(batch.get("safety_label") or [None] * b,
                                                                    chosen.device))
            self.log(f"{stage}/safety_aux_loss", aux, on_step=stage == "train", on_epoch=True, batch_size=b,
                     sync_dist=stage != "train")
            loss = loss + w * aux
        acc = (chosen > rejected).float().mean()
        train = stage == "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=train, on_epoch=True, batch_size=b, sync_dist=not train)
        self.log(f"{stage}/accuracy", acc, prog_bar=not train, on_step=train, on_epoch=True, batch_size=b,
                 sync_dist=not train)
        return loss, chosen, rejected

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")[0]

    def validation_step(self, batch, batch_idx: int) -> None:
        _, chosen, rejected = self._step(batch, "val")
        self.bucket_metric.update(chosen, rejected, batch["rating"], batch.get("is_safety"), batch.get("safety_label"))

    # -- wiring ---------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """``trainer=fsdp``: shard the reward model (see ``llama2_lit.models.sharding``)."""
        configure_sharded(self, self.model, seed=self.hparams.model_cfg.get("init_seed"))

    def configure_callbacks(self):
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and any(isinstance(c, RatingBucketCallback) for c in trainer.callbacks):
            return []
        return [RatingBucketCallback(printer=_print_table)]

    def setup(self, stage: str) -> None:
        require_pairs(self, "rm")

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_cosine(self.model, self.trainer.estimated_stepping_batches, lr=hp.lr,
                            weight_decay=hp.weight_decay, betas=hp.betas, eps=hp.eps, warmup_steps=hp.warmup_steps,
                            warmup_ratio=hp.warmup_ratio, min_lr_ratio=hp.min_lr_ratio)

    def export(self, path: str | Path) -> Path:
        """Save ``hf/``: a ``LlamaForSequenceClassification`` (num_labels 1, pad token id set) + tokenizer.

        LoRA adapters are merged into the weights first (the result loads without peft); weights are stored in
        ``model.dtype`` (training kept them in float32)."""
        self.model = merge_lora(self.model)
        meta = {k: v for k, v in (("reward", self.hparams.reward_name), ("margin", self.hparams.margin)) if v}
        return export_reward_model(self.model, self.tokenizer, path, metadata=meta,
                                   dtype=model_dtype(self.hparams.model_cfg, trainable=False))


def require_pairs(module: L.LightningModule, stage: str) -> None:
    """Refuse a DataModule that gives no preference-pair batches (``stage=rm`` / ``stage=dpo`` with SFT data)."""
    dm = getattr(module.trainer, "datamodule", None)
    if dm is not None and not getattr(dm, "pairwise", False):
        raise UserError(f"stage={stage} needs preference pairs, but data is a {type(dm).__name__}: add "
                        "data=synthetic_pairs (or data=pairs data.path=..., data=hh_harmless)")


def safety_targets(labels, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(chosen_safe, rejected_safe, labelled)`` (B,) from B safety bins (None: unlabelled) for
    :func:`safety_aux_loss`: preferred_safe_other_unsafe -> (1, 0), both_safe -> (1, 1), both_unsafe -> (0, 0)."""
    table = {"preferred_safe_other_unsafe": (1.0, 0.0), "both_safe": (1.0, 1.0), "both_unsafe": (0.0, 0.0)}
    unknown = [x for x in labels if x is not None and x not in table]
    if unknown:
        raise ValueError(f"unknown safety label {unknown[0]!r} (expected one of: {', '.join(table)}, or None)")
    ys = [table.get(x, (0.0, 0.0)) for x in labels]
    return (torch.tensor([y[0] for y in ys], device=device), torch.tensor([y[1] for y in ys], device=device),
            torch.tensor([x is not None for x in labels], dtype=torch.bool, device=device))


def _print_table(text: str) -> None:
    log.info("reward model accuracy per rating (last validation):\n%s", text)
