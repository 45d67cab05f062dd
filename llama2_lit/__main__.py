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


def _rank_lost(e: BaseException):
    """trainer=fsdp: a rank that died or stopped answering, behind ``e`` (a failed collective), as the one line to
    print (``llama2_lit.models.sharding.RankLost``, exit code 69); None for other errors."""
    mod = sys.modules.get("llama2_lit.models.sharding")  # only a run that imported it can have lost a rank
    return mod.rank_lost(e) if mod is not None else None


# The run directory is locked before Hydra writes into it (hydra.callbacks.run_lock in conf/config.yaml,
# llama2_lit/run_lock.py): a second command on a directory in use prints "error: <dir> is in use by pid ..." and
# exits 2 without touching it.
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
            lost = _rank_lost(e)
            if lost is None:
                raise
            print(f"error: {lost}", file=sys.stderr)  # e.g. rank 1 (pid 4255) stopped answering: it was killed ...
            sys.exit(lost.exit_code)
        print(f"error: {user}", file=sys.stderr)
        sys.exit(2)
    # a sweeper may optimise this value
    return metrics.get("val/loss")


if __name__ == "__main__":
    main()
