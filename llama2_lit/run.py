"""The entry's run: the :data:`STAGES` table (every stage name and what runs it), the checks made before anything
loads, and fitting a stage's LightningModule.

``run(cfg)``: validate the options (``llama2_lit.options``), look the stage up in :data:`STAGES`, then either hand
the config to the stage's runner (rs, collect, pipeline: work that is not one fit) or build the DataModule, the
stage's LightningModule and the Trainer, fit, and write the outputs. A stage's ``prepare`` step (e.g. stage=ppo's
bootstrap, ``llama2_lit.stages.bootstrap``) first trains what the stage lacks.

Outputs in ``cfg.paths.output_dir``: ``metrics.json`` (flat final scalars, reproducible for a seed),
``perf.json`` (timings, ``perf/*`` and ``time/*``, which are not), ``hf/`` (model + tokenizer,
``from_pretrained``-ready),
``checkpoints/`` and ``tensorboard/`` (Lightning), ``.hydra/`` (Hydra).

Entry layer: imports every layer below it (stages, modules, callbacks, models, core).
"""
from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
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
from llama2_lit.models.sharding import gather_full_
from llama2_lit.modules.dpo import DPOModule
from llama2_lit.modules.ppo import PPOModule
from llama2_lit.modules.reward import RewardModule
from llama2_lit.modules.sft import RSDistillModule, SFTModule
from llama2_lit.options import validate
from llama2_lit.plan import plan_from_cfg
from llama2_lit.stages import bootstrap, collect, context_distill, gatt, pipeline, rs
from llama2_lit.stages.loggers import instantiate_loggers


@dataclass(frozen=True)
class Stage:
    """What runs a stage: a fit of ``module`` (a LightningModule; ``cfg.stage.module`` holds its options and names it
    for Hydra's instantiate), or ``runner(cfg)`` (returns the metrics), after ``prepare(cfg)`` when given (it trains
    what the stage lacks and fills the config in)."""
    module: type[L.LightningModule] | None = None
    runner: Callable[[DictConfig], dict[str, float]] | None = None
    prepare: Callable[[DictConfig], Any] | None = None


# every stage (conf/stage/<name>.yaml): where `python -m llama2_lit stage=<name>` goes
STAGES: dict[str, Stage] = {
    "pretrain": Stage(module=SFTModule),
    "sft": Stage(module=SFTModule),
    "rm": Stage(module=RewardModule),
    "rs": Stage(runner=rs.run, prepare=bootstrap.prepare_rs),
    "rs_distill": Stage(module=RSDistillModule, prepare=bootstrap.prepare_rs_distill),
    "ppo": Stage(module=PPOModule, prepare=bootstrap.prepare_ppo),
    "dpo": Stage(module=DPOModule, prepare=bootstrap.prepare_dpo),
    "collect": Stage(runner=collect.run, prepare=bootstrap.prepare_collect),
    "gatt": Stage(module=SFTModule, prepare=gatt.prepare),
    "context_distill": Stage(module=SFTModule, prepare=context_distill.prepare),
    "pipeline": Stage(runner=pipeline.run),
}

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
    loggers = instantiate_loggers(cfg)  # a logger whose package is missing: one line naming it and the pip command
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


def stage_of(cfg: DictConfig) -> Stage:
    """The :data:`STAGES` entry of ``cfg.stage.name``."""
    name = str(cfg.stage.name)
    if name not in STAGES:
        raise UserError(f"stage.name: unknown '{name}' (choose {', '.join(STAGES)}: llama2_lit.run.STAGES)")
    return STAGES[name]


def check_stage_shards(cfg: DictConfig, module: type) -> None:
    """Stop before any work when the trainer shards (``trainer=fsdp``) but the stage's module cannot."""
    strategy = cfg.trainer.get("strategy")
    target = str(strategy.get("_target_", "")) if isinstance(strategy, Mapping) else str(strategy or "")
    if not target.endswith(("FSDP2Strategy", "ModelParallelStrategy")):
        return
    if module.configure_model is L.LightningModule.configure_model:
        raise UserError(f"trainer=fsdp: stage={cfg.stage.name} ({module.__name__}) does not shard its models yet (no "
                        "configure_model): train this stage with trainer=gpu or trainer=cpu")
    check_plan_fits(cfg)


def check_plan_fits(cfg: DictConfig) -> None:
    """Refuse a sharded GPU run that the memory planner says will not fit (``planner.force=true`` overrides).

    CPU runs (the 2-process gloo test) and models without ``config`` dimensions are not planned."""
    if str(cfg.trainer.get("accelerator", "auto")) not in ("gpu", "cuda"):
        return
    pc = cfg.get("planner") or {}
    if pc.get("force", False) or not cfg.model.get("config"):
        return
    plan, need, text = plan_from_cfg(cfg)
    if plan.fits:
        return
    advice = f"{need} GPUs is the smallest count that fits" if need else "no GPU count up to 4096 fits"
    raise UserError(f"the memory plan says this run does not fit: peak {plan.peak / 2**30:.2f} GiB per GPU on "
                    f"{plan.gpus} GPUs of {plan.gpu_memory_gib:.0f} GiB ({advice}). Raise trainer.num_nodes / "
                    f"trainer.devices, turn on model.gradient_checkpointing or planner.offload, lower the micro-batch, "
                    f"or set planner.force=true to launch anyway.\n{text}")


def export_hf(module, out: Path) -> None:
    """The trained model as a ``from_pretrained``-ready folder: ``module.export`` when the module has one."""
    if hasattr(module, "export"):
        module.export(out)
    else:
        module.model.save_pretrained(out)
        module.tokenizer.save_pretrained(out)


def run(cfg: DictConfig) -> dict[str, float]:
    """Run the configured stage (see :data:`STAGES`); return the metrics written to ``metrics.json``."""
    stage = stage_of(cfg)
    validate(cfg, stage.module)  # an unknown or mistyped option stops here, before anything loads
    if cfg.get("plan"):
        plan, need, text = plan_from_cfg(cfg)
        print(text)
        return {"plan/peak_gib": plan.peak / 2**30, "plan/gpus_needed": float(need or 0), "plan/fits": float(plan.fits)}
    if stage.runner is not None:  # a stage that is not one gradient fit (e.g. rejection sampling)
        if stage.prepare is not None:
            stage.prepare(cfg)
        return stage.runner(cfg)
    return fit(cfg, stage)


def fit(cfg: DictConfig, stage: Stage) -> dict[str, float]:
    """Fit the stage's LightningModule; write ``metrics.json``, ``perf.json`` and ``hf/``."""
    check_stage_shards(cfg, stage.module)  # trainer=fsdp with a stage that cannot shard: stop before any work
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # ckpt_path=last -> <run dir>/checkpoints/last.ckpt; a damaged checkpoint -> the newest older one that loads
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), checkpoint_dir(cfg, out))
    if stage.prepare is not None:  # e.g. stage=ppo: train the SFT policy / reward models it needs when none is given
        stage.prepare(cfg)
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
    metrics.update(_scalars(getattr(module, "final_metrics", {}) or {}))  # e.g. stage=dpo's held-out KL
    metrics["trainer/steps"] = float(trainer.global_step)
    timing = ("perf/", "time/")  # wall-clock figures (PPO's time/*_s too) vary run to run: perf.json
    perf = {k: v for k, v in metrics.items() if k.startswith(timing)}
    metrics = {k: metrics[k] for k in sorted(metrics) if not k.startswith(timing) and not k.endswith("_step")}
    if isinstance(trainer.strategy, ModelParallelStrategy):  # every rank joins the gather; rank 0 exports
        gather_full_(module, keep=trainer.is_global_zero)
    if trainer.is_global_zero:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (out / "perf.json").write_text(json.dumps(perf, indent=2, sort_keys=True) + "\n")
        export_hf(module, out / "hf")
        log.info("metrics: %s", json.dumps(metrics))
        log.info("perf: %s", json.dumps(perf))
        log.info("outputs in %s", out)
    return metrics
