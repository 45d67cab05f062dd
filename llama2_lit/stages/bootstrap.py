"""Training the prerequisites a stage lacks when the user gives none (``bootstrap.*``; stage=ppo: ``ppo.bootstrap.*``).

``python -m llama2_lit stage=<name>`` on the embedded default has no SFT policy, no reward models and no rejection
sampling selection. Rather than run a stage from a random model, the ``prepare_*`` functions (the ``prepare`` step of
``llama2_lit.run.STAGES``) run the earlier stages of the recipe first, each as its own ``python -m llama2_lit`` run
(its own Hydra run dir, log and ``metrics.json``) under ``bootstrap.dir``:

1. ``stage=sft`` (when ``model.path`` is null): the policy and π₀;
2. ``stage=rm data=synthetic_pairs reward=helpfulness|safety model.path=<policy>`` (when a reward model is null):
   pairs sampled from that policy, labelled by the world's simulated annotator;
3. ``stage=rs model.path=<policy> rs.reward_models...=<the RMs>`` (stage=rs_distill without ``data.path``): the
   selection to fine-tune on, with its own sample bag.

What each stage lacks: ppo the policy and both RMs (``ppo.scorer=rm``); rs the policy and, with ``rs.scorer=rm``
and no helpfulness RM, the RMs; collect the policy; rs_distill a selection (and the policy that samples it). stage=rm
needs nothing (its default data, synthetic pairs, samples from ``model.path`` or perturbs world answers).

A finished run is reused by later runs with the same model, seed and settings (the directory name carries a hash
of them); every step is said in the log, and ``<run>/bootstrap.json`` lists what was made. Only the synthetic world
has an annotator, so on other data the paths must be given. With ``bootstrap.enabled=false`` a stage runs on what
it is given (rs and collect then sample from a random-init policy); stage=ppo stops, naming what is missing.

Stages layer: imports errors and scoring (``folder_fingerprint``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from llama2_lit.errors import UserError
from llama2_lit.scoring import folder_fingerprint

log = logging.getLogger(__name__)
REWARDS = ("helpfulness", "safety")
_ROOT = Path(__file__).resolve().parents[2]


def world_fingerprint() -> str:
    """A hash of the world's sources and of ``conf/data/synthetic.yaml``: part of the bootstrap policy's folder name,
    so that a policy trained on other world data (an older version of the project) is not reused."""
    files = sorted((_ROOT / "llama2_lit" / "world").glob("*.py")) + [_ROOT / "conf" / "data" / "synthetic.yaml"]
    h = hashlib.sha1()
    for f in files:
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:10]


def _key(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _finished(run_dir: Path, product: str = "hf/config.json") -> bool:
    return (run_dir / "metrics.json").is_file() and (run_dir / product).is_file()


def run_stage(run_dir: Path, overrides: list[str], what: str, product: str = "hf/config.json") -> Path:
    """``python -m llama2_lit <overrides>`` into ``run_dir`` unless a finished run (``metrics.json`` and ``product``)
    is there; returns ``run_dir/hf`` (``run_dir`` when ``product`` is not under ``hf/``)."""
    out = run_dir / "hf" if product.startswith("hf/") else run_dir
    if _finished(run_dir, product):
        log.info("bootstrap: reusing the %s in %s", what, run_dir)
        return out
    cmd = [sys.executable, "-m", "llama2_lit", *overrides, f"hydra.run.dir={run_dir}"]
    log.warning("bootstrap: no %s given, training one first: %s", what, " ".join(cmd[2:]))
    rc = subprocess.run(cmd, check=False).returncode
    if rc != 0 or not _finished(run_dir, product):
        raise UserError(f"bootstrap: training the {what} failed (exit code {rc}); its log is {run_dir}/__main__.log")
    return out


class _Bootstrap:
    """The runs of one bootstrap: settings ``boot`` (``enabled``, ``dir``, ``<kind>_overrides``), for ``stage``."""

    def __init__(self, cfg: DictConfig, boot: Any, stage: str, missing: list[str], world_data: bool = True):
        if not boot.get("enabled", False):
            prefix = "ppo." if stage == "ppo" else ""
            raise UserError(f"stage={stage} needs {', '.join(missing)} (or {prefix}bootstrap.enabled=true to train "
                            f"them first)")
        if world_data and str(cfg.data.get("path")) != "synthetic":
            raise UserError(f"stage={stage} needs {', '.join(missing)}: they can be trained on the fly on the synthetic "
                            f"world only (it has a gold annotator), and data.path is '{cfg.data.get('path')}'")
        if any(c in str(cfg.model.name) for c in "/\\") or str(cfg.model.name).startswith("."):
            raise UserError(f"model.name: '{cfg.model.name}' must be a plain name (it names the bootstrap folders)")
        self.cfg, self.boot, self.root = cfg, boot, Path(str(boot.dir))
        self.common = [f"model={cfg.model.name}", f"seed={cfg.seed}", f"paths.output_root={cfg.paths.output_root}",
                       f"paths.cache_dir={cfg.paths.cache_dir}",
                       f"trainer.enable_progress_bar={str(bool(cfg.trainer.get('enable_progress_bar', True))).lower()}"]
        self.made: dict[str, str] = {}

    def _extra(self, kind: str) -> list[str]:
        return list(self.boot.get(f"{kind}_overrides") or [])

    def policy(self) -> str:
        """``model.path``, or an SFT run trained for it (then set as ``model.path``)."""
        cfg = self.cfg
        if not cfg.model.get("path"):
            extra = self._extra("sft")
            run_dir = self.root / f"sft_{cfg.model.name}_seed{cfg.seed}_{_key(extra, world_fingerprint())}"
            with open_dict(cfg):
                cfg.model.path = str(run_stage(run_dir, ["stage=sft", *self.common, *extra], "SFT policy (model.path)"))
            self.made["policy"] = cfg.model.path
        return str(cfg.model.path)

    def reward_model(self, reward: str, policy: str) -> str:
        """A stage=rm run (``reward``) from ``policy`` on pairs sampled from it."""
        cfg, extra = self.cfg, self._extra("rm")
        run_dir = self.root / f"rm_{reward}_{cfg.model.name}_seed{cfg.seed}_{_key(folder_fingerprint(policy), extra)}"
        over = ["stage=rm", "data=synthetic_pairs", f"reward={reward}", *self.common, f"model.path={policy}", *extra]
        self.made[reward] = str(run_stage(run_dir, over, f"{reward} reward model"))
        return self.made[reward]

    def selection(self, policy: str, rms: dict[str, str]) -> str:
        """A stage=rs run from ``policy`` scored by ``rms``, with a sample bag of its own; returns its directory."""
        cfg, extra = self.cfg, self._extra("rs")
        fps = [folder_fingerprint(p) for p in (policy, rms["helpfulness"], rms["safety"])]
        run_dir = self.root / f"rs_{cfg.model.name}_seed{cfg.seed}_{_key(fps, extra)}"
        over = ["stage=rs", "data=rs_prompts", *self.common, f"model.path={policy}",
                *[f"rs.reward_models.{r}={p}" for r, p in rms.items()], f"rs.bag_dir={run_dir / 'bag'}", *extra]
        self.made["rs"] = str(run_stage(run_dir, over, "rejection sampling selection (data.path)", "selected.parquet"))
        return self.made["rs"]

    def done(self) -> None:
        """Write ``<run>/bootstrap.json`` (what was made) and say where the stage starts from."""
        out = Path(str(self.cfg.paths.output_dir))
        out.mkdir(parents=True, exist_ok=True)
        (out / "bootstrap.json").write_text(json.dumps(self.made, indent=2) + "\n")
        log.info("bootstrap: the stage starts from %s",
                 json.dumps(OmegaConf.to_container(self.cfg.model, resolve=False).get("path")))


def _missing_rms(o: Any, group: str) -> list[str]:
    return [f"{group}.reward_models.{r}" for r in REWARDS if o.scorer == "rm" and not o.reward_models.get(r)]


def _fill(cfg: DictConfig, stage: str, boot: Any, group: Any, missing_rms: list[str]) -> DictConfig:
    """Train the policy (``model.path`` null) and the reward models named in ``missing_rms``; fill them in."""
    missing = (["model.path"] if not cfg.model.get("path") else []) + missing_rms
    if not missing:
        return cfg
    b = _Bootstrap(cfg, boot, stage, missing)
    policy = b.policy()
    for name in missing_rms:
        reward = name.rsplit(".", 1)[1]
        path = b.reward_model(reward, policy)
        with open_dict(cfg):
            group.reward_models[reward] = path
    b.done()
    return cfg


def prepare_ppo(cfg: DictConfig) -> DictConfig:
    """stage=ppo: fill ``model.path`` and ``ppo.reward_models.{helpfulness,safety}`` by training them when null."""
    return _fill(cfg, "ppo", cfg.ppo.get("bootstrap") or {}, cfg.ppo, _missing_rms(cfg.ppo, "ppo"))


def prepare_rs(cfg: DictConfig) -> DictConfig:
    """stage=rs: fill ``model.path``, and with ``rs.scorer=rm`` and no helpfulness RM both reward models (a safety
    RM alone is not filled: a helpfulness RM without one scores R_c = helpfulness, as documented)."""
    if not cfg.bootstrap.get("enabled"):
        return cfg  # disabled: the runner takes what it is given (and names a missing reward model itself)
    rms = [] if cfg.rs.reward_models.get("helpfulness") else _missing_rms(cfg.rs, "rs")
    return _fill(cfg, "rs", cfg.bootstrap, cfg.rs, rms)


def prepare_collect(cfg: DictConfig) -> DictConfig:
    """stage=collect: fill ``model.path`` (the policy both default sources sample from)."""
    if not cfg.bootstrap.get("enabled"):
        return cfg  # disabled: sample from what is given (a random-init policy when model.path is null)
    return _fill(cfg, "collect", cfg.bootstrap, cfg.collect, [])


def prepare_dpo(cfg: DictConfig) -> DictConfig:
    """stage=dpo: fill ``model.path`` (the SFT policy DPO starts from, and whose samples ``data=synthetic_pairs``
    labels into pairs) by training it when null."""
    if cfg.model.get("path") or str(cfg.data.get("path")) != "synthetic":
        return cfg  # a given policy, or pairs from files (a random-init policy is refused by the module's data check)
    return _fill(cfg, "dpo", cfg.bootstrap, None, [])


def prepare_rs_distill(cfg: DictConfig) -> DictConfig:
    """stage=rs_distill with ``data=rs_bag`` and no ``data.path``: a stage=rs run (policy, both RMs, the selection),
    whose directory becomes ``data.path``; ``model.path`` (null) becomes the policy that sampled it."""
    if not OmegaConf.is_missing(cfg.data, "path"):  # given (or data without a path): nothing to make
        return cfg
    if not cfg.bootstrap.get("enabled"):
        raise UserError("stage=rs_distill needs data.path=<a stage=rs run directory> (or bootstrap.enabled=true to "
                        "run one first)")
    b = _Bootstrap(cfg, cfg.bootstrap, "rs_distill", ["data.path"], world_data=False)
    policy = b.policy()
    rms = {r: b.reward_model(r, policy) for r in REWARDS}
    with open_dict(cfg):
        cfg.data.path = b.selection(policy, rms)
    b.done()
    return cfg
