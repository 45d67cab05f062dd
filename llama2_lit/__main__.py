"""python -m llama2_lit stage=<name> [hydra overrides]   (see conf/config.yaml)"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from llama2_lit import config as _config  # noqa: F401  (registers the ${project_root:} resolver)
from llama2_lit.errors import Preempted, UserError


def _user_error(e: BaseException | None) -> UserError | None:
    """The UserError behind ``e``: Hydra's instantiate wraps errors raised by the objects it builds."""
    while e is not None:
        if isinstance(e, UserError):
            return e
        e = e.__cause__ or e.__context__
    return None


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from llama2_lit.run import run

    try:
        metrics = run(cfg)
    except Preempted as e:  # SIGTERM/SIGUSR1: a checkpoint was saved; rerun with ckpt_path=last
        print(f"preempted: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except Exception as e:  # noqa: BLE001 - a user error (possibly wrapped by hydra.utils.instantiate) is one line
        user = _user_error(e)
        if user is None:
            raise
        print(f"error: {user}", file=sys.stderr)
        sys.exit(2)
    # a sweeper may optimise this value
    return metrics.get("val/loss")


if __name__ == "__main__":
    main()
