"""The loggers of a run's ``logger`` group outside a Trainer (the pipeline's report scalars, RS's curves) and the
wandb config's offline switch. Lightning's own loggers; a missing package is a one-line error naming it."""
from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from llama2_lit.errors import UserError


def wandb_offline() -> bool:
    """``offline`` of conf/logger/wandb.yaml: true unless W&B credentials are set up (``WANDB_API_KEY`` or
    ``WANDB_IDENTITY_TOKEN_FILE`` exported, or an API key for the W&B host in ``~/.netrc`` or ``$NETRC``, which
    ``wandb login`` writes). An exported ``WANDB_MODE`` decides instead: false here, and wandb reads it itself."""
    env = os.environ
    if env.get("WANDB_MODE") or env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return False
    base = env.get("WANDB_BASE_URL")
    hosts = [base.split("://")[-1].split("/")[0]] if base else ["api.wandb.ai", "api.forge.coreweave.com"]
    try:
        entries = netrc.netrc(env.get("NETRC") or str(Path.home() / ".netrc")).hosts
    except (OSError, netrc.NetrcParseError):
        return True
    return not any((entries.get(h) or (None, None, None))[2] for h in hosts)


def instantiate_loggers(cfg: DictConfig) -> list[Any]:
    """The Lightning loggers of ``cfg.logger`` (null entries skipped). A logger whose package is not installed is a
    one-line :class:`UserError` naming the package and the pip command."""
    pip = {"mlflow": "mlflow-skinny sqlalchemy alembic", "sqlalchemy": "sqlalchemy alembic", "comet_ml": "comet-ml"}
    loggers = []
    for key, node in (cfg.get("logger") or {}).items():
        if node is None:
            continue
        try:
            loggers.append(instantiate(node))
        except Exception as e:  # Hydra wraps what the logger raised; Lightning raises ModuleNotFoundError itself
            chain, err = [], e
            while err is not None:
                chain.append(err)
                err = err.__cause__ or err.__context__
            target = str(node.get("_target_", ""))
            cls = target.rsplit(".", 1)[-1]
            missing = next((x for x in chain if isinstance(x, ModuleNotFoundError)), None)
            if missing is not None:
                name = (missing.name or "").split(".")[0] or {"WandbLogger": "wandb", "MLFlowLogger": "mlflow",
                                                              "CometLogger": "comet_ml"}.get(cls, "")
                if name == target.split(".")[0]:
                    name = ""  # not a missing package: a target that does not exist (Hydra's message says so)
            else:  # mlflow-skinny without SQLAlchemy has no SQLite store
                name = "sqlalchemy" if any("unsupported URI 'sqlite" in str(x) for x in chain) else ""
            if not name:
                raise
            raise UserError(f"logger.{key} ({cls}) needs the '{name}' package, which is not installed: "
                            f"pip install {pip.get(name, name)}") from e
    return loggers
