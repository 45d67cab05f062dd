"""Preemption: SIGTERM or SIGUSR1 (SLURM's warning signal) saves a checkpoint at the next step boundary and stops.

The handler only records the signal. After the training batch in progress (and the validation that follows it,
when one is due) the callback raises Lightning's own stop flag; Lightning then ends the epoch loop with
``SIGTERMException``, this callback's ``on_exception`` writes the checkpoint (``last.ckpt`` through the run's
:class:`~callbacks.checkpoint.SafeCheckpoint`), and ``llama2_lit.run`` turns the stop into
:class:`llama2_lit.errors.Preempted`: the entry point prints where the checkpoint is and exits with
``PREEMPTED_EXIT_CODE`` (75, ``EX_TEMPFAIL``: try again). Rerunning the same command in the same run directory with
``ckpt_path=last`` continues exactly where it stopped.

A signal during the last step lets the run finish (final checkpoint, validation, export; exit 0). Handlers are
installed when training starts (replacing Lightning's SIGTERM handler for the fit, which Lightning
restores afterwards). A signal during validation before or after ``fit`` stops that validation (Lightning's
handler) with the same exit code; outside the trainer the signal's default action applies.

Requeue on SLURM: this callback never requeues; the batch script does. ``scripts/slurm/train.sbatch`` (with
``scripts/slurm/requeue.sh``) runs ``scontrol requeue $SLURM_JOB_ID`` when the run exits with 75, unless SLURM sent
the batch shell SIGTERM (a scancel, or a preemption SLURM requeues itself); the requeued job keeps its id, hence its
``hydra.run.dir``, and resumes with ``ckpt_path=last``. Lightning's own SLURM auto-requeue (its SIGUSR1 handler: an
``hpc_ckpt_*.ckpt`` and ``scontrol requeue``) is replaced by this callback's handler during ``fit``, and train.sbatch
turns it off altogether (``SLURMEnvironment(auto_requeue=False)``). ``sbatch --signal=B:USR1@<seconds>`` gives the
time-limit warning to the batch shell, which passes it on to srun and so to every rank. In a multi-process run each
rank acts on the signal it received itself: every rank must receive it (srun and SLURM's SIGTERM reach every task).
See docs/cluster.md.
"""
from __future__ import annotations

import logging
import signal
import threading

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.checkpoint import SafeCheckpoint

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75


class Preemption(L.Callback):
    """Save and stop at the next step boundary on one of ``signals`` (names, e.g. ``[SIGTERM, SIGUSR1]``)."""

    def __init__(self, signals: tuple[str, ...] | list[str] = ("SIGTERM", "SIGUSR1")):
        self.signals = [s for s in signals if hasattr(signal, s)]
        self.received: str | None = None
        self.checkpoint: str | None = None
        self._stop_after_validation = False
        self._finishing = False

    def _handler(self, signum, frame) -> None:  # no logging here: a handler may interrupt the logging lock's holder
        if self.received is None:
            self.received = signal.Signals(signum).name

    def on_train_start(self, trainer, pl_module) -> None:
        self.received, self.checkpoint, self._stop_after_validation = None, None, False
        self._finishing = False
        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.signals:
            signal.signal(getattr(signal, name), self._handler)

    @staticmethod
    def _ends_here(trainer) -> bool:
        """Whether training ends after this step anyway (then the run finishes: export and all)."""
        loop = trainer.fit_loop
        if loop.max_steps not in (None, -1) and trainer.global_step >= loop.max_steps:
            return True
        if trainer.should_stop:
            return True
        epoch = loop.epoch_loop
        last_batch = epoch.batch_progress.is_last_batch or epoch._num_ready_batches_reached()
        return bool(last_batch and loop.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= loop.max_epochs)

    def _stop(self, trainer) -> None:
        if self._ends_here(trainer):
            if not self._finishing:
                log.warning("%s received at the last step: finishing the run", self.received)
            self._finishing = True
            return
        if not trainer.received_sigterm:
            log.warning("%s received: saving a checkpoint and stopping after step %d", self.received,
                        trainer.global_step)
        trainer._signal_connector.received_sigterm = True  # Lightning stops at the end of this step

    def _any_rank(self, trainer) -> bool:
        """Whether any rank got a signal: the decision is collective, so every rank stops after the same step (a
        rank that stopped alone would leave the others waiting in their next collective)."""
        got = self.received is not None
        if trainer.world_size > 1:
            got = bool(trainer.strategy.reduce_boolean_decision(got, all=False))
            if got and self.received is None:
                self.received = "a signal to another rank"
        return got

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self._any_rank(trainer):
            return
        if SafeCheckpoint._validation_follows(trainer):
            self._stop_after_validation = True  # stopping now would interrupt the validation that follows
        else:
            self._stop(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.training is False and trainer.state.fn == "fit" and self._any_rank(trainer):
            self._stop(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        if self.received is None:
            self.received = "SIGTERM"
        ckpt = next((c for c in trainer.checkpoint_callbacks if isinstance(c, SafeCheckpoint) and c.save_last), None)
        if ckpt is None:
            log.warning("%s: no checkpoint callback with save_last (callbacks=none?): nothing saved", self.received)
            return
        if trainer.validating and not trainer.training:
            log.warning("%s during validation: the last checkpoint is the resume point", self.received)
            self.checkpoint = ckpt.last_model_path or None
            return
        self.checkpoint = ckpt.save_now(trainer)
        log.warning("%s: checkpoint saved to %s (step %d)", self.received, self.checkpoint, trainer.global_step)
