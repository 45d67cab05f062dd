"""PPOModule: Llama 2 §3.2.3 PPO with the safety-gated, logit-whitened reward and a KL penalty to π₀.

One ``training_step`` is one PPO iteration over a batch of prompts (Lightning manual optimization):

1. sample one response per prompt from the policy with the generation engine (its log-probs are π_old's);
2. score with both reward models (sigmoid scale): ``R_c = R_s if is_safety(p) or R_s < 0.15 else R_h``,
   then ``R̃_c = whiten(logit(R_c))``;
3. log-probs of the frozen reference π₀ and values of the critic, one no-grad forward each;
4. per-token reward ``−β·KL_t`` plus ``R̃_c`` on the last response token (``kl_level=sequence``: the summed KL on
   the last token), GAE advantages and returns;
5. ``ppo_epochs`` passes over shuffled mini-batches, one AdamW step per mini-batch (policy clipped surrogate +
   clipped value loss; gradients clipped per model).

All the math is in ``llama2_lit/core/rl.py`` and ``llama2_lit/core/losses.py``; this file wires it. The reference
model and the reward models are frozen, in eval mode, under ``no_grad`` (bf16 on GPU by default) and are not
part of the module's state dict, so checkpoints hold the policy, the critic and the optimizer only.

``trainer=fsdp`` shards all five models (``configure_model``; the reward models when they load): each rank holds
1/N of each. Rollouts gather the policy's weights once per rollout phase and free them after
(``ppo.gather_for_generation``, the Llama 2 paper's fix for FSDP's slow generation); ``false`` samples from the
sharded policy, every decoding step gathering each layer again. Scoring and the training forwards run sharded.
Sizes are global (``llama2_lit.core.batching``): ``stage.batch_size`` prompts per iteration over all ranks, each rank
sampling its ``1/N``; ``ppo.mini_batch_size`` rows per optimizer step over all ranks. R̃_c, the running moments of
``ppo.whiten_rewards=running`` and the advantages are whitened with the global batch's statistics, and the loss is
the mean over the global mini-batch's tokens. A skip (non-finite rewards or loss) is decided for all ranks together.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping

from llama2_lit.core.losses import explained_variance, masked_entropy, ppo_policy_loss, token_logprobs, value_loss
from llama2_lit.core.rl import RunningMoments, gae, kl_penalty, logit, token_rewards, whiten
from llama2_lit.errors import UserError
from llama2_lit.generation.engine import Engine
from llama2_lit.generation.sampling import Rollout, Sampling
from llama2_lit.models.loading import load_causal_lm, model_dtype, save_pretrained_as, torch_dtype
from llama2_lit.models.reward import mask_positions
from llama2_lit.models.sharding import configure_sharded, gathered, is_sharded, local_numel, lockstep_forwards
from llama2_lit.models.value import load_value_model, token_values
from llama2_lit.modules.optim import adamw_per_model
from llama2_lit.scoring import GoldScorer, build_scorer, gated
from llama2_lit.world import oracle as world

log = logging.getLogger(__name__)
WHITEN = ("batch", "running", "none")
VALUE_CALLS = ("model", "score")  # token_values calls the critic's backbone and head directly: FSDP groups of their own


def _rollout_gold(prompts: Sequence[str], texts: Sequence[str]) -> dict[str, float]:
    """``ppo/gold_helpfulness``: the world's gold score of this iteration's rollouts (the true reward the proxy stands
    for); empty when the prompts are not world prompts."""
    try:
        return {"ppo/gold_helpfulness": sum(world.gold_helpfulness(p, t) for p, t in zip(prompts, texts)) / len(texts)}
    except ValueError:
        return {}


class PPOModule(L.LightningModule):
    """PPO on the Llama 2 reward (see the module docstring).

    Args:
        model_cfg: the ``model`` node: the policy (``path``: an SFT or RS run's ``hf/``), also π₀ at the start.
        tokenizer: the policy's tokenizer.
        options: the ``ppo`` config node (conf/stage/ppo.yaml documents every key).
    """

    checkpoint_monitor = ("val/reward", "max")  # callbacks.checkpoint.SafeCheckpoint(monitor=auto): the best checkpoint

    def __init__(self, model_cfg: Mapping[str, Any], tokenizer=None, options: Mapping[str, Any] | None = None):
        super().__init__()
        if type(options).__name__ == "DictConfig":  # no omegaconf import: the module runs without Hydra too
            from omegaconf import OmegaConf

            options = OmegaConf.to_container(options, resolve=True)
        o = dict(options or {})
        if o.get("whiten_rewards", "batch") not in WHITEN:
            raise UserError(f"ppo.whiten_rewards: unknown '{o['whiten_rewards']}' (choose {list(WHITEN)})")
        if int(o["mini_batch_size"]) < 1:
            raise UserError(f"ppo.mini_batch_size must be >= 1, got {o['mini_batch_size']}")
        self.save_hyperparameters({"model_cfg": dict(model_cfg), "options": o})
        self.automatic_optimization = False
        self.opts, self.tokenizer = o, tokenizer
        self.model = load_causal_lm(dict(model_cfg), tokenizer)  # the policy
        self.value_model = load_value_model(o["value_init"], model_cfg, tokenizer,
                                            (o.get("reward_models") or {}).get("helpfulness"))
        # π₀: the policy's starting weights, frozen, held in ppo.frozen_dtype (model.dtype by default); the policy and
        # the critic train on float32 master weights (models.loading.MASTER_DTYPE)
        ref = copy.deepcopy(self.model).eval().requires_grad_(False).to(self._frozen_dtype())
        self._frozen: dict[str, Any] = {"ref": ref}  # a plain dict: not a submodule, not checkpointed
        self.scorer = None
        self.engine: Engine | None = None
        self.reward_moments = RunningMoments()
        self.iteration = 0
        self.bad_in_row = 0
        self.skipped = 0
        self.best_val_reward = -math.inf
        self.best_iteration = 0
        self._val: dict[str, dict[str, list]] = {}
        self.history: list[dict[str, float]] = []  # every iteration's logged scalars (benchmarks read the timings)

    @property
    def ref_model(self) -> torch.nn.Module:
        return self._frozen["ref"]

    # -- setup ------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """``trainer=fsdp``: shard the policy, the critic and π₀ (built on the meta device: each rank fills its shard
        by the seeded init or from its slices of the checkpoint files). The reward models shard when they load."""
        seed = self.hparams.model_cfg.get("init_seed")
        configure_sharded(self, self.model, seed=seed)
        configure_sharded(self, self.ref_model, seed=seed)
        configure_sharded(self, self.value_model, seed=seed, called=VALUE_CALLS)

    def _frozen_dtype(self) -> torch.dtype:
        """The dtype π₀ and the reward models are held in: ``ppo.frozen_dtype``, ``auto`` = ``model.dtype``."""
        name = self.opts.get("frozen_dtype", "auto")
        if name == "auto":
            return model_dtype(self.hparams.model_cfg, trainable=False)
        return torch_dtype(name)

    def on_fit_start(self) -> None:
        self._prepare_frozen()

    def on_validation_start(self) -> None:
        self._prepare_frozen()

    def _prepare_frozen(self) -> None:
        if self.scorer is not None:
            return
        sharded = is_sharded(self.model)
        # π₀ and the RMs in ppo.frozen_dtype (sharded too: their shards; the strategy's mixed precision sets the
        # compute dtype); the policy and the critic keep float32 master weights
        dtype = self._frozen_dtype()
        if not sharded:
            self._frozen["ref"] = self.ref_model.to(self.device, dtype)
        self.ref_model.eval()
        self.scorer = build_scorer(self.opts, self.tokenizer, "cpu" if sharded else self.device,
                                   dtype=str(dtype).replace("torch.", ""), stage="ppo", on_meta=sharded)
        if isinstance(self.scorer, GoldScorer):
            log.warning("ppo.scorer=gold: rewards come from the world's gold functions, a stand-in for reward models")
        else:
            for name, (m, tok) in self.scorer.models.items():
                m.requires_grad_(False)
                if sharded:  # built on meta (load_exported); sharded like the trained models, each rank reading
                    # only its rows of the RM folder's safetensors files, so no rank holds a whole reward model
                    self.scorer.models[name] = (configure_sharded(self, m).eval(), tok)
        if sharded:
            log.info("rank %d holds %s parameters of policy, critic, reference%s", self.global_rank,
                     ", ".join(str(local_numel(m)) for m in self._sharded_models().values()),
                     "" if isinstance(self.scorer, GoldScorer) else ", reward models")
        if not (sharded and self._gather()):  # gathered rollouts build an engine per phase (_rollout_engine)
            eng = self.opts.get("engine") or {}
            self.engine = Engine(self.model, self.tokenizer, backend=eng.get("backend", "auto"),
                                 compile=bool(eng.get("compile", False)))

    def _sharded_models(self) -> dict[str, torch.nn.Module]:
        """Every model of the run by name: ``policy``, ``value``, ``ref`` and the reward models (``rm_<name>``)."""
        out = {"policy": self.model, "value": self.value_model, "ref": self.ref_model}
        for name, (m, _) in (getattr(self.scorer, "models", None) or {}).items():
            out[f"rm_{name}"] = m
        return out

    def _gather(self) -> bool:
        return bool(self.opts.get("gather_for_generation", True))

    @contextmanager
    def _rollout_engine(self):
        """The generation engine for one rollout phase (training or held-out evaluation).

        Unsharded: the engine over the policy. Sharded, ``ppo.gather_for_generation=true``: the policy's weights
        all-gathered once (FSDP2 ``unshard``), an engine over the full weights, resharded and freed at the end.
        ``false``: the engine (``hf`` backend) over the sharded policy; each forward gathers every layer, and the
        ranks' forwards are kept in step (a rank whose answers ended joins the others' forwards).
        """
        if not is_sharded(self.model):
            yield self.engine
            return
        if self._gather():
            eng = self.opts.get("engine") or {}
            with gathered(self.model):
                engine = Engine(self.model, self.tokenizer, backend=eng.get("backend", "auto"),
                                compile=bool(eng.get("compile", False)))
                if engine.backend != "llama":
                    raise UserError("ppo.gather_for_generation=true samples from the gathered weights with the engine's "
                                    "llama backend, which cannot run this policy (see engine.llama_supported); set "
                                    "ppo.gather_for_generation=false to sample from the sharded policy")
                yield engine
            return
        pad = torch.full((1, 1), int(self.tokenizer.pad_token_id), device=self.device)

        def idle_forward():
            with torch.inference_mode():
                self.model(input_ids=pad, use_cache=False, logits_to_keep=1)

        with lockstep_forwards(self.model, idle_forward):
            yield self.engine

    def _world(self) -> int:
        trainer = getattr(self, "_trainer", None)
        return int(trainer.world_size) if trainer is not None else 1

    def _sum_ranks(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the data-parallel ranks (one process: ``x``): statistics of the global batch."""
        if self._world() == 1:
            return x
        return self._trainer.strategy.reduce(x.to(self.device).clone(), reduce_op="sum").to(x.device)

    def _all_ranks(self, ok: bool) -> bool:
        """``ok`` on every rank (one process: ``ok``): a skip must be taken by all ranks of a sharded run."""
        trainer = getattr(self, "_trainer", None)
        return bool(trainer.strategy.reduce_boolean_decision(ok, all=True)) if trainer is not None else ok

    def configure_optimizers(self):
        """AdamW over the policy (``ppo.lr``) and the critic (``ppo.value_lr``, default ``ppo.lr``); no schedule."""
        o = self.opts
        return adamw_per_model([(self.model, float(o["lr"])), (self.value_model, float(o.get("value_lr") or o["lr"]))],
                               float(o["weight_decay"]), betas=o["betas"], eps=float(o["eps"]))

    def configure_callbacks(self):
        es = self.opts.get("early_stopping") or {}
        if not es.get("enabled", False):
            return []
        return [EarlyStopping(monitor="val/reward", mode="max", patience=int(es.get("patience", 3)),
                              min_delta=float(es.get("min_delta", 0.0)), check_on_train_epoch_end=False)]

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        return batch  # prompt records (text and safety tag): nothing to move

    # -- forward passes ---------------------------------------------------------------------------------
    def _response_logits(self, model, ids, mask, pos, t: int) -> torch.Tensor:
        """Logits predicting the ``t`` response tokens (B, t, V): positions P-1 .. P+t-2."""
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=t + 1)
        return out.logits[:, :-1]

    def _chunks(self, n: int, size: int | None) -> list[slice]:
        size = int(size or n)
        return [slice(i, min(n, i + size)) for i in range(0, n, size)]

    # -- one PPO iteration ------------------------------------------------------------------------------
    def training_step(self, batch: Sequence[Any], batch_idx: int) -> None:
        """One PPO iteration: rollout, reward, reference log-probs / values / advantages, PPO epochs, logging."""
        self.iteration += 1
        prompts = [p.text for p in batch]
        is_safety = torch.tensor([bool(p.is_safety) for p in batch])
        t0 = time.perf_counter()
        roll, texts = self._rollout(prompts)
        t_gen = time.perf_counter() - t0

        t0 = time.perf_counter()
        reward = self._reward(prompts, texts, is_safety)
        if reward is None:  # skipped
            return
        t_score = time.perf_counter() - t0

        t0 = time.perf_counter()
        exp = self._experience(roll, reward["score_w"])
        stats = self._ppo_epochs(*(exp[k] for k in ("ids", "mask", "pos", "resp", "rmask", "old_lp", "old_v", "adv",
                                                   "ret")), float(self.opts["temperature"]))
        if stats is None:
            return self._skip("non-finite loss")
        t_train = time.perf_counter() - t0
        self.bad_in_row = 0
        stats.update(_rollout_gold(prompts, texts))
        self._log_ppo_iteration(roll, reward, exp, stats, {"time/generation_s": t_gen, "time/scoring_s": t_score,
                                                           "time/training_s": t_train})

    def _rollout(self, prompts: list[str]) -> tuple[Rollout, list[str]]:
        """1. One response per prompt from the policy at ``ppo.temperature`` / ``ppo.top_p`` (log-probs: π_old's)."""
        o = self.opts
        with self._rollout_engine() as engine:
            roll = engine.generate(prompts, Sampling(max_new_tokens=int(o["max_new_tokens"]),
                                                     temperature=float(o["temperature"]), top_p=float(o["top_p"]),
                                                     num_samples=1))
            return roll, engine.decode(roll)

    def _reward(self, prompts: list[str], texts: list[str], is_safety: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """2. The gated reward ``R_c`` (B,) of both reward models (sigmoid scale), its logit and the whitened score
        ``R̃_c``; None when some reward is not finite (the iteration is skipped on every rank)."""
        o = self.opts
        helpful, safety = self.scorer(prompts, texts)
        thr = float(o["safety_threshold"])
        r_c = gated(helpful, safety, is_safety, thr)  # (B,) float64, sigmoid scale
        by_safety = is_safety | (safety < thr) if not torch.isnan(safety).all() else torch.zeros_like(is_safety)
        if not self._all_ranks(bool(torch.isfinite(r_c).all())):
            return self._skip(f"{int((~torch.isfinite(r_c)).sum())} non-finite rewards")
        score = logit(r_c, float(o["logit_eps"]))
        mode = o.get("whiten_rewards", "batch")
        if mode == "batch":  # statistics of the global batch: every rank's prompts of this iteration
            score_w = whiten(score, all_reduce=self._sum_ranks)
        elif mode == "running":
            score_w = whiten(score, moments=self.reward_moments, all_reduce=self._sum_ranks)
        else:
            score_w = score
        return {"r_c": r_c, "helpful": helpful, "safety": safety, "by_safety": by_safety, "score": score,
                "score_w": score_w}

    def _experience(self, roll: Rollout, score_w: torch.Tensor) -> dict[str, torch.Tensor]:
        """3-4. π₀'s log-probs and the critic's values (no-grad forwards), the per-token rewards (KL penalty plus
        ``R̃_c`` at the end), GAE advantages (whitened) and returns, with the rollout's tensors on this device."""
        o = self.opts
        temp = float(o["temperature"])
        dev = self.device
        # the engine's tensors are inference tensors: clone them into ordinary ones for autograd
        ids, mask = (x.clone().to(dev) for x in roll.sequences())
        resp = roll.response_ids.clone().to(dev)
        rmask = roll.response_mask.clone().to(dev).float()
        old_lp = roll.logprobs.clone().to(dev).float()
        pos = mask_positions(mask)
        n, t = resp.shape
        micro = o.get("micro_batch_size") or o["mini_batch_size"]
        with torch.no_grad():
            ref_lp = torch.cat([token_logprobs(self._response_logits(self.ref_model, ids[s], mask[s], pos[s], t),
                                               resp[s], temp) for s in self._chunks(n, micro)])
            self.value_model.eval()
            old_v = torch.cat([token_values(self.value_model, ids[s], mask[s], pos[s], last=t + 1)[:, :-1]
                               for s in self._chunks(n, micro)]) * rmask
            self.value_model.train()
        kl = kl_penalty(old_lp, ref_lp, o["kl_estimator"]) * rmask  # (B, T)
        rewards = token_rewards(score_w.to(dev).float(), kl, rmask, float(o["kl_coef"]), o["kl_level"])
        adv, ret = gae(rewards, old_v, rmask, float(o["gamma"]), float(o["lam"]))
        if o.get("whiten_advantages", True) and rmask.sum() > 1:
            adv = whiten(adv, mask=rmask, all_reduce=self._sum_ranks)
        return {"ids": ids, "mask": mask, "pos": pos, "resp": resp, "rmask": rmask, "old_lp": old_lp, "old_v": old_v,
                "kl": kl, "rewards": rewards, "adv": adv, "ret": ret}

    def _log_ppo_iteration(self, roll: Rollout, reward: Mapping[str, torch.Tensor], exp: Mapping[str, torch.Tensor],
                           stats: Mapping[str, float], times: Mapping[str, float]) -> None:
        """6. The iteration's scalars (``ppo/*``, ``time/*``, ``perf/*``) to the history and the loggers."""
        kl, rmask, n = exp["kl"], exp["rmask"], exp["resp"].shape[0]
        seq_kl = (kl.sum(1)).mean()
        m = {
            "ppo/reward_raw": float(reward["r_c"].mean()), "ppo/score_logit": float(reward["score"].mean()),
            "ppo/reward_whitened": float(reward["score_w"].mean()),
            "ppo/helpfulness_score": float(reward["helpful"].mean()),
            "ppo/kl": float(seq_kl), "ppo/kl_per_token": float((kl.sum() / rmask.sum())),
            "ppo/non_score_reward": float((exp["rewards"].sum() - reward["score_w"].sum()) / n),
            "ppo/response_length": float(rmask.sum(1).mean()),
            "ppo/safety_scored_frac": float(reward["by_safety"].float().mean()),
            "ppo/explained_variance": float(explained_variance(exp["old_v"], exp["ret"], rmask)),
            "ppo/skipped_batches": float(self.skipped), "ppo/iteration": float(self.iteration),
            **times,
            "ppo/prompts": float(self._sum_ranks(torch.tensor([float(n)]))[0]),  # every rank's: the global batch
            "perf/gen_tokens": float(roll.num_tokens), "perf/samples": float(n),
            "perf/samples_per_s": n / sum(times.values()),
        }
        if not torch.isnan(reward["safety"]).all():
            m["ppo/safety_score"] = float(reward["safety"].mean())
        m.update(stats)
        self.history.append(m)
        self._log_iteration(m, prog=("ppo/reward_raw", "ppo/kl", "ppo/clip_frac"))

    def _ppo_epochs(self, ids, mask, pos, resp, rmask, old_lp, old_v, adv, ret, temp) -> dict[str, float] | None:
        """5. ``ppo.ppo_epochs`` passes over shuffled mini-batches, one AdamW step each (clipped surrogate + clipped
        value loss); the mean of the logged losses, or None on a non-finite loss."""
        o = self.opts
        opt = self.optimizers()
        n, t = resp.shape
        acc: dict[str, float] = {}
        steps = 0
        gen = torch.Generator().manual_seed(int(self.iteration) * 7919 + int(o.get("seed") or 0))
        world = self._world()
        mini = int(o["mini_batch_size"]) // world  # ppo.mini_batch_size is global: each rank's share of it
        for _ in range(int(o["ppo_epochs"])):
            order = torch.randperm(n, generator=gen).to(ids.device)
            for mb in self._chunks(n, mini):
                rows = order[mb]
                tokens = rmask[rows].sum().clamp_min(1.0)
                # the loss of the global mini-batch is the mean over all ranks' response tokens: a micro-batch
                # weighs its token share of the global mini-batch, times the world size that the gradient average
                # (FSDP / DDP) divides out again
                tokens_all = self._sum_ranks(rmask[rows].sum().reshape(1))[0].clamp_min(1.0)
                opt.zero_grad()
                parts = {"ppo/policy_loss": 0.0, "ppo/value_loss": 0.0, "ppo/clip_frac": 0.0, "ppo/approx_kl": 0.0,
                         "ppo/entropy": 0.0}
                for s in self._chunks(len(rows), o.get("micro_batch_size") or len(rows)):
                    r = rows[s]
                    w = rmask[r].sum() * world / tokens_all
                    w_log = float(rmask[r].sum() / tokens)  # this rank's statistics: its own token mean
                    logits = self._response_logits(self.model, ids[r], mask[r], pos[r], t)
                    lp = token_logprobs(logits, resp[r], temp)
                    pg, cf, akl = ppo_policy_loss(lp, old_lp[r], adv[r], rmask[r], float(o["clip"]))
                    ent = masked_entropy(logits.detach(), rmask[r], temp)
                    v = token_values(self.value_model, ids[r], mask[r], pos[r], last=t + 1)[:, :-1]
                    vl = value_loss(v, old_v[r], ret[r], rmask[r], float(o["value_clip"]))
                    loss = (pg + float(o["vf_coef"]) * vl) * w
                    if not self._all_ranks(bool(torch.isfinite(loss))):
                        opt.zero_grad()
                        return None
                    self.manual_backward(loss)
                    for k, x in (("ppo/policy_loss", pg), ("ppo/value_loss", vl), ("ppo/clip_frac", cf),
                                 ("ppo/approx_kl", akl), ("ppo/entropy", ent)):
                        parts[k] += float(x.detach()) * w_log
                clip = float(o["grad_clip"])
                if clip > 0:  # sharded: DTensor gradients, whose norm clip_grad_norm_ reduces over the ranks
                    norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
                    parts["ppo/grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
                    torch.nn.utils.clip_grad_norm_(self.value_model.parameters(), clip)
                opt.step()
                steps += 1
                for k, x in parts.items():
                    acc[k] = acc.get(k, 0.0) + x
        out = {k: x / max(1, steps) for k, x in acc.items()}
        out["ppo/optimizer_steps"] = float(steps)
        return out

    def _skip(self, why: str) -> None:
        self.skipped += 1
        self.bad_in_row += 1
        limit = int(self.opts.get("max_bad_batches", 3))
        log.warning("ppo iteration %d skipped: %s (%d skipped in all, %d in a row)", self.iteration, why,
                    self.skipped, self.bad_in_row)
        self._log_iteration({"ppo/skipped_batches": float(self.skipped)}, prog=())
        if self.bad_in_row >= limit:
            raise UserError(f"ppo: {self.bad_in_row} iterations in a row were skipped ({why}); stopping "
                            f"(ppo.max_bad_batches={limit}). Check the reward models and the learning rate.")

    def _log_iteration(self, m: Mapping[str, float], prog: Sequence[str]) -> None:
        """Every iteration reaches the loggers (x axis: iteration) and the callback metrics (-> metrics.json)."""
        for k, v in m.items():
            self.log(k, v, on_step=True, on_epoch=False, prog_bar=k in prog, logger=False, batch_size=1)
        if self.trainer is not None and self.trainer.is_global_zero:
            for lg in self.loggers:
                lg.log_metrics(dict(m), step=self.iteration)

    # -- held-out evaluation ----------------------------------------------------------------------------
    def validation_step(self, batch: Sequence[Any], batch_idx: int) -> None:
        """Held-out answers at ``ppo.eval.temperature`` (the policy PPO optimises samples at ``ppo.temperature``;
        seeded, so every evaluation draws the same uniforms) and, with ``ppo.eval.greedy``, greedy answers too
        (``val/*_greedy``)."""
        o = self.opts
        ev = o.get("eval") or {}
        modes = [("", float(ev.get("temperature", o["temperature"])))]
        if ev.get("greedy", True) and modes[0][1] > 0:
            modes.append(("_greedy", 0.0))
        for suffix, temperature in modes:
            self._evaluate_batch(batch, batch_idx, suffix, temperature, int(ev.get("max_new_tokens",
                                                                                    o["max_new_tokens"])))

    def _evaluate_batch(self, batch, batch_idx: int, suffix: str, temperature: float, max_new_tokens: int) -> None:
        prompts = [p.text for p in batch]
        with self._rollout_engine() as engine:
            roll = engine.generate(prompts, Sampling(max_new_tokens=max_new_tokens, temperature=temperature,
                                                     seed=int(self.opts.get("seed") or 0) + batch_idx))
            texts = engine.decode(roll)
        is_safety = torch.tensor([bool(p.is_safety) for p in batch])
        helpful, safety = self.scorer(prompts, texts)
        r_c = gated(helpful, safety, is_safety, float(self.opts["safety_threshold"]))
        v = self._val.setdefault(suffix, {})
        v.setdefault("reward", []).extend(r_c.tolist())
        v.setdefault("helpfulness_score", []).extend(helpful.tolist())
        v.setdefault("response_length", []).extend(roll.response_mask.sum(1).tolist())
        if not torch.isnan(safety).all():
            v.setdefault("safety_score_on_safety_prompts", []).extend(safety[is_safety].tolist())
        try:
            gh = [world.gold_helpfulness(p, r) for p, r in zip(prompts, texts)]
            gs = [world.gold_safety(p, r) for p, r, s in zip(prompts, texts, is_safety.tolist()) if s]
        except ValueError:  # not world prompts: no oracle
            return
        v.setdefault("gold_helpfulness", []).extend(gh)
        v.setdefault("gold_safety", []).extend(gs)

    def on_validation_epoch_end(self) -> None:
        vals, self._val = self._val, {}
        if not vals:
            return
        m = {f"val/{k}{suffix}": sum(xs) / len(xs) for suffix, v in vals.items() for k, xs in v.items() if xs}
        if m["val/reward"] > self.best_val_reward and not self.trainer.sanity_checking:
            self.best_val_reward, self.best_iteration = m["val/reward"], self.iteration
        m["val/reward_best"] = max(self.best_val_reward, m["val/reward"])
        m["val/best_iteration"] = float(self.best_iteration)
        for k, x in m.items():
            self.log(k, x, on_step=False, on_epoch=True, logger=False, prog_bar=k == "val/reward")
        if self.trainer.is_global_zero:
            for lg in self.loggers:
                lg.log_metrics(m, step=self.iteration)
        log.info("held-out evaluation after %d iterations: %s", self.iteration,
                 ", ".join(f"{k}={x:.4f}" for k, x in m.items()))

    # -- state ------------------------------------------------------------------------------------------
    # (the optimizer, early stopping's counters and the global RNG the rollouts draw their seeds from are saved by
    # Lightning and callbacks.resume.ResumeState; the prompt position by the resumable prompt loader)
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ppo_state"] = {"iteration": self.iteration, "skipped": self.skipped, "bad_in_row": self.bad_in_row,
                                   "reward_moments": self.reward_moments.state_dict(),
                                   "best_val_reward": self.best_val_reward, "best_iteration": self.best_iteration,
                                   "history": [dict(h) for h in self.history]}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        s = checkpoint.get("ppo_state") or {}
        self.iteration, self.skipped = int(s.get("iteration", 0)), int(s.get("skipped", 0))
        self.bad_in_row = int(s.get("bad_in_row", 0))
        self.reward_moments.load_state_dict(s.get("reward_moments", RunningMoments().state_dict()))
        self.best_val_reward = float(s.get("best_val_reward", -math.inf))
        self.best_iteration = int(s.get("best_iteration", 0))
        self.history = [dict(h) for h in s.get("history", [])]

    def export(self, path: str | Path) -> Path:
        """The policy and tokenizer to ``path`` (``from_pretrained``-ready, the next stage's ``model.path``); the
        value model to ``<path>/../value``; weights stored in ``model.dtype``; every iteration's logged scalars to
        ``<path>/../ppo_history.jsonl`` (the over-optimisation probe reads proxy and gold reward against KL there)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / "ppo_history.jsonl", "w") as f:
            f.writelines(json.dumps(h) + "\n" for h in self.history)
        dtype = model_dtype(self.hparams.model_cfg, trainable=False)  # exports in model.dtype
        save_pretrained_as(self.model, path, dtype)
        self.tokenizer.save_pretrained(path)
        save_pretrained_as(self.value_model, path.parent / "value", dtype)
        self.tokenizer.save_pretrained(path.parent / "value")
        return path
