"""EpochEndResume: resuming from a checkpoint written at an epoch's end continues with the next epoch's data."""
from __future__ import annotations

import logging
import random

import lightning as L
import numpy as np
import torch

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


def rng_states() -> dict:
    """The torch (and CUDA), numpy and Python RNG states, in types ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    out = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in states["python"]))
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ResumeState(L.Callback):
    """What a resumed run needs besides Lightning's own restore: the data position and the global RNG streams.

    - Data: Lightning 2.6 builds the training loaders before it reads the checkpoint when the optimizer set-up asks
      for ``estimated_stepping_batches`` (every stage here), so the saved loader states never reach them. In
      ``on_train_start`` of a run restarting mid-epoch this loads them (``ResumableDataLoader.load_state_dict``) and
      starts a fresh pass, which skips the batches already trained.
    - RNG: torch (and CUDA), numpy and Python states, captured when a checkpoint is written and set back last
      thing in ``on_train_start``, after everything that ran before training in the resumed run (loader set-up,
      start-of-fit evaluations), so the next step draws what the uninterrupted run drew (PPO seeds its rollouts
      from the global torch RNG). Rank 0's states are the ones saved.

    ``run.build`` adds it to every trainer.
    """

    def __init__(self) -> None:
        self._pending: dict | None = None

    def state_dict(self) -> dict:
        return rng_states()

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer, pl_module) -> None:
        loop = trainer.fit_loop
        if loop.restarting and loop._combined_loader_states_to_load and loop._combined_loader is not None:
            loop._load_combined_loader_states()
            if loop._data_fetcher is not None:
                iter(loop._data_fetcher)  # a new pass: it starts at the restored position
            log.info("resuming the training data at batch %d of epoch %d",
                     loop.epoch_loop.batch_progress.current.ready, trainer.current_epoch)
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None


class CarriedMetrics(L.Callback):
    """Scalars measured before ``fit`` (``val/*_init``) kept in checkpoints, so a resumed run reports them too."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def state_dict(self) -> dict:
        return {"metrics": dict(self.metrics)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.metrics = {k: float(v) for k, v in (state_dict.get("metrics") or {}).items()}
