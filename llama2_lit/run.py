"""run(cfg): instantiate the DataModule, the stage's LightningModule and the Trainer; fit; write outputs.

Outputs in ``cfg.paths.output_dir``: ``metrics.json`` (flat final scalars, reproducible for a seed),
``perf.json`` (timings, ``perf/*`` and ``time/*``, which are not), ``hf/`` (model + tokenizer,
``from_pretrained``-ready),
``checkpoints/`` and ``tensorboard/`` (Lightning), ``.hydra/`` (Hydra).
"""
from __future__ import annotations

import copy
import json
import logging
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from callbacks.checkpoint import AtomicCheckpointIO, SafeCheckpoint, resolve_ckpt_path
from callbacks.preemption import PREEMPTED_EXIT_CODE, Preemption
from callbacks.resume import CarriedMetrics, EpochEndResume, ResumeState
from llama2_lit.core.batching import BatchSplit, PPOSplit, plan_sizes, stage_kind
from llama2_lit.errors import Preempted, UserError

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


def checkpoint_dir(cfg: DictConfig, out: Path) -> Path:
    """Where this run's checkpoints go: the ``save_last`` checkpoint callback's folder, else ``<run>/checkpoints``."""
    for c in (cfg.get("callbacks") or {}).values():
        if c is not None and c.get("save_last") and c.get("dirpath"):
            return Path(str(c.dirpath))
    return out / "checkpoints"


@contextmanager
def _preemptible(trainer):
    """Lightning's stop on SIGTERM/SIGUSR1 (a ``SystemExit``) becomes :class:`Preempted`, naming the checkpoint."""
    try:
        yield
    except SIGTERMException:
        pre = next((c for c in trainer.callbacks if isinstance(c, Preemption)), None)
        signame = (pre.received if pre else None) or "SIGTERM"
        ckpt = pre.checkpoint if pre else None
        where = f"checkpoint {ckpt} (step {trainer.global_step})" if ckpt else "no new checkpoint"
        raise Preempted(f"{signame}: stopped with {where}; rerun the same command with ckpt_path=last "
                        f"(in the same run directory: hydra.run.dir={trainer.default_root_dir}) to resume",
                        exit_code=PREEMPTED_EXIT_CODE) from None


# precisions that cast the module's own parameters to 16 bits: AdamW steps would then round away (MASTER_DTYPE)
_HALF_WEIGHTS = ("bf16-true", "16-true")


def _trainer_cfg(cfg: DictConfig) -> tuple[DictConfig, int | None]:
    """``cfg.trainer`` without ``micro_batch_size`` (ours, not a Trainer argument), and that value.

    ``trainer.precision`` values that keep 16-bit weights are refused: trainable weights stay float32 and bf16 is a
    compute dtype (``bf16-mixed``; ``trainer=fsdp``: ``trainer.strategy.mixed_precision``)."""
    precision = str(cfg.trainer.get("precision", "32-true"))
    if precision in _HALF_WEIGHTS:
        raise UserError(f"trainer.precision={precision} would train 16-bit weights, on which AdamW steps at the "
                        "paper's learning rates mostly round to zero: use trainer.precision=bf16-mixed (float32 master "
                        "weights, bf16 compute); model.dtype sets the dtype of frozen copies and exports")
    tcfg = copy.deepcopy(cfg)
    with open_dict(tcfg):
        micro = tcfg.trainer.pop("micro_batch_size", None)
    return tcfg.trainer, (int(micro) if micro else None)


def configure_batches(cfg, datamodule, trainer, micro: int | None = None) -> BatchSplit | PPOSplit:
    """Set the DataModule's per-rank batch size and the trainer's gradient accumulation from the global sizes of
    ``cfg`` and the trainer's world size; log them once (rank 0)."""
    stage = OmegaConf.to_container(cfg.stage, resolve=True)
    ppo = OmegaConf.to_container(cfg.ppo, resolve=True) if cfg.get("ppo") is not None else None
    world = int(trainer.world_size)
    accumulate = int(trainer.accumulate_grad_batches)
    s = plan_sizes(stage, ppo, world, micro=micro, accumulate=None if accumulate == 1 else accumulate)
    if isinstance(s, PPOSplit):
        datamodule.batch_size = s.per_rank
        text = s.describe()
    else:
        datamodule.batch_size = s.micro
        trainer.accumulate_grad_batches = s.accumulate
        unit = "pairs" if stage_kind(str(stage["module"]["_target_"])) == "pairs" else "sequences"
        text = s.describe(unit)
    if trainer.is_global_zero:
        log.info("batch sizes: %s", text)
    return s


def build(cfg: DictConfig):
    """The (datamodule, module, trainer) triple a config describes; nothing is run.

    Under a sharding strategy (``trainer=fsdp``) models are built on the meta device, so that each rank
    allocates and fills only its shard: by the seeded init (``model.init=seeded``) when random, or by reading
    its slices of ``model.path``'s safetensors files.
    """
    datamodule = instantiate(cfg.data)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    if not loggers:  # logger=none: a learning-rate monitor has nowhere to write
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    callbacks.append(EpochEndResume())  # ckpt_path= at an epoch's end: the next epoch's data, not the one after
    callbacks.append(ResumeState())  # mid-epoch data position and the global RNG streams (PPO samples from them)
    callbacks.append(CarriedMetrics())  # val/*_init measured before fit, kept in checkpoints for resumed runs
    if any(isinstance(c, SafeCheckpoint) and c.save_last for c in callbacks):
        callbacks.append(Preemption())  # SIGTERM / SIGUSR1: checkpoint at the next step boundary, exit 75
    trainer_cfg, micro = _trainer_cfg(cfg)
    trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False)
    configure_batches(cfg, datamodule, trainer, micro=micro)  # global sizes -> per-rank micro-batch, accumulation
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # writes: temporary file, fsync, os.replace
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.setdefault("init_seed", cfg.seed)
    if isinstance(trainer.strategy, ModelParallelStrategy):  # built on meta; each rank fills its shard only
        model_cfg.update(init_device="meta")
        if not model_cfg.get("path"):
            model_cfg.update(init="seeded")
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
    # ckpt_path=last -> <run dir>/checkpoints/last.ckpt; a damaged checkpoint -> the newest older one that loads
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), checkpoint_dir(cfg, out))
    if cfg.stage.get("prepare"):  # e.g. stage=ppo: train the SFT policy / reward models it needs when none is given
        from hydra.utils import get_method

        get_method(cfg.stage.prepare)(cfg)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "highest"))
    datamodule, module, trainer = build(cfg)
    carried = next(c for c in trainer.callbacks if isinstance(c, CarriedMetrics))
    with _preemptible(trainer):
        if cfg.get("initial_validation") and not ckpt_path and trainer.limit_val_batches:
            carried.metrics = {f"{k}_init": v for k, v in _validate(trainer, module, datamodule).items()}
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics = _scalars(dict(trainer.callback_metrics))
        metrics.update(carried.metrics)  # val/*_init: measured before fit, or restored from the checkpoint
        if cfg.get("final_validation", True) and trainer.limit_val_batches:
            # the trained model's validation metrics (fit validates per epoch, not after a max_steps stop)
            metrics.update(_validate(trainer, module, datamodule))
    metrics.update(_scalars(getattr(datamodule, "stats", {}) or {}))
    for cb in trainer.callbacks:
        metrics.update(_scalars(getattr(cb, "final_metrics", {}) or {}))
    metrics["trainer/steps"] = float(trainer.global_step)
    timing = ("perf/", "time/")  # wall-clock figures (PPO's time/*_s too) vary run to run: perf.json
    perf = {k: v for k, v in metrics.items() if k.startswith(timing)}
    metrics = {k: metrics[k] for k in sorted(metrics) if not k.startswith(timing) and not k.endswith("_step")}
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
