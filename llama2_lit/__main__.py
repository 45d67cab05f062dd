"""python -m llama2_lit stage=<name> [hydra overrides]   (see conf/config.yaml)"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from llama2_lit import config as _config  # noqa: F401  (registers the ${project_root:} resolver)
from llama2_lit.errors import UserError


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from llama2_lit.run import run

    try:
        metrics = run(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    # a sweeper may optimise this value
    return metrics.get("val/loss")


if __name__ == "__main__":
    main()
