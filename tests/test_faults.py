"""Faults that show only with several processes: two commands on one run (or pipeline) directory, and a rank of a
2-process FSDP run that dies or hangs mid-step (llama2_lit/run_lock.py; FSDP2Strategy in
llama2_lit/models/sharding.py)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llama2_lit.run_lock import LOCK_NAME, DirInUse, Holder, acquire
from tests.conftest import ROOT, SMALL
from tests.test_fsdp import TINY_BASE

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _main(*overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llama2_lit", *overrides], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def _listing(d: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``d`` with its size and modification time (ns)."""
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))}


def _refusal(d: Path, holder: Holder) -> str:
    return (f"error: {d} is in use by pid {holder.pid} ({holder.command}, started {holder.started}); "
            "wait for it or stop it")


def _dead_holder(d: Path) -> Holder:
    """Lock ``d`` from a helper process, SIGKILL it: its record stays in the lock file, its flock is gone."""
    helper = subprocess.Popen([sys.executable, "-c", "import sys, time; from llama2_lit.run_lock import acquire; "
                               "acquire(sys.argv[1]); print('held', flush=True); time.sleep(120)", str(d)],
                              cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    assert helper.stdout.readline().strip() == "held"
    helper.send_signal(signal.SIGKILL)
    assert helper.wait(timeout=30) == -signal.SIGKILL
    holder = Holder.parse((d / LOCK_NAME).read_text())
    assert holder is not None and holder.pid == helper.pid
    return holder


# -- two processes on one directory ---------------------------------------------------------------------------------
def test_lock_is_exclusive_between_processes_reentrant_within_one_and_gone_when_released(tmp_path):
    d = tmp_path / "run"
    lock = acquire(d)
    assert acquire(d) is lock  # this process again: the same lock (runs and their jobs both ask for it)
    mine = Holder.parse((d / LOCK_NAME).read_text())
    assert mine.pid == os.getpid()
    other = subprocess.run([sys.executable, "-c", "import sys; from llama2_lit.run_lock import acquire; "
                            "acquire(sys.argv[1])", str(d)], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert other.returncode == 1 and f"llama2_lit.run_lock.DirInUse: {_refusal(d, mine)[7:]}" in other.stderr
    lock.release()
    assert (d / LOCK_NAME).exists()  # acquired twice: still held after one release
    lock.release()
    assert not (d / LOCK_NAME).exists() and lock.fd == -1
    with acquire(d) as again:  # free again; a clean release left no record to take over
        assert again.previous is None


def test_a_killed_holder_is_taken_over_and_the_takeover_names_it(tmp_path):
    d = tmp_path / "run"
    dead = _dead_holder(d)
    with acquire(d) as lock:
        assert lock.previous == dead
        assert lock.takeover_message() == (f"{d}: took over the lock of pid {dead.pid} ({dead.command}, started "
                                           f"{dead.started}), which ended without releasing it")
        assert Holder.parse((d / LOCK_NAME).read_text()).pid == os.getpid()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from llama2_lit.run_lock import acquire; "
                               "acquire(sys.argv[1]); print('held', flush=True); time.sleep(120)", str(d)],
                              cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:  # a live holder is not taken over
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DirInUse, match=re.escape(f"{d} is in use by pid {holder.pid} (")):
            acquire(d)
    finally:
        holder.kill()
        holder.wait()


def test_second_run_on_a_run_dir_in_use_is_refused_before_writing_anything(tmp_path, cache_dir):
    d = tmp_path / "run"
    with acquire(d):  # this test process is "the first run"
        before = _listing(d)
        t0 = time.perf_counter()
        out = _main(*SMALL, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={d}")
        took = time.perf_counter() - t0
        holder = Holder.parse((d / LOCK_NAME).read_text())
        assert out.returncode == 2, out.stderr[-3000:]
        assert out.stderr.strip().splitlines()[-1] == _refusal(d, holder)
        assert holder.pid == os.getpid()
        assert _listing(d) == before == {LOCK_NAME: before[LOCK_NAME]}  # no .hydra/, no __main__.log, lock untouched
    print(f"\nrefused in {took:.1f} s")


def test_a_run_takes_over_the_lock_of_a_killed_run_and_logs_its_pid(tmp_path, cache_dir):
    d = tmp_path / "run"
    dead = _dead_holder(d)
    out = _main(*SMALL, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={d}")
    assert out.returncode == 0, out.stderr[-3000:]
    line = (f"{d}: took over the lock of pid {dead.pid} ({dead.command}, started {dead.started}), which ended "
            "without releasing it")
    said = [x for x in (d / "__main__.log").read_text().splitlines() if "took over" in x]
    assert len(said) == 1 and said[0].endswith(f"[llama2_lit.run_lock][WARNING] - {line}"), said
    assert (d / "metrics.json").is_file() and not (d / LOCK_NAME).exists()  # released at the end


def test_multirun_locks_its_sweep_dir_and_its_jobs_do_not_refuse_each_other(tmp_path):
    sweep = tmp_path / "sweep"
    with acquire(sweep):
        holder = Holder.parse((sweep / LOCK_NAME).read_text())
        out = _main("-m", "seed=1,2", "plan=true", f"hydra.sweep.dir={sweep}")
        assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == _refusal(sweep, holder)
        assert sorted(p.name for p in sweep.iterdir()) == [LOCK_NAME]  # no multirun.yaml, no job folder
    out = _main("-m", "seed=1,2", "plan=true", f"hydra.sweep.dir={sweep}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "multirun.yaml"]  # every lock released
    assert not list(sweep.rglob(LOCK_NAME))


def test_second_pipeline_on_a_pipeline_dir_in_use_is_refused_before_writing_anything(tmp_path, cache_dir):
    root = tmp_path / "runs" / "demo"
    with acquire(root):
        holder = Holder.parse((root / LOCK_NAME).read_text())
        before = _listing(root)
        out = _main("stage=pipeline", "pipeline.name=demo", f"paths.output_root={tmp_path}",
                    f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / 'pipeline_run'}")
        assert out.returncode == 2, out.stderr[-3000:]
        assert out.stderr.strip().splitlines()[-1] == _refusal(root.resolve(), holder)
        assert _listing(root) == before == {LOCK_NAME: before[LOCK_NAME]}  # no pipeline.json, no step folder


def test_pipeline_takes_over_the_lock_of_a_killed_pipeline_and_its_steps_run(make_cfg, tmp_path, caplog):
    from llama2_lit.stages.pipeline import run
    from tests.test_pipeline import fake_runner

    root = tmp_path / "p"
    dead = _dead_holder(root)
    calls: list = []
    held_during_steps = []

    def runner(step, extra):  # the steps run while the pipeline holds its root (they lock their own folders)
        held_during_steps.append(Holder.parse((root / LOCK_NAME).read_text()).pid)
        fake_runner(calls)(step, extra)

    with caplog.at_level("WARNING", logger="llama2_lit.stages.pipeline"):
        run(make_cfg("stage=pipeline", f"pipeline.root={root}", "pipeline.iterations=1", "pipeline.evaluate=false",
                     out=tmp_path / "run"), runner=runner)
    assert [r.getMessage() for r in caplog.records if "took over" in r.getMessage()] == [
        f"pipeline: {root}: took over the lock of pid {dead.pid} ({dead.command}, started {dead.started}), which "
        "ended without releasing it"]
    assert [c[0] for c in calls] == ["v0/sft", "v0/rm_sft", "v1/collect", "v1/rm_helpfulness", "v1/rm_safety",
                                     "v1/rs", "v1/rs_distill"]  # model=tiny's pipeline: the RMs' own SFT too
    assert set(held_during_steps) == {os.getpid()} and not (root / LOCK_NAME).exists()


# -- a rank that dies or hangs mid-step ------------------------------------------------------------------------------
TINY = [*TINY_BASE,  # tests/test_fsdp.py's tiny 2-rank run, trained until stopped (checkpoints every step)
    "stage.max_epochs=1000",
    "callbacks.checkpoint.every_n_steps=1",
]
TIMEOUT_MIN = 0.25  # trainer.strategy.timeout_minutes: 15 s


def _children(pid: int) -> list[int]:
    return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.slow
@pytest.mark.fsdp
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_a_lost_rank_stops_the_run_with_one_line_naming_it_and_ckpt_last_resumes(tmp_path, cache_dir, sig):
    run_dir = tmp_path / "run"
    common = [*TINY, "trainer=fsdp", "trainer.devices=2", "trainer.accelerator=cpu", "stage.batch_size=2",
              f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}",
              f"trainer.strategy.timeout_minutes={TIMEOUT_MIN}"]
    err_file = tmp_path / "stderr.txt"
    with open(tmp_path / "stdout.txt", "w") as out, open(err_file, "w") as err:
        launcher = subprocess.Popen([sys.executable, "-m", "llama2_lit", *common, "trainer.max_steps=2000"], cwd=ROOT,
                                    env=ENV, stdout=out, stderr=err)
    victim = None
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoints" / "last.ckpt").exists():  # mid-training: a checkpoint every step
            assert launcher.poll() is None and time.monotonic() < deadline, err_file.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(1.0)
        (victim,) = _children(launcher.pid)  # rank 1: Lightning's launcher starts it as rank 0's child
        assert "hydra.job.name=train_ddp_process_1" in Path(f"/proc/{victim}/cmdline").read_text()
        os.kill(victim, sig)
        t0 = time.monotonic()
        rc = launcher.wait(timeout=TIMEOUT_MIN * 60 + 60)
        took = time.monotonic() - t0
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        if victim is not None and Path(f"/proc/{victim}").exists() and sig == signal.SIGSTOP:
            os.kill(victim, signal.SIGKILL)  # rank 0 kills it; this is for a failed run only
    lines = err_file.read_text().strip().splitlines()
    print(f"\n{sig.name}: the launcher ended {took:.1f} s after rank 1 stopped (timeout {TIMEOUT_MIN * 60:.0f} s): "
          f"{lines[-1]}")
    assert rc == 69, "\n".join(lines[-40:])
    why = "it was killed by SIGKILL" if sig == signal.SIGKILL else r"it is stopped \(SIGSTOP or a debugger\)"
    m = re.fullmatch(rf"error: rank 1 \(pid {victim}\) stopped answering: {why}; rerun the same command with "
                     rf"ckpt_path=last hydra\.run\.dir={re.escape(str(run_dir))} to resume from "
                     rf"{re.escape(str(run_dir / 'checkpoints'))}/epoch=\d+-step=(\d+)\.ckpt", lines[-1])
    assert m, lines[-1]
    assert not any(line.startswith("Traceback") for line in lines)
    if sig == signal.SIGKILL:  # a dead peer: gloo fails at once (connection reset); the line within seconds
        assert took < 15
    else:  # a hung peer: the collective times out after timeout_minutes; rank 0 then kills rank 1
        assert TIMEOUT_MIN * 60 - 1 < took < TIMEOUT_MIN * 60 + 45
        assert launcher.returncode == 69 and (not Path(f"/proc/{victim}").exists()
                                              or Path(f"/proc/{victim}/stat").read_text().split()[2] == "Z")
        return
    step = int(m.group(1))
    resumed = _main(*common, "ckpt_path=last", f"trainer.max_steps={step + 2}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    logs = resumed.stdout + resumed.stderr
    assert f"Restoring states from the checkpoint path at {run_dir / 'checkpoints' / 'last.ckpt'}" in logs
    assert json.loads((run_dir / "metrics.json").read_text())["trainer/steps"] == step + 2
    tail = [json.loads(x)["step"] for x in (run_dir / "steps.jsonl").read_text().splitlines()[-2:]]
    assert tail == [step + 1, step + 2]
