"""Crash-safe checkpoints: atomic writes, step checkpoints with retention, and a resume that survives a bad file.

- :class:`AtomicCheckpointIO`: a checkpoint is written to ``.<name>.tmp<pid>`` beside its final name, flushed to
  disk (``fsync``) and renamed into place with ``os.replace``, so a file under a checkpoint's name is always a whole
  checkpoint. (Lightning's ``TorchCheckpointIO`` serialises to memory, writes a temporary file under ``/tmp`` and
  ``shutil.move``-s it: across file systems that is a copy, which a crash can leave half-written.) A failed write
  (``OSError``: disk full, quota, permissions) removes the temporary file and raises :class:`CheckpointWriteError`,
  a user error: the entry point prints one line and exits 2; the previous checkpoint is untouched.
- :class:`SafeCheckpoint`: Lightning's ``ModelCheckpoint`` plus ``every_n_steps`` (optimizer steps; PPO:
  iterations) on top of its epoch/validation-end saves, a save at the end of training, an atomic ``last.ckpt``
  link, ``monitor: auto`` (the module's ``checkpoint_monitor``, else ``val/loss``/min) and :meth:`save_now`
  (preemption). A step save due on a batch after which validation runs waits for the validation's end, so the
  checkpoint holds what that validation changed (early stopping, best reward, RNG): a resumed run does not
  validate that step again (Lightning skips it) and must not miss it.
- :func:`resolve_ckpt_path`: ``ckpt_path=last`` → ``<run dir>/checkpoints/last.ckpt``; a file that is missing its end
  (truncated) or does not load is reported by name and the newest other checkpoint that loads is used.

Retention (``conf/callbacks/default.yaml``): ``checkpoint`` keeps the newest ``save_top_k`` step/epoch checkpoints
(``monitor: step``, ``mode: max``) and ``last.ckpt``; ``checkpoint_best`` keeps the best ``save_top_k`` by the
validation metric.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from llama2_lit.errors import UserError

log = logging.getLogger(__name__)


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (the run stops; what was on disk before is intact)."""


def _write(checkpoint: dict, path: Path) -> None:
    """Serialise ``checkpoint`` into ``path`` and flush it to disk (tests replace this to inject faults)."""
    with open(path, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _os_error(e: BaseException) -> OSError | None:
    while e is not None:
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
    return None


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic (temporary file, fsync, ``os.replace``)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # a remote file system: Lightning's own (fsspec) path
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        path = Path(path)
        tmp = temp_name(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write(checkpoint, tmp)
            os.replace(tmp, path)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            err = _os_error(e)
            if err is None:
                raise
            raise CheckpointWriteError(f"could not write checkpoint {path}: {err.strerror or err}") from e
        _fsync_dir(path.parent)


class SafeCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with step saves, a final save, an atomic ``last`` link and ``monitor: auto``.

    Args:
        every_n_steps: also save every N optimizer steps (manual optimization, PPO: every N iterations); 0: only at
            epoch or validation ends (Lightning's default triggers, kept) and at the end of training.
        monitor: ``step`` with ``mode: max`` keeps the newest ``save_top_k`` checkpoints; ``auto``: the
            LightningModule's ``checkpoint_monitor`` ``(key, mode)``, else ``("val/loss", "min")``.
        other arguments: ``ModelCheckpoint``'s (``every_n_train_steps`` / ``every_n_epochs`` / ``train_time_interval``
            are not taken: the epoch/validation-end triggers stay on).
    """

    def __init__(self, *args: Any, every_n_steps: int = 0, **kwargs: Any):
        for k in ("every_n_train_steps", "every_n_epochs", "train_time_interval"):
            if kwargs.get(k) is not None:
                raise UserError(f"SafeCheckpoint: use every_n_steps, not {k}")
        super().__init__(*args, **kwargs)
        if every_n_steps < 0:
            raise UserError(f"callbacks.checkpoint.every_n_steps must be >= 0, got {every_n_steps}")
        self.every_n_steps = int(every_n_steps)
        self._auto_monitor = self.monitor == "auto"
        self._step_save_pending = False
        self._saves = 0

    # -- configuration ----------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if self._auto_monitor:
            key, mode = getattr(pl_module, "checkpoint_monitor", ("val/loss", "min"))
            self.monitor, self.mode = key, mode
            self.kth_value = torch.tensor(float("inf") if mode == "min" else -float("inf"))
        super().setup(trainer, pl_module, stage)

    # -- triggers ---------------------------------------------------------------------------------------
    @staticmethod
    def _steps(trainer, pl_module) -> int:
        if pl_module.automatic_optimization:
            return int(trainer.global_step)
        return int(trainer.fit_loop.epoch_loop.batch_progress.total.processed)

    @staticmethod
    def _validation_follows(trainer) -> bool:
        loop = trainer.fit_loop.epoch_loop
        try:
            return bool(trainer.enable_validation and loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
        except Exception:  # noqa: BLE001 - a Lightning internal changed: save now rather than never
            return False

    def _save_topk_and_last(self, trainer) -> None:
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
        self._step_save_pending = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._step_save_pending and not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_and_last(trainer)  # the validation it waited for did not run: save now
        if self.every_n_steps < 1 or self._should_skip_saving_checkpoint(trainer):
            return
        steps = self._steps(trainer, pl_module)
        if steps == 0 or steps % self.every_n_steps:
            return
        if pl_module.automatic_optimization and trainer.fit_loop._should_accumulate():
            return  # mid accumulation: gradients are not in a checkpoint
        if self._validation_follows(trainer):
            self._step_save_pending = True
            return
        self._save_topk_and_last(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        before = self._saves
        super().on_validation_end(trainer, pl_module)
        if self._step_save_pending and self._saves == before and not self._should_save_on_train_epoch_end(trainer) \
                and not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_and_last(trainer)
        elif self._saves != before:
            self._step_save_pending = False

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        before = self._saves
        super().on_train_epoch_end(trainer, pl_module)
        if self._step_save_pending and self._saves == before and not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_and_last(trainer)
        elif self._saves != before:
            self._step_save_pending = False

    def on_train_end(self, trainer, pl_module) -> None:
        """The trained state: ``last.ckpt`` (and a step checkpoint) hold what ``hf/`` is exported from."""
        if self.save_last and not self._should_skip_saving_checkpoint(trainer) and not trainer.sanity_checking:
            self._save_topk_and_last(trainer)
        super().on_train_end(trainer, pl_module)

    def save_now(self, trainer) -> str | None:
        """Save the current state (top-k and ``last``) unless this step is saved already; the ``last`` path."""
        if self._last_global_step_saved != trainer.global_step or not self.last_model_path:
            self._save_topk_and_last(trainer)
        return self.last_model_path or self._last_checkpoint_saved or None

    # -- writing ----------------------------------------------------------------------------------------
    def _save_checkpoint(self, trainer, filepath: str) -> None:
        previous = self._last_checkpoint_saved
        try:
            super()._save_checkpoint(trainer, filepath)
        except CheckpointWriteError as e:
            kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint was written"
            raise CheckpointWriteError(f"{e}; the run stops here and {kept}. Free space (or move "
                                       "callbacks.checkpoint.dirpath), then resume with ckpt_path=last") from e
        self._saves += 1

    @staticmethod
    def _link_checkpoint(trainer, filepath: str, linkpath: str) -> None:
        """``last.ckpt`` → the newest checkpoint, replaced atomically (a new link under a temporary name, then
        ``os.replace``): a crash leaves the old link or the new one, never none."""
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            link = Path(linkpath)
            tmp = temp_name(link)
            tmp.unlink(missing_ok=True)
            try:
                os.symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), tmp)
                if link.is_dir() and not link.is_symlink():  # a sharded last.ckpt/ directory from an older run
                    shutil.rmtree(link)
                os.replace(tmp, link)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise CheckpointWriteError(f"could not link {linkpath} -> {filepath}: {e.strerror or e}") from e
        trainer.strategy.barrier()


# ------------------------------------------------------------------------------------------------ resume
def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from (None: it loads as a Lightning checkpoint)."""
    if path.is_symlink() and not path.exists():
        return f"a link to {os.readlink(path)}, which does not exist"
    if not path.exists():
        return "it does not exist"
    if path.is_dir():  # a sharded (distributed) checkpoint
        return None if (path / ".metadata").exists() or (path / "meta.pt").exists() else "not a checkpoint directory"
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to load is reported, with its first line
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:200]
        if "weights_only" in str(e) or "Weights only load failed" in str(e):
            first = "it holds pickled objects torch.load(weights_only=True) refuses (not a checkpoint of this project)"
        return f"it does not load ({type(e).__name__}: {first})"
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        return "it is not a Lightning checkpoint (no state_dict)"
    return None


def _mtime(p: Path) -> int:
    try:
        return p.stat().st_mtime_ns
    except OSError:
        return p.lstat().st_mtime_ns


def _other_checkpoints(path: Path, older: bool) -> list[Path]:
    """Other checkpoints beside ``path``, newest first (``older``: none written after it); each file once."""
    d = path.parent
    if not d.is_dir():
        return []
    limit = _mtime(path) if older and (path.exists() or path.is_symlink()) else None
    seen = {os.path.realpath(path)}
    out = []
    for p in sorted(d.glob("*.ckpt"), key=_mtime, reverse=True):
        real = os.path.realpath(p)
        if real in seen or p.name.startswith("."):
            continue
        seen.add(real)
        if limit is None or _mtime(p) <= limit:
            out.append(p)
    return out


def resolve_ckpt_path(spec: str | None, ckpt_dir: str | Path) -> str | None:
    """The checkpoint a run resumes from.

    ``spec``: None (a fresh run); ``last`` (``ckpt_dir/last.ckpt``, the run directory's own); a run directory
    (its ``checkpoints/last.ckpt``); or a checkpoint file or sharded-checkpoint directory. A checkpoint that does
    not load is reported by name (a warning) and the newest other one beside it that loads is used (for a named
    file: one written before it); none left is a :class:`UserError` naming every file tried.
    """
    if spec is None or str(spec).strip() in ("", "null", "None"):
        return None
    ckpt_dir = Path(ckpt_dir)
    if str(spec) == "last":
        path = ckpt_dir / "last.ckpt"
        if not (path.exists() or path.is_symlink()) and not _other_checkpoints(path, older=False):
            raise UserError(f"ckpt_path=last: no checkpoint to resume from: {path} does not exist. Rerun in the "
                            "interrupted run's directory (hydra.run.dir=<run dir>) or give ckpt_path=<checkpoint file>")
    else:
        path = Path(str(spec)).expanduser()
        if path.is_dir() and (path / "checkpoints").is_dir():  # a run directory
            path = path / "checkpoints" / "last.ckpt"
        if not (path.exists() or path.is_symlink()):
            raise UserError(f"ckpt_path: {path} does not exist")
    tried = []  # last: any other checkpoint of the run may stand in; a named file: only those written before it
    for cand in [path, *_other_checkpoints(path, older=str(spec) != "last")]:
        why = checkpoint_problem(cand)
        if why is None:
            if tried:
                log.warning("resuming from %s instead (the newest checkpoint that loads)", cand)
            return str(cand)
        log.warning("checkpoint %s is unusable: %s", cand, why)
        tried.append(f"{cand} ({why})")
    raise UserError("no checkpoint to resume from loads: " + "; ".join(tried))
