"""Config helpers: the project-root resolver and composing the shipped config from Python."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"

if not OmegaConf.has_resolver("project_root"):
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))


def compose(overrides: list[str] | None = None, config_name: str = "config"):
    """Compose ``conf/config.yaml`` with Hydra overrides (without running), e.g. for tests and notebooks.

    ``paths.output_dir`` defaults to Hydra's run dir, which only exists inside ``@hydra.main``:
    pass ``paths.output_dir=...`` when the result is used to run.
    """
    from hydra import compose as _compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return _compose(config_name=config_name, overrides=list(overrides or []))
