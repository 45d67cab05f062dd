"""DPOModule: direct preference optimisation of a causal LM on the preference pairs the reward models learn from.

The policy starts from ``model`` (an SFT checkpoint); the reference π_ref is its starting weights, frozen (with LoRA:
the same model with its adapters switched off, so no copy is held). Each step scores the chosen and the rejected
answers of B pairs in one forward over ``cat([chosen, rejected])`` (2B rows, right-padded), sums the answer tokens'
log-probs (``average_logps``: their mean) and applies :func:`llama2_lit.core.losses.dpo_loss` against the
reference's log-probs of the same answers. Those are computed once per pair, the first time the pair is seen, and
kept (``ref_cache``): later epochs and validations read them instead of running the reference again.

Logged: ``train/loss``, ``train/accuracy``, ``val/loss``, and on the validation pairs ``dpo/reward_margin`` (mean
``r_c - r_r`` of the implicit rewards ``r = β log π/π_ref``), ``dpo/accuracy`` (share with ``r_c > r_r``) and
``dpo/accuracy/<bucket>`` per rating (the :class:`RatingBucketCallback` with the ``dpo/`` prefix, which also gives the
per-pool and safety-bin figures). At the end of fit (and with ``kl_at_start`` before it), ``dpo/kl``: the policy's KL
to the reference on ``kl_prompts`` held-out world prompts, the mean over prompts of ``sum_t log π(y_t) - log
π_ref(y_t)`` for one T=1 sample ``y ~ π`` each (an unbiased estimate of the sequence KL).
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Mapping, Sequence

import torch

from callbacks.rating_buckets import RatingBucketAccuracy, RatingBucketCallback
from data_modules.pairwise import concat_pairs
from llama2_lit.core.losses import DPO_LOSSES, dpo_loss, token_logprobs
from llama2_lit.core.stats import mean_and_se
from llama2_lit.errors import UserError
from llama2_lit.generation.engine import Engine, Sampling
from llama2_lit.models.loading import model_dtype
from llama2_lit.models.lora import is_lora
from llama2_lit.models.reward import answer_logps, mask_positions  # noqa: F401 (answer_logps: re-exported)
from llama2_lit.models.sharding import configure_sharded, is_sharded
from llama2_lit.modules.reward import require_pairs
from llama2_lit.modules.sft import SFTModule

log = logging.getLogger(__name__)


class DPOModule(SFTModule):
    """Direct preference optimisation (Rafailov et al. 2023; IPO, Azar et al. 2023) on ``PairwiseDataModule`` pairs.

    An :class:`SFTModule` (the policy's loading, its AdamW + cosine schedule, the ``hf/`` export with LoRA merged) with
    the DPO steps, the frozen reference and its log-prob cache.

    Args:
        model_cfg: the ``model`` config node (``path``: the SFT policy; LoRA through ``model.lora``).
        tokenizer: the tokenizer the pairs were built with (saved in ``hf/``).
        beta: β of the implicit reward ``β log π/π_ref`` (DPO paper: 0.1; TRL's default too).
        loss_type: ``sigmoid`` (DPO) | ``ipo``.
        use_margin: add the pairs' rating margin (``reward.margin`` preset, Llama 2 Table 27) to the loss, our
            documented choice (:func:`dpo_loss`); false: the plain loss.
        average_logps: length-normalised answer log-probs (mean per token) instead of sums.
        lr, weight_decay, betas, eps, warmup_steps, warmup_ratio, min_lr_ratio: AdamW with a cosine schedule.
        kl_prompts, kl_max_new_tokens: the held-out KL estimate after fit (0 prompts: none); ``kl_at_start``: also
            before fit (``dpo/kl_init``, 0 up to sampling noise since the policy is the reference then).
    """

    def __init__(self, model_cfg: Mapping[str, Any], tokenizer=None, beta: float = 0.1, loss_type: str = "sigmoid",
                 use_margin: bool = False, average_logps: bool = False, lr: float = 1e-6, weight_decay: float = 0.0,
                 betas: Sequence[float] = (0.9, 0.95), eps: float = 1e-8, warmup_steps: int = 0,
                 warmup_ratio: float = 0.1, min_lr_ratio: float = 0.0, kl_prompts: int = 200,
                 kl_max_new_tokens: int = 24, kl_at_start: bool = False):
        if loss_type not in DPO_LOSSES:
            raise UserError(f"dpo.loss_type: unknown '{loss_type}' (choose {', '.join(DPO_LOSSES)})")
        if not float(beta) > 0:
            raise UserError(f"dpo.beta must be > 0, got {beta}")
        super().__init__(model_cfg, tokenizer, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps,
                         warmup_steps=warmup_steps, warmup_ratio=warmup_ratio, min_lr_ratio=min_lr_ratio)
        self.save_hyperparameters(ignore=["tokenizer"])  # this class's arguments too (beta, loss_type, ...)
        # π_ref: with LoRA the base model (adapters off, no copy); else a frozen copy of the starting weights in a
        # plain dict (not a submodule: not trained, not checkpointed; rebuilt from model.path on resume)
        self._frozen: dict[str, Any] = {}
        if not is_lora(self.model):
            self._frozen["ref"] = copy.deepcopy(self.model).eval().requires_grad_(False).to(
                model_dtype(dict(model_cfg), trainable=False))
        self.ref_cache: dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[float, float]] = {}
        self.ref_forwards = 0  # pairs the reference scored (a cached pair is not scored again)
        self.bucket_metric = RatingBucketAccuracy()
        self.final_metrics: dict[str, float] = {}

    @property
    def ref_model(self) -> torch.nn.Module | None:
        return self._frozen.get("ref")

    # -- log-probs ------------------------------------------------------------------------------------------
    def _ref_logps(self, batch, keys) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's answer log-probs (B,) each, from the cache or one no-grad forward over the missing pairs."""
        missing = [i for i, k in enumerate(keys) if k not in self.ref_cache]
        if missing:
            ids, mask = concat_pairs(batch, self.tokenizer.pad_token_id)
            amask = torch.cat([batch["chosen_answer_mask"], batch["rejected_answer_mask"]]).to(ids.device)
            amask = torch.nn.functional.pad(amask, (0, ids.shape[1] - amask.shape[1]))
            b = len(keys)
            rows = torch.tensor(missing + [b + i for i in missing], device=ids.device)
            with torch.no_grad():
                if self.ref_model is not None:
                    lp = answer_logps(self.ref_model, ids[rows], mask[rows], amask[rows], self.hparams.average_logps)
                else:  # LoRA: the base model is the reference
                    with self.model.disable_adapter():
                        lp = answer_logps(self.model, ids[rows], mask[rows], amask[rows], self.hparams.average_logps)
            n = len(missing)
            for j, i in enumerate(missing):
                self.ref_cache[keys[i]] = (float(lp[j]), float(lp[n + j]))
            self.ref_forwards += n
        c = torch.tensor([self.ref_cache[k][0] for k in keys], device=self.device)
        r = torch.tensor([self.ref_cache[k][1] for k in keys], device=self.device)
        return c, r

    @staticmethod
    def _keys(batch) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """A pair's cache key: its chosen and rejected token ids (padding stripped)."""
        out = []
        for ci, cm, ri, rm in zip(batch["chosen_input_ids"], batch["chosen_attention_mask"],
                                  batch["rejected_input_ids"], batch["rejected_attention_mask"]):
            out.append((tuple(ci[cm.bool()].tolist()), tuple(ri[rm.bool()].tolist())))
        return out

    def pair_logps(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy's answer log-probs ``(chosen (B,), rejected (B,))`` from one forward over the 2B rows."""
        ids, mask = concat_pairs(batch, self.tokenizer.pad_token_id)
        amask = torch.cat([batch["chosen_answer_mask"], batch["rejected_answer_mask"]])
        amask = torch.nn.functional.pad(amask, (0, ids.shape[1] - amask.shape[1])).to(ids.device)
        lp = answer_logps(self.model, ids, mask, amask, self.hparams.average_logps)
        b = batch["chosen_input_ids"].shape[0]
        return lp[:b], lp[b:]

    # -- steps ----------------------------------------------------------------------------------------------
    def _step(self, batch, stage: str):
        hp = self.hparams
        pc, pr = self.pair_logps(batch)
        rc, rr = self._ref_logps(batch, self._keys(batch))
        margin = batch["margin"].to(pc.device) if hp.use_margin else None
        loss, c, r = dpo_loss(pc, pr, rc, rr, beta=float(hp.beta), loss_type=hp.loss_type, margin=margin)
        b = pc.shape[0]
        train = stage == "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=train, on_epoch=True, batch_size=b, sync_dist=not train)
        self.log(f"{stage}/accuracy", (c > r).float().mean(), on_step=train, on_epoch=True, batch_size=b,
                 sync_dist=not train)
        if not train:
            self.log("dpo/reward_margin", (c - r).mean(), on_epoch=True, batch_size=b, sync_dist=True)
        return loss, c, r

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")[0]

    def validation_step(self, batch, batch_idx: int) -> None:
        _, c, r = self._step(batch, "val")
        self.bucket_metric.update(c, r, batch["rating"], batch.get("is_safety"), batch.get("safety_label"))

    # -- KL to the reference on held-out prompts ------------------------------------------------------------
    def held_out_kl(self, prompts: Sequence[str], max_new_tokens: int, seed: int = 0) -> tuple[float, float]:
        """``(mean, standard error)`` over prompts of ``log π(y) - log π_ref(y)``, one T=1 sample ``y ~ π`` each."""
        was = self.model.training
        self.model.eval()
        roll = Engine(self.model, self.tokenizer).generate(list(prompts), Sampling(
            max_new_tokens=max_new_tokens, temperature=1.0, seed=seed))
        ids, mask = (x.clone().to(self.device) for x in roll.sequences())
        resp = roll.response_ids.clone().to(self.device)
        rmask = roll.response_mask.clone().to(self.device).float()
        t = resp.shape[1]
        with torch.no_grad():
            def lp(model):
                out = model(input_ids=ids, attention_mask=mask, position_ids=mask_positions(mask), use_cache=False,
                            logits_to_keep=t + 1)
                return (token_logprobs(out.logits[:, :-1], resp) * rmask).sum(1)
            pol = lp(self.model)
            if self.ref_model is not None:
                ref = lp(self.ref_model)
            else:
                with self.model.disable_adapter():
                    ref = lp(self.model)
        self.model.train(was)
        return mean_and_se((pol - ref).double().cpu().tolist())

    def _kl(self, suffix: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        n = int(self.hparams.kl_prompts)
        if n <= 0 or dm is None or not hasattr(dm, "kl_prompts"):
            return
        if is_sharded(self.model):  # generation on one rank of a sharded model would wait for the others forever
            if self.trainer.is_global_zero:
                log.warning("dpo/kl skipped: the model is sharded (trainer=fsdp); measure the exported hf/ instead")
            return
        if not self.trainer.is_global_zero:
            return
        prompts = dm.kl_prompts(n)
        if not prompts:
            return
        mean, se = self.held_out_kl(prompts, int(self.hparams.kl_max_new_tokens))
        self.final_metrics.update({f"dpo/kl{suffix}": mean, f"dpo/kl_se{suffix}": se,
                                   "dpo/kl_prompts": float(len(prompts))})
        log.info("KL(policy || reference) on %d held-out prompts%s: %.4f ± %.4f nats per answer", len(prompts),
                 " (before fit)" if suffix else "", mean, se)

    def on_fit_start(self) -> None:
        if self.ref_model is not None and not is_sharded(self.ref_model):
            self._frozen["ref"] = self.ref_model.to(self.device)
        if self.hparams.kl_at_start:
            self._kl("_init")

    def on_fit_end(self) -> None:
        self._kl("")
        self.final_metrics["dpo/ref_pairs_scored"] = float(self.ref_forwards)

    # -- wiring ---------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """``trainer=fsdp``: shard the policy (as the SFT stage does) and the reference."""
        super().configure_model()
        if self.ref_model is not None:
            configure_sharded(self, self.ref_model, seed=self.hparams.model_cfg.get("init_seed"))

    def configure_callbacks(self):
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and any(isinstance(c, RatingBucketCallback) for c in trainer.callbacks):
            return []
        return [RatingBucketCallback(prefix="dpo/", printer=lambda text: log.info(
            "DPO implicit-reward accuracy per rating (last validation):\n%s", text))]

    def setup(self, stage: str) -> None:
        require_pairs(self, "dpo")

    def export_metadata(self) -> dict:
        return {"stage": "dpo", "beta": float(self.hparams.beta), "loss_type": self.hparams.loss_type}
