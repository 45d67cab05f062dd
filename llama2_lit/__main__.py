"""python -m llama2_lit stage=<name> [hydra overrides]   (see conf/config.yaml; the stages: llama2_lit.run.STAGES)

Entry layer: Hydra composes the config, ``llama2_lit.run.run`` runs it; errors meant for the user become one line.
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from llama2_lit import config as _config  # the config folder, and the ${project_root:}, ${cwd:}, ${user_cache:} resolvers
from llama2_lit.errors import Preempted, UserError
from llama2_lit.models.rank_watch import rank_lost
from llama2_lit.run import run


def _user_error(e: BaseException | None) -> UserError | None:
    """The UserError behind ``e``: Hydra's instantiate wraps errors raised by the objects it builds."""
    while e is not None:
        if isinstance(e, UserError):
            return e
        e = e.__cause__ or e.__context__
    return None


# The run directory is locked before Hydra writes into it (hydra.callbacks.run_lock in conf/config.yaml,
# llama2_lit/run_lock.py): a second command on a directory in use prints "error: <dir> is in use by pid ..." and
# exits 2 without touching it.
# llama2_lit/conf: the configs ship in the package (in a checkout a link to ../conf); an absolute path for Hydra
@hydra.main(version_base="1.3", config_path=str(_config.CONF_DIR.resolve()), config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = run(cfg)
    except Preempted as e:  # SIGTERM/SIGUSR1: a checkpoint was saved; rerun with ckpt_path=last
        print(f"preempted: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except Exception as e:  # noqa: BLE001 - a user error (possibly wrapped by hydra.utils.instantiate) is one line
        user = _user_error(e)
        if user is None:
            lost = rank_lost(e)  # trainer=fsdp: a rank that died or stopped answering (exit code 69); else None
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
