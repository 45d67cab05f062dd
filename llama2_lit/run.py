"""run(cfg): instantiate the DataModule, the stage's LightningModule and the Trainer; fit; write outputs.

Outputs in ``cfg.paths.output_dir``: ``metrics.json`` (flat final scalars, reproducible for a seed),
``perf.json`` (timings, which are not), ``hf/`` (model + tokenizer, ``from_pretrained``-ready),
``checkpoints/`` and ``tensorboard/`` (Lightning), ``.hydra/`` (Hydra).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.strategies import ModelParallelStrategy
from omegaconf import DictConfig, OmegaConf

from callbacks.resume import EpochEndResume

log = logging.getLogger(__name__)


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                continue
            v = v.item()
        if isinstance(v, (int, float)) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


def _validate(trainer, module, datamodule) -> dict[str, float]:
    """Validate; the ``val/*`` scalars (returned results, plus what a module logged outside the loggers)."""
    out = {}
    for result in trainer.validate(module, datamodule=datamodule, verbose=False):
        out.update(_scalars(result))
    out.update({k: v for k, v in _scalars(dict(trainer.callback_metrics)).items() if k.startswith("val/")})
    return out


def build(cfg: DictConfig):
    """The (datamodule, module, trainer) triple a config describes; nothing is run.

    Under a sharding strategy (``trainer=fsdp``) a random-init model is built on the meta device with the
    seeded init (``model.init=seeded``), so that each rank allocates and fills only its shard.
    """
    datamodule = instantiate(cfg.data)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    if not loggers:  # logger=none: a learning-rate monitor has nowhere to write
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    callbacks.append(EpochEndResume())  # ckpt_path= at an epoch's end: the next epoch's data, not the one after
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.setdefault("init_seed", cfg.seed)
    if isinstance(trainer.strategy, ModelParallelStrategy) and not model_cfg.get("path"):
        model_cfg.update(init_device="meta", init="seeded")
    # _convert_=all: plain dicts/lists in the module's hyperparameters, so that checkpoints load under torch.load's
    # weights_only default (OmegaConf containers are not allowed globals: ckpt_path= resumes failed on them)
    module = instantiate(cfg.stage.module, model_cfg=model_cfg, tokenizer=datamodule.tokenizer, _recursive_=False,
                         _convert_="all")
    return datamodule, module, trainer


def run(cfg: DictConfig) -> dict[str, float]:
    """Train the configured stage; return the metrics written to ``metrics.json``."""
    if cfg.get("plan"):
        from llama2_lit.plan import plan_from_cfg

        plan, need, text = plan_from_cfg(cfg)
        print(text)
        return {"plan/peak_gib": plan.peak / 2**30, "plan/gpus_needed": float(need or 0), "plan/fits": float(plan.fits)}
    if cfg.stage.get("runner"):  # a stage that is not gradient training (e.g. rejection sampling)
        from hydra.utils import get_method

        return get_method(cfg.stage.runner)(cfg)
    from llama2_lit.models.sharding import check_stage_shards

    check_stage_shards(cfg)  # trainer=fsdp with a stage that cannot shard: stop before any work
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.stage.get("prepare"):  # e.g. stage=ppo: train the SFT policy / reward models it needs when none is given
        from hydra.utils import get_method

        get_method(cfg.stage.prepare)(cfg)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "highest"))
    datamodule, module, trainer = build(cfg)
    initial: dict[str, float] = {}
    if cfg.get("initial_validation") and not cfg.get("ckpt_path") and trainer.limit_val_batches:
        initial = {f"{k}_init": v for k, v in _validate(trainer, module, datamodule).items()}
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = _scalars(dict(trainer.callback_metrics))
    metrics.update(initial)
    if cfg.get("final_validation", True) and trainer.limit_val_batches:
        # the trained model's validation metrics (fit validates per epoch, not after a max_steps stop)
        metrics.update(_validate(trainer, module, datamodule))
    metrics.update(_scalars(getattr(datamodule, "stats", {}) or {}))
    for cb in trainer.callbacks:
        metrics.update(_scalars(getattr(cb, "final_metrics", {}) or {}))
    metrics["trainer/steps"] = float(trainer.global_step)
    perf = {k: v for k, v in metrics.items() if k.startswith("perf/")}
    metrics = {k: metrics[k] for k in sorted(metrics) if not k.startswith("perf/") and not k.endswith("_step")}
    if isinstance(trainer.strategy, ModelParallelStrategy):  # every rank joins the gather; rank 0 exports
        from llama2_lit.models.sharding import gather_full_

        gather_full_(module, keep=trainer.is_global_zero)
    if trainer.is_global_zero:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (out / "perf.json").write_text(json.dumps(perf, indent=2, sort_keys=True) + "\n")
        if hasattr(module, "export"):
            module.export(out / "hf")
        else:
            module.model.save_pretrained(out / "hf")
            module.tokenizer.save_pretrained(out / "hf")
        log.info("metrics: %s", json.dumps(metrics))
        log.info("perf: %s", json.dumps(perf))
        log.info("outputs in %s", out)
    return metrics
