"""Training the prerequisites a stage needs when the user gives none (``ppo.bootstrap``).

``python -m llama2_lit stage=ppo`` on the embedded default has no SFT policy and no reward models. Rather than
run PPO from a random model, :func:`prepare_ppo` runs the earlier stages of the recipe first, each as its own
``python -m llama2_lit`` run (its own Hydra run dir, log and ``metrics.json``) under ``ppo.bootstrap.dir``:

1. ``stage=sft`` (when ``model.path`` is null): the policy and π₀;
2. ``stage=rm data=synthetic_pairs reward=helpfulness|safety model.path=<policy>`` (when a reward model is null):
   pairs sampled from that policy, labelled by the world's simulated annotator.

A finished run is reused by later runs with the same model, seed and settings (the directory name carries a hash
of them); every step is said in the log. Only the synthetic world has an annotator, so on other data the paths
must be given.
"""
from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from llama2_lit.errors import UserError
from llama2_lit.scoring import folder_fingerprint

log = logging.getLogger(__name__)


def _key(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _finished(run_dir: Path) -> bool:
    return (run_dir / "metrics.json").is_file() and (run_dir / "hf" / "config.json").is_file()


def run_stage(run_dir: Path, overrides: list[str], what: str) -> Path:
    """``python -m llama2_lit <overrides>`` into ``run_dir`` unless a finished run is there; returns ``run_dir/hf``."""
    if _finished(run_dir):
        log.info("bootstrap: reusing the %s in %s", what, run_dir)
        return run_dir / "hf"
    cmd = [sys.executable, "-m", "llama2_lit", *overrides, f"hydra.run.dir={run_dir}"]
    log.warning("bootstrap: no %s given, training one first: %s", what, " ".join(cmd[2:]))
    rc = subprocess.run(cmd, check=False).returncode
    if rc != 0 or not _finished(run_dir):
        raise UserError(f"bootstrap: training the {what} failed (exit code {rc}); its log is {run_dir}/__main__.log")
    return run_dir / "hf"


def prepare_ppo(cfg: DictConfig) -> DictConfig:
    """Fill ``model.path`` and ``ppo.reward_models.{helpfulness,safety}`` by training them when they are null."""
    o = cfg.ppo
    need_policy = not cfg.model.get("path")
    need_rm = [r for r in ("helpfulness", "safety") if o.scorer == "rm" and not o.reward_models.get(r)]
    if not need_policy and not need_rm:
        return cfg
    missing = (["model.path"] if need_policy else []) + [f"ppo.reward_models.{r}" for r in need_rm]
    boot = o.get("bootstrap") or {}
    if not boot.get("enabled", False):
        raise UserError(f"stage=ppo needs {', '.join(missing)} (or ppo.bootstrap.enabled=true to train them first)")
    if str(cfg.data.get("path")) != "synthetic":
        raise UserError(f"stage=ppo needs {', '.join(missing)}: they can be trained on the fly on the synthetic world "
                        f"only (it has a gold annotator), and data.path is '{cfg.data.get('path')}'")
    root = Path(str(boot.dir))
    if any(c in str(cfg.model.name) for c in "/\\") or str(cfg.model.name).startswith("."):
        raise UserError(f"model.name: '{cfg.model.name}' must be a plain name (it names the bootstrap folders)")
    common = [f"model={cfg.model.name}", f"seed={cfg.seed}", f"paths.output_root={cfg.paths.output_root}",
              f"paths.cache_dir={cfg.paths.cache_dir}",
              f"trainer.enable_progress_bar={str(bool(cfg.trainer.get('enable_progress_bar', True))).lower()}"]
    done = {}
    with open_dict(cfg):
        if need_policy:
            extra = list(boot.get("sft_overrides") or [])
            run_dir = root / f"sft_{cfg.model.name}_seed{cfg.seed}_{_key(extra)}"
            cfg.model.path = str(run_stage(run_dir, ["stage=sft", *common, *extra], "SFT policy (model.path)"))
            done["policy"] = cfg.model.path
        for reward in need_rm:
            extra = list(boot.get("rm_overrides") or [])
            policy = str(cfg.model.path)
            run_dir = root / f"rm_{reward}_{cfg.model.name}_seed{cfg.seed}_{_key(folder_fingerprint(policy), extra)}"
            over = ["stage=rm", "data=synthetic_pairs", f"reward={reward}", *common, f"model.path={policy}", *extra]
            o.reward_models[reward] = str(run_stage(run_dir, over, f"{reward} reward model"))
            done[reward] = o.reward_models[reward]
    out = Path(str(cfg.paths.output_dir))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bootstrap.json").write_text(json.dumps(done, indent=2) + "\n")
    log.info("bootstrap: PPO starts from %s", json.dumps(OmegaConf.to_container(cfg.model, resolve=False).get("path")))
    return cfg
