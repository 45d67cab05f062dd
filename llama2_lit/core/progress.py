"""Progress of long loops: a tqdm bar with an ETA on a terminal; elsewhere (a log file, CI) a plain line at most
every ``every_s`` seconds and one at the end, so a log is never flooded with bar redraws."""
from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
log = logging.getLogger(__name__)


def eta_text(done: int, total: int | None, elapsed: float) -> str:
    """``"3/10 (30%), 12 s elapsed, ETA 28 s"``; without a total: ``"3 done, 12 s elapsed"``."""
    if not total:
        return f"{done} done, {elapsed:.0f} s elapsed"
    eta = elapsed / done * (total - done) if done else float("nan")
    return (f"{done}/{total} ({100 * done / total:.0f}%), {elapsed:.0f} s elapsed"
            + ("" if eta != eta else f", ETA {eta:.0f} s"))


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it", every_s: float = 30.0,
             terminal: bool | None = None) -> Iterator[T]:
    """Yield ``items``, showing progress as ``desc``; ``terminal``: None = stderr is a terminal."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if terminal is None:
        terminal = sys.stderr.isatty()
    if terminal:
        yield from tqdm(items, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)
        return
    t0 = last = time.perf_counter()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= every_s and (total is None or done < total):
            log.info("%s: %s", desc, eta_text(done, total, now - t0))
            last = now
    if done and time.perf_counter() - t0 >= every_s:  # a long loop says when it ended; a short one stays quiet
        log.info("%s: %s", desc, eta_text(done, total, time.perf_counter() - t0))
