"""Config helpers: the path resolvers and composing the shipped config from Python.

The configs ship inside the package (``llama2_lit/conf``: in a checkout a link to the top-level ``conf/``; in an
installed package its copy), so ``llama2-lit`` runs from any directory. Where things go (``conf/paths/default.yaml``):

- ``${cwd:}``: the current directory (outputs/ and checkpoints/ go under it, as users of the CLI expect);
- ``${user_cache:}``: ``$LLAMA2_LIT_CACHE``, else ``$XDG_CACHE_HOME/llama2-lit``, else ``~/.cache/llama2-lit``;
- ``${project_root:}``: the source checkout (the folder holding ``pyproject.toml`` next to the package), else the
  current directory (an installed package: not site-packages).
"""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = Path(__file__).parent / "conf"  # in a checkout a link to ../conf


def project_root() -> Path:
    """The source checkout this package runs from, else the current directory."""
    root = PACKAGE_DIR.parent
    return root if (root / "pyproject.toml").is_file() and (root / "conf").is_dir() else Path.cwd()


def user_cache() -> Path:
    """Where caches go: ``$LLAMA2_LIT_CACHE``, ``$XDG_CACHE_HOME/llama2-lit`` or ``~/.cache/llama2-lit``."""
    if os.environ.get("LLAMA2_LIT_CACHE"):
        return Path(os.environ["LLAMA2_LIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llama2-lit"


for _name, _fn in (("project_root", lambda: str(project_root())), ("cwd", lambda: os.getcwd()),
                   ("user_cache", lambda: str(user_cache()))):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)


def compose(overrides: list[str] | None = None, config_name: str = "config"):
    """Compose ``conf/config.yaml`` with Hydra overrides (without running), e.g. for tests and notebooks.

    ``paths.output_dir`` defaults to Hydra's run dir, which only exists inside ``@hydra.main``:
    pass ``paths.output_dir=...`` when the result is used to run.
    """
    from hydra import compose as _compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return _compose(config_name=config_name, overrides=list(overrides or []))
