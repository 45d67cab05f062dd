"""A rank of a sharded run (``trainer=fsdp``) that dies or stops answering: detected, named in one line, exit 69.

``FSDP2Strategy`` (``models/sharding.py``) wires this in: rank 0 is the parent of the other ranks of its node
(Lightning's ``_SubprocessScriptLauncher``), so it polls them (:class:`_RankObserver`, which replaces Lightning's
observer: that one SIGKILLs rank 0 without a word); a child rank watches its parent's pid; ``python -m llama2_lit``
turns the failed collective of a surviving rank into the line (:func:`rank_lost`). Relies on private Lightning and
torch internals (``_SubprocessScriptLauncher``, ``_ChildProcessObserver``, ``_set_pg_timeout``, ``c10d._world``).
"""
from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from llama2_lit.models.sharding import FSDP2Strategy

log = logging.getLogger(__name__)

RANK_LOST_EXIT_CODE = 69  # EX_UNAVAILABLE: a rank of the run is gone; python -m llama2_lit exits with it


class RankLost(Exception):
    """A rank of a sharded run died or stopped answering; ``str()`` is the one line the entry point prints."""

    exit_code = RANK_LOST_EXIT_CODE


class _Peers:
    """What this process knows of the other ranks of its node: ``procs`` (rank 0: the ``Popen`` of local ranks
    1..N-1, from the launcher), ``parent`` (a child rank: rank 0's pid), ``first_rank`` (the node's rank 0)."""

    def __init__(self) -> None:
        self.procs: list = []
        self.parent: int | None = None
        self.first_rank = 0
        self.strategy: FSDP2Strategy | None = None
        self.active = False  # inside fit/validate: rank 0 going away now is a loss
        self.report = threading.Lock()  # the one line is printed once: by the main thread or the observer


_PEERS = _Peers()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def lost_ranks(stopped: bool = False, inactive: bool = False) -> list[tuple[int, int, str]]:
    """``(rank, pid, what happened)`` for each rank of this node known to be gone: rank 0 sees its children's exit
    codes (a non-zero one; ``stopped``: also one stopped by a signal), a child rank sees rank 0 (its parent)
    replaced by another parent (while training runs, or always with ``inactive``)."""
    import signal

    out = []
    for i, proc in enumerate(_PEERS.procs, start=1):
        code = proc.poll()
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            out.append((_PEERS.first_rank + i, proc.pid, f"it was killed by {name}"))
        elif code:
            out.append((_PEERS.first_rank + i, proc.pid, f"it exited with code {code}"))
        elif code is None and stopped and _state(proc.pid) in ("T", "t"):
            out.append((_PEERS.first_rank + i, proc.pid, "it is stopped (SIGSTOP or a debugger)"))
    if _PEERS.parent is not None and (_PEERS.active or inactive) and os.getppid() != _PEERS.parent:
        out.append((_PEERS.first_rank, _PEERS.parent, "its process ended"))
    return out


def _resume_hint() -> str:
    """Where to resume from: the run's newest checkpoint (``ckpt_path=last`` in the same run directory)."""
    try:
        trainer = _PEERS.strategy.lightning_module.trainer
        ckpts = [c for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)]
        ckpt = next((c for c in ckpts if getattr(c, "save_last", False)), ckpts[0] if ckpts else None)
        run_dir, ckpt_dir = Path(trainer.default_root_dir).resolve(), Path(ckpt.dirpath) if ckpt else None
    except Exception:  # noqa: BLE001 - a hint only
        return "rerun the same command with ckpt_path=last in the same run directory (hydra.run.dir=<run>) to resume"
    last = ckpt_dir / "last.ckpt" if ckpt_dir else None
    if last is not None and last.exists():
        return (f"rerun the same command with ckpt_path=last hydra.run.dir={run_dir} to resume from "
                f"{os.path.realpath(last)}")
    return f"no checkpoint was written yet (in {ckpt_dir or run_dir}): rerun the same command to start again"


def _message(lost: list[tuple[int, int, str]], comm: str | None) -> str:
    if lost:
        who = " and ".join(f"rank {r} (pid {pid}) stopped answering: {why}" for r, pid, why in lost)
    else:
        who = f"a rank stopped answering ({comm})"
    return f"{who}; {_resume_hint()}"


def _comm_error(exc: BaseException | None) -> str | None:
    """The gist of a failed collective in ``exc``'s chain (gloo: "Connection reset by peer", "Timed out waiting
    6000ms for recv operation to complete"), or None when ``exc`` is no communication error."""

    dist_error = getattr(torch.distributed, "DistError", ())
    while exc is not None:
        text = str(exc)
        if isinstance(exc, dist_error) or (isinstance(exc, RuntimeError) and re.search(
                r"gloo|Connection (reset|closed) by peer|Broken pipe|Timed out waiting", text)):
            line = re.sub(r"^\[[^\]]*\]\s*", "", text.strip().splitlines()[0] if text.strip() else type(exc).__name__)
            return line.split(". This is typically")[0][:200]
        exc = exc.__cause__ or exc.__context__
    return None


def _kill_children() -> None:
    import signal

    for proc in _PEERS.procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)  # SIGTERM does not stop a rank blocked in a collective


def rank_lost(exc: BaseException, wait_s: float = 3.0) -> RankLost | None:
    """The :class:`RankLost` behind ``exc`` (raised in a sharded run), or None when no rank was lost.

    ``exc`` is a failed collective (a peer's socket closed, or a timeout), or any error while a rank of this node is
    known to be gone. A rank killed a moment ago may not have been reaped yet: up to ``wait_s`` is given to name
    it. Rank 0 kills its remaining children (they would wait in their collectives) before it returns."""
    if _PEERS.strategy is None:
        return None
    comm = _comm_error(exc)
    lost = lost_ranks(stopped=True, inactive=True)
    deadline = time.monotonic() + (wait_s if comm else 0.0)
    while not lost and time.monotonic() < deadline:
        time.sleep(0.1)
        lost = lost_ranks(stopped=True, inactive=True)
    if not lost and comm is None:
        return None
    if not _PEERS.report.acquire(blocking=False):
        time.sleep(60)  # the observer is printing the line and ending this process
    _kill_children()
    return RankLost(_message(lost, comm))


def _set_collective_timeout(timeout: timedelta) -> None:
    """Every process group of this rank (the world's and the device mesh's) times its collectives out after
    ``timeout`` (the rendezvous ran with the longer join timeout)."""
    import torch.distributed.distributed_c10d as c10d

    setter = getattr(c10d, "_set_pg_timeout", None)
    if setter is None:  # private torch API (2.3+): without it the join timeout stays in force
        log.warning("trainer.strategy.timeout_minutes: this torch cannot change a process group's timeout; "
                    "collectives time out after the join timeout")
        return
    for group in list(c10d._world.pg_map):
        try:
            setter(timeout, group)
        except (ValueError, RuntimeError, AssertionError) as e:  # a group this rank is not in
            log.debug("timeout of %s not set: %s", group, e)


def _observer_base():
    from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

    return _ChildProcessObserver


class _RankObserver(_observer_base()):
    """Lightning's child-process observer thread, reporting instead of SIGKILLing rank 0 without a word.

    Every 0.5 s: rank 0 polls its child ranks, a child rank its parent (rank 0). A rank gone gives the main thread
    ``grace`` seconds to report it itself (its collective fails; ``python -m llama2_lit`` prints the line and exits
    cleanly: logs flushed, the run directory's lock released). After that this thread prints the line, kills the
    remaining child ranks and ends the process with :data:`RANK_LOST_EXIT_CODE`: a main thread blocked in a
    collective that does not time out cannot hang the run."""

    def __init__(self, child_processes: list, grace: float) -> None:
        super().__init__(main_pid=os.getpid(), child_processes=child_processes, sleep_period=0.5)
        self.name = "rank-observer"
        self._grace, self._since = grace, None

    def _run(self) -> bool:
        lost = lost_ranks()
        if not lost:
            self._since = None
            return bool(self._child_processes) and all(p.returncode == 0 for p in self._child_processes)
        now = time.monotonic()
        self._since = self._since or now
        if now - self._since < self._grace:
            return False
        if _PEERS.report.acquire(blocking=False):
            print(f"error: {_message(lost, None)}", file=sys.stderr, flush=True)
            _kill_children()
            sys.stdout.flush()
            os._exit(RANK_LOST_EXIT_CODE)
        if now - self._since > 4 * self._grace:  # the main thread claimed the report but does not end
            os._exit(RANK_LOST_EXIT_CODE)
        return False


def _launcher_base():
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    return _SubprocessScriptLauncher


class _WatchedLauncher(_launcher_base()):
    """Lightning's ``_SubprocessScriptLauncher`` (rank 0 starts ranks 1..N-1 of its node as child processes),
    with :class:`_RankObserver` instead of Lightning's observer. (The ranks it starts have no launcher: they find
    their environment's processes created; :func:`_watch_parent`.)"""

    def __init__(self, cluster_environment, num_processes: int, num_nodes: int, grace: float) -> None:
        super().__init__(cluster_environment, num_processes, num_nodes)
        self.grace = grace

    def launch(self, function, *args: Any, trainer=None, **kwargs: Any) -> Any:
        from lightning.fabric.utilities.distributed import _set_num_threads_if_needed

        env = self.cluster_environment
        env.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not env.creates_processes_externally:
            self._call_children_scripts()
            _PEERS.first_rank, _PEERS.procs = env.node_rank() * self.num_processes, self.procs
            _RankObserver(self.procs, self.grace).start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)


def _watch_parent(env, num_processes: int, grace: float) -> None:
    """In a rank that rank 0's launcher started (Lightning's environment, ``LOCAL_RANK`` > 0): watch the parent,
    rank 0, with :class:`_RankObserver`. Ranks of torchrun or SLURM have another parent: nothing to watch."""
    if type(env).__name__ != "LightningEnvironment" or env.local_rank() <= 0 or _PEERS.parent is not None:
        return
    _PEERS.first_rank, _PEERS.parent = env.node_rank() * num_processes, os.getppid()
    _RankObserver([], grace).start()
