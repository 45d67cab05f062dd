"""EpochEndResume: resuming from a checkpoint written at an epoch's end continues with the next epoch's data."""
from __future__ import annotations

import logging

import lightning as L

log = logging.getLogger(__name__)


class EpochEndResume(L.Callback):
    """Undo Lightning 2.6's double count of the epoch a checkpoint was written at the end of.

    A checkpoint saved in ``on_train_epoch_end`` (ModelCheckpoint at an epoch's end) holds that epoch as
    processed but not completed. On ``ckpt_path=`` resume the fit loop finishes the epoch again and counts it
    processed a second time: the next epoch's sampler is seeded one epoch ahead (other data than the
    uninterrupted run's) and ``max_epochs`` stops the run one epoch early. This puts the count back before
    the loop goes on; it acts only in that restart state. ``run.build`` adds it to every trainer.
    """

    def on_train_start(self, trainer, pl_module) -> None:
        loop = trainer.fit_loop
        progress = loop.epoch_progress
        if getattr(loop, "restarted_on_epoch_end", False) and progress.current.processed == progress.current.completed + 1:
            progress.current.processed -= 1
            progress.total.processed -= 1
            log.info("resuming at the end of epoch %d", progress.current.completed)
