"""One process per run directory: a second ``python -m llama2_lit`` on a directory in use is refused.

Two commands on one directory (``make demo`` started twice, a resume started while the first run still trains)
would interleave their checkpoints, logs and metrics. :func:`acquire` takes ``<dir>/.lock``:

* an ``fcntl.flock`` held on it for the life of the process. The kernel drops it when the process ends however it
  ends (SIGKILL too), so a crashed run never blocks the next one;
* a one-line JSON record in it (pid, command, start time), only for the messages: a second process is refused with
  ``<dir> is in use by pid 12345 (python -m llama2_lit stage=sft ..., started 2025-01-02 20:51:03); wait for it or
  stop it`` (:class:`DirInUse`, a :class:`UserError`: ``error: ...``, exit 2), and a process that finds the record of
  a process that ended without releasing the lock (killed) takes the lock over and says so, naming that pid
  (:attr:`RunLock.previous`).

The refused process writes nothing: the directory exists already (the first process made it) and opening the
existing lock file to test the lock writes nothing. A clean release (:meth:`RunLock.release`, also at interpreter
exit) deletes the lock file: a finished run directory holds no ``.lock``. Deleting a locked file races with a process
that opened it just before, which is why :func:`acquire` checks, once it holds the lock, that the path still names the
file it locked (and starts over if not). Where ``flock`` is not supported (some network filesystems), the record's
pid is checked instead (``os.kill(pid, 0)``).

Who locks what (:class:`RunLockCallback`, a Hydra callback in ``conf/config.yaml``'s ``hydra.callbacks``):

* ``python -m llama2_lit ...``: the run directory, in ``on_run_start``. Hydra calls it after composing the config and
  before ``run_job`` creates the directory, configures the file log (``__main__.log``) and writes ``.hydra/``
  (hydra/core/utils.py), so a refused run leaves no trace there. ``on_job_start`` would be too late: Hydra calls it
  after ``.hydra/`` is written.
* ``-m`` (multirun): the sweep directory in ``on_multirun_start`` (before the sweeper writes ``multirun.yaml`` or any
  job folder: a second sweep on it is refused untouched), and each job's own directory in ``on_job_start``. Hydra
  resolves a job's directory only inside ``run_job``, so that lock comes after Hydra wrote the job's ``.hydra/``; it
  keeps out a later single run pointed at a job's folder (``hydra.run.dir=<sweep>/0``).
* Only the launching process locks. The ranks Lightning starts for ``trainer=fsdp`` rerun the same command with
  ``LOCAL_RANK`` set (and torchrun / SLURM set ``RANK`` / ``SLURM_PROCID``): any of those non-zero means a worker
  rank of a run whose rank 0 holds the lock (:func:`is_launching_process`).
* ``stage=pipeline`` also locks the pipeline's root directory (``llama2_lit/stages/pipeline.py``); each step it starts is
  its own ``python -m llama2_lit`` run with its own directory below that root (``<root>/v1/rm_safety/``), so the steps
  lock their own directories, not the parent's.
"""
from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama2_lit.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
# environment variables that name a worker rank of a distributed run (Lightning's launcher sets LOCAL_RANK and
# NODE_RANK; torchrun RANK, LOCAL_RANK and GROUP_RANK; SLURM SLURM_PROCID)
RANK_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "RANK", "GROUP_RANK", "SLURM_PROCID")
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class DirInUse(UserError):
    """The directory is locked by another live process; ``holder`` is its record."""

    def __init__(self, directory: Path, holder: "Holder | None"):
        self.directory, self.holder = directory, holder
        who = f"pid {holder.pid} ({holder.command}, started {holder.started})" if holder else "another process"
        super().__init__(f"{directory} is in use by {who}; wait for it or stop it")


@dataclass(frozen=True)
class Holder:
    """The record in a lock file: who took it."""

    pid: int
    command: str
    started: str

    @classmethod
    def parse(cls, text: str) -> "Holder | None":
        try:
            d = json.loads(text)
            return cls(int(d["pid"]), str(d.get("command", "?")), str(d.get("started", "?")))
        except (ValueError, TypeError, KeyError):
            return None

    @classmethod
    def me(cls) -> "Holder":
        argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
        command = shlex.join([Path(argv[0]).name, *argv[1:]])
        if len(command) > 160:
            command = command[:157] + "..."
        return cls(os.getpid(), command, time.strftime("%Y-%m-%d %H:%M:%S"))

    def dumps(self) -> str:
        return json.dumps({"pid": self.pid, "command": self.command, "started": self.started}) + "\n"


class RunLock:
    """A held lock on ``directory`` (see :func:`acquire`). ``previous``: the record of a process that held it and
    ended without releasing it (killed), which this one took over; None when the lock was free and clean."""

    def __init__(self, directory: Path, fd: int, previous: Holder | None):
        self.directory, self.path, self.fd, self.previous = directory, directory / LOCK_NAME, fd, previous
        self.pid = os.getpid()
        self.count = 1  # acquisitions in this process not yet released

    def takeover_message(self) -> str | None:
        """The log line that names the process whose lock was taken over (None if there was none)."""
        p = self.previous
        if p is None:
            return None
        return (f"{self.directory}: took over the lock of pid {p.pid} ({p.command}, started {p.started}), which "
                "ended without releasing it")

    def release(self) -> None:
        """Undo one :func:`acquire`; the last one deletes the lock file, then unlocks (a no-op when released
        already or in a forked child)."""
        self.count -= 1
        if self.count > 0 or self.fd < 0 or os.getpid() != self.pid:
            return
        _HELD.pop(self.directory, None)
        try:
            self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)  # closing drops the flock
        self.fd = -1

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


_HELD: dict[Path, RunLock] = {}  # this process's locks, by directory: acquiring one again returns it


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie answers kill(0) but has ended
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode("utf-8", "replace")


def acquire(directory: str | Path) -> RunLock:
    """Lock ``directory`` (created if missing) for this process, or raise :class:`DirInUse` naming the process
    that holds it. Acquiring a directory this process holds already returns that lock (released by as many
    :meth:`RunLock.release` calls as acquisitions)."""
    directory = Path(directory).resolve()
    if directory in _HELD:
        _HELD[directory].count += 1
        return _HELD[directory]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = None
            for _ in range(10):  # the holder writes its record just after it locks
                holder = Holder.parse(_read(fd))
                if holder:
                    break
                time.sleep(0.05)
            os.close(fd)
            raise DirInUse(directory, holder) from None
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                os.close(fd)
                raise
            holder = Holder.parse(_read(fd))  # no flock here: the record's pid decides
            if holder and holder.pid != os.getpid() and _alive(holder.pid):
                os.close(fd)
                raise DirInUse(directory, holder) from None
        try:  # the file we locked may have been released (deleted) since we opened it: then start over
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = Holder.parse(_read(fd))
    if previous is not None and previous.pid == os.getpid():
        previous = None
    me = Holder.me()
    os.ftruncate(fd, 0)
    os.pwrite(fd, me.dumps().encode(), 0)
    lock = _HELD[directory] = RunLock(directory, fd, previous)
    return lock


@atexit.register
def _release_all() -> None:
    for lock in list(_HELD.values()):
        lock.count = 1
        lock.release()


def is_launching_process() -> bool:
    """True unless this process is a worker rank (>0) of a distributed run (:data:`RANK_VARIABLES`)."""
    return all(os.environ.get(v, "0") in ("", "0") for v in RANK_VARIABLES)


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra is a dependency
    _HydraCallback = object


class RunLockCallback(_HydraCallback):
    """Hydra callback: lock the run (or sweep, and each job's) directory before Hydra writes into it; a refused
    command prints ``error: <dir> is in use by pid ...`` and exits 2. See the module docstring for the hooks."""

    def __init__(self) -> None:
        self._locks: dict[str, list[RunLock]] = {}

    def _take(self, hook: str, directory: str | Path) -> RunLock | None:
        if not is_launching_process():
            return None
        try:
            lock = acquire(directory)
        except DirInUse as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)  # a SystemExit: Hydra's callback runner catches Exception only (it would warn and go on)
        self._locks.setdefault(hook, []).append(lock)
        return lock

    def _drop(self, hook: str) -> None:
        for lock in self._locks.pop(hook, []):
            lock.release()

    @staticmethod
    def _select(config: Any, key: str) -> str:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        HydraConfig.instance().set_config(config)  # as run_job does first: ${hydra:...} in the directory resolves
        return str(OmegaConf.select(config, key))

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        # run_job resolves hydra.run.dir on this same config object; ${now:...} is cached on it, so both agree
        self._take("run", self._select(config, "hydra.run.dir"))

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._take("multirun", self._select(config, "hydra.sweep.dir"))

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        # a multirun job's own directory (a run's is held since on_run_start: acquire returns that lock). Job
        # logging is configured now, so a takeover is logged into the job's __main__.log.
        lock = self._take("job", config.hydra.runtime.output_dir)
        for held in [*self._locks.get("run", []), *self._locks.get("multirun", []), lock]:
            msg = held.takeover_message() if held is not None else None
            if msg:
                log.warning(msg)
                held.previous = None  # said once

    def on_job_end(self, config: Any, job_return: Any = None, **kwargs: Any) -> None:
        if "run" not in self._locks:
            self._drop("job")

    def on_run_end(self, config: Any, **kwargs: Any) -> None:
        self._drop("job")
        self._drop("run")

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        self._drop("multirun")
