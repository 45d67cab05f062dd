"""Training loaders that resume mid-epoch: Lightning saves and restores their position.

Lightning 2.6's fit loop calls ``state_dict()`` on every training loader that has one when it writes a checkpoint
(``loops.fit_loop.state_dict.combined_loader``) and ``load_state_dict()`` on the new loader before it creates the
first iterator of a resumed run. A plain ``DataLoader`` has neither, so a run resumed mid-epoch starts that epoch
over (examples trained twice). :class:`ResumableDataLoader` records ``{"epoch", "served"}``: the sampler epoch of
the current pass and the batches handed out in it; restored, the next pass of that epoch skips the batches already
served, at the index level (no example is loaded, collated or trained twice, none skipped).

The order of a pass must be a function of ``(seed, epoch)`` for this to hold: :class:`EpochRandomSampler` (the
order ``DataLoader(shuffle=True, generator=seeded)`` gave, rebuilt for any epoch), the pairwise
``LengthGroupedBatchSampler`` and ``CyclingSampler`` (PPO prompts) are. Lightning sets the epoch before each pass
(``set_epoch`` on ``loader.sampler`` and ``loader.batch_sampler.sampler``); the samplers read it when the pass's
first index is drawn. Exact with ``num_workers=0`` (the default); with workers the first pass after a resume at an
epoch's end may start before Lightning sets the epoch.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, RandomSampler


def _int64_draw(gen: torch.Generator) -> None:
    torch.empty((), dtype=torch.int64).random_(generator=gen)


class EpochRandomSampler(RandomSampler):
    """A random permutation of ``len(data_source)`` per epoch, a pure function of ``(seed, epoch)``.

    The permutation of epoch ``e`` is the one ``DataLoader(shuffle=True, generator=Generator().manual_seed(seed))``
    drew for its ``e``-th full pass: that loader's generator gave, per pass, one int64 (the iterator's worker base
    seed), the pass's ``randperm`` and a second ``randperm`` when the pass ran out. Replaying those draws keeps the
    data order of runs made before this sampler existed. A ``RandomSampler`` subclass, so Lightning still deals it
    out as a shuffled sampler (``DistributedSampler(shuffle=True)``) on several devices.
    """

    def __init__(self, data_source, seed: int = 0):
        super().__init__(data_source)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def permutation(self, epoch: int) -> list[int]:
        n = len(self.data_source)
        gen = torch.Generator().manual_seed(self.seed)
        for _ in range(epoch):
            _int64_draw(gen)
            torch.randperm(n, generator=gen)
            torch.randperm(n, generator=gen)
        _int64_draw(gen)
        return torch.randperm(n, generator=gen).tolist()

    def __iter__(self) -> Iterator[int]:  # a generator: the epoch is read when the first index is drawn
        yield from self.permutation(self.epoch)

    def __len__(self) -> int:
        return len(self.data_source)


def _epoch_of(index_sampler) -> int | None:
    for obj in (index_sampler, getattr(index_sampler, "sampler", None)):
        if obj is not None and isinstance(getattr(obj, "epoch", None), int):
            return obj.epoch
    return None


def _set_epoch(index_sampler, epoch: int | None) -> None:
    if epoch is None:
        return
    for obj in (index_sampler, getattr(index_sampler, "sampler", None)):
        if callable(getattr(obj, "set_epoch", None)):
            obj.set_epoch(epoch)


class _ResumingIndices:
    """The loader's index (batch) sampler for one pass; skips the batches a restored state says were served."""

    def __init__(self, loader: "ResumableDataLoader", base):
        self.loader, self.base = loader, base

    def __len__(self) -> int:  # the full pass: Lightning counts the restored batches itself
        return len(self.base)

    def __iter__(self):
        epoch = _epoch_of(self.base)  # before the base pass starts (a sampler may count its passes)
        skip = self.loader._take_skip(epoch)
        self.loader._epoch, self.loader._served = epoch, skip
        it = iter(self.base)
        for _ in range(skip):
            if next(it, None) is None:
                return
        yield from it


class _Counted:
    def __init__(self, loader: "ResumableDataLoader", it):
        self.loader, self.it = loader, it

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.it)
        self.loader._served += 1
        return batch

    def __len__(self) -> int:
        return len(self.it)

    def __getattr__(self, name: str):  # the DataLoader iterator's own attributes (workers, ...)
        return getattr(self.it, name)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` with ``state_dict`` / ``load_state_dict`` (see the module docstring).

    ``state_dict()``: ``{"epoch": sampler epoch of the current pass (None: the sampler has none), "served": batches
    handed out in it}``. ``load_state_dict(s)`` makes the next pass of epoch ``s["epoch"]`` skip ``s["served"]``
    batches; a pass of another epoch starts at its beginning.
    """

    def __init__(self, dataset, **kwargs: Any):
        super().__init__(dataset, **kwargs)
        self._epoch: int | None = None
        self._served = 0
        self._pending: dict | None = None

    @property
    def _index_sampler(self):
        return _ResumingIndices(self, super()._index_sampler)

    def __iter__(self):
        self._served = 0
        return _Counted(self, super().__iter__())

    def _take_skip(self, epoch: int | None) -> int:
        pending, self._pending = self._pending, None
        if pending is None or pending.get("epoch") != epoch:
            return 0
        return int(pending.get("served", 0))

    def state_dict(self) -> dict[str, Any]:
        epoch = self._epoch if self._epoch is not None else _epoch_of(super()._index_sampler)
        return {"epoch": epoch, "served": int(self._served)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = {"epoch": state.get("epoch"), "served": int(state.get("served", 0))}
        # the sampler starts at the saved epoch even if a pass begins before Lightning calls set_epoch
        _set_epoch(super()._index_sampler, state.get("epoch"))
