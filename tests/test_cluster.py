"""Launching on a cluster (docs/cluster.md): trainer=ddp, the submitit SLURM sweep launcher, and the sbatch files
with their requeue-on-75 logic (scripts/slurm/), run here with fake srun / scontrol commands on PATH."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import pytest

from callbacks.preemption import PREEMPTED_EXIT_CODE, Preemption
from tests.conftest import ROOT
from tests.test_fsdp import TINY_BASE

SLURM_DIR = ROOT / "scripts" / "slurm"
SBATCH = SLURM_DIR / "train.sbatch"
REQUEUE = SLURM_DIR / "requeue.sh"
RANK = SLURM_DIR / "rank.sh"
LAUNCHER_TARGET = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
# what a distributed launcher or SLURM sets: kept out of the child processes of these tests
_FOREIGN = ("LOCAL_RANK", "NODE_RANK", "RANK", "GROUP_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# a 2-process DDP run on CPU (tests/test_fsdp.py's TINY_BASE shrinks the model and the data)
DDP_CPU = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.precision=32-true",
           "stage.batch_size=4"]

FAKE_SRUN = r"""#!/usr/bin/env bash
# fake srun: SLURM_NTASKS copies of the command on this machine (SLURM_PROCID / SLURM_LOCALID set), SIGUSR1 and
# SIGTERM passed on to every copy, exit status the highest of theirs (as srun's)
while [ "${1#-}" != "$1" ]; do shift; done
pids=()
for ((i = 0; i < ${SLURM_NTASKS:-1}; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 "$@" &
    pids+=($!)
done
trap 'kill -USR1 "${pids[@]}" 2>/dev/null' USR1
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
rc=0
for p in "${pids[@]}"; do
    while :; do
        wait "$p"; s=$?
        if [ "$s" -gt 128 ] && kill -0 "$p" 2>/dev/null; then continue; fi
        break
    done
    if [ "$s" -gt "$rc" ]; then rc=$s; fi
done
exit "$rc"
"""
FAKE_SCONTROL = r"""#!/usr/bin/env bash
# fake scontrol: records its arguments; `show hostnames` names this machine
echo "$*" >> "$FAKE_SCONTROL_LOG"
if [ "$1" = show ]; then echo 127.0.0.1; exit 0; fi
exit "${FAKE_SCONTROL_EXIT:-0}"
"""
FAKE_PYTHON = r"""#!/usr/bin/env bash
# fake python: records each rank's arguments and environment, exits with $FAKE_EXIT
{ printf '%s\n' "$@"; } > "$FAKE_OUT/args.$SLURM_PROCID"
env > "$FAKE_OUT/env.$SLURM_PROCID"
exit "${FAKE_EXIT:-0}"
"""


def _bin(tmp_path: Path, **scripts: str) -> Path:
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    for name, text in scripts.items():
        (d / name).write_text(text)
        (d / name).chmod(0o755)
    return d


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without SLURM's or a distributed launcher's variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in _FOREIGN}
    env.update(extra)
    return env


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """:func:`_clean_env` with fake scontrol and srun first on PATH."""
    env = _clean_env()
    fake = _bin(tmp_path, srun=FAKE_SRUN, scontrol=FAKE_SCONTROL)
    env.update(PATH=f"{fake}:{env.get('PATH', '')}", FAKE_SCONTROL_LOG=str(tmp_path / "scontrol.log"))
    env.update(extra)
    return env


def _scontrol_calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "scontrol.log"
    return log.read_text().splitlines() if log.exists() else []


def _bash(script: str, env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


# -- trainer=ddp -----------------------------------------------------------------------------------------------------
def test_ddp_config_composes_into_a_ddp_trainer_with_global_batches(make_cfg):
    from lightning.pytorch.strategies import DDPStrategy

    from llama2_lit.run import build

    cfg = make_cfg("trainer=ddp", small=False)
    assert cfg.trainer.strategy._target_ == "lightning.pytorch.strategies.DDPStrategy"
    assert (cfg.trainer.devices, cfg.trainer.num_nodes, cfg.trainer.precision) == ("auto", 1, "bf16-mixed")
    assert cfg.trainer.use_distributed_sampler is True
    # the RM's pair batch sampler deals batches to ranks itself (trainer/default.yaml reads stage.*)
    assert make_cfg("trainer=ddp", "stage=rm", small=False).trainer.use_distributed_sampler is False
    # one process of it on CPU builds (the override the config's comments give for CPU: 32-true)
    dm, module, trainer = build(make_cfg("trainer=ddp", "trainer.devices=1", "trainer.accelerator=cpu",
                                         "trainer.precision=32-true"))
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.world_size == 1
    assert trainer.strategy._timeout == timedelta(minutes=30)  # instantiated from the YAML
    assert dm.batch_size == 4  # stage.batch_size=4 (SMALL) on one rank
    assert next(p for p in module.parameters()).device.type != "meta"  # a whole replica, not FSDP's meta build


def test_ddp_under_slurm_takes_the_ranks_from_slurm_and_the_sbatch_turns_lightnings_requeue_off(make_cfg, monkeypatch):
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from llama2_lit.run import _trainer_cfg

    for k in [k for k in os.environ if k.startswith("SLURM_")] + list(_FOREIGN):
        monkeypatch.setenv(k, "")  # recorded, so that the teardown restores even what Lightning sets (MASTER_*)
        monkeypatch.delenv(k)
    for k, v in dict(SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", SLURM_NNODES="1", SLURM_PROCID="0",
                     SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_JOB_ID="81234", SLURM_JOB_NAME="llama2-lit",
                     SLURM_NODELIST="node[001-004]").items():
        monkeypatch.setenv(k, v)
    plugin = next(line.split("=", 1)[1].strip("'") for line in SBATCH.read_text().splitlines()
                  if line.startswith("LIGHTNING_SLURM="))
    common = ["trainer=ddp", "trainer.devices=1", "trainer.accelerator=cpu", "trainer.precision=32-true"]
    usr1 = signal.getsignal(signal.SIGUSR1)

    def trainer_of(*extra: str) -> L.Trainer:
        return instantiate(_trainer_cfg(make_cfg(*common, *extra))[0], logger=False)

    # without the plugin Lightning finds SLURM itself, with auto-requeue: its SIGUSR1 handler would requeue
    env = trainer_of().strategy.cluster_environment
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue
    # with train.sbatch's plugin override: the same environment (ranks, rank 0's address and port from SLURM)...
    trainer = trainer_of(plugin)
    env = trainer.strategy.cluster_environment
    assert isinstance(env, SLURMEnvironment) and not env.auto_requeue
    assert (env.world_size(), env.global_rank(), env.main_address, env.main_port) == (1, 0, "node001", 15000 + 1234)
    # ...and no SIGUSR1 handler of Lightning's: the batch script is the only one to requeue
    trainer._signal_connector.register_signal_handlers()
    try:
        assert signal.getsignal(signal.SIGUSR1) == usr1
    finally:
        trainer._signal_connector.teardown()


def _ddp_cmd(run_dir: Path, cache_dir: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "llama2_lit", *TINY_BASE, *DDP_CPU, f"paths.cache_dir={cache_dir}",
            f"hydra.run.dir={run_dir}", *extra]


@pytest.mark.slow
@pytest.mark.fsdp
def test_ddp_two_processes_on_cpu_train_a_tiny_sft(tmp_path, cache_dir):
    from tests.test_fsdp import _probe

    run_dir = tmp_path / "run"
    t0 = time.perf_counter()
    proc = subprocess.run(_ddp_cmd(run_dir, cache_dir, "trainer.max_steps=3",
                                   "+callbacks.probe._target_=tests.test_fsdp.Probe"),
                          cwd=ROOT, env=_clean_env(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"),
                          capture_output=True, text=True, timeout=300)
    took = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = _probe(run_dir, 0), _probe(run_dir, 1)
    assert (r0["world"], r1["world"]) == (2, 2)
    assert r0["local_params"] == r1["local_params"] == r0["total_params"]  # DDP: every rank a whole replica
    assert sorted(r0["loss"]) == [1, 2, 3] and r0["loss"] == r1["loss"]  # the global batch's loss on every rank
    assert "4 sequences per step (global) = 2 ranks x 2 per rank" in proc.stdout + proc.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["trainer/steps"] == 3.0
    assert (run_dir / "hf" / "config.json").is_file() and (run_dir / "train_ddp_process_1.log").is_file()
    print(f"\n2-process DDP SFT on CPU (3 steps): {took:.1f} s")


@pytest.mark.slow
@pytest.mark.fsdp
def test_ddp_sigusr1_to_one_rank_stops_every_rank_with_75(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    cmd = _ddp_cmd(run_dir, cache_dir, "stage.max_epochs=1000", "trainer.max_steps=100000",
                   "callbacks.checkpoint.every_n_steps=1")
    with open(tmp_path / "err.txt", "w") as err:
        launcher = subprocess.Popen(cmd, cwd=ROOT, env=_clean_env(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"),
                                    stdout=err, stderr=err)
    children: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoints" / "last.ckpt").exists():
            assert launcher.poll() is None and time.monotonic() < deadline, (tmp_path / "err.txt").read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(1.0)
        children = [int(x) for x in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()]
        os.kill(children[0], signal.SIGUSR1)  # rank 1 only (Lightning's launcher starts it as rank 0's child)
        rc = launcher.wait(timeout=120)
    finally:
        for pid in [launcher.pid, *children]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        launcher.wait()
    text = (tmp_path / "err.txt").read_text()
    assert rc == PREEMPTED_EXIT_CODE and "Traceback" not in text, text[-3000:]


# -- hydra/launcher=submitit_slurm -----------------------------------------------------------------------------------
def _compose_with_hydra(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from llama2_lit.config import CONF_DIR

    with warnings.catch_warnings():
        # conf/hydra/launcher/submitit_slurm.yaml has the name of the plugin's structured config, which Hydra 1.3
        # still validates it against (with a deprecation warning; the file lists every field, so it stands alone)
        warnings.filterwarnings("ignore", message=r"(?s).*validated against ConfigStore schema")
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # ${hydra:...} and the sweep directory resolve as in a run
    return cfg


def test_submitit_slurm_launcher_composes_for_a_sweep_and_writes_a_valid_sbatch(tmp_path, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="hydra-submitit-launcher is not installed (pip install hydra-submitit-launcher)")
    submitit = pytest.importorskip("submitit")
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from omegaconf import OmegaConf

    base = ["hydra/launcher=submitit_slurm", "experiment=rm_margin_sweep", f"paths.output_root={tmp_path}",
            f"paths.output_dir={tmp_path}/out", "hydra.launcher.partition=gpu"]
    cfg = _compose_with_hydra(base)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == LAUNCHER_TARGET
    assert (launcher.partition, launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 1, 1, 1)
    assert launcher.additional_parameters.requeue is True and launcher.signal_delay_s == 120
    assert str(launcher.submitit_folder).startswith(f"{tmp_path}/multirun/rm/")
    # every field of the plugin's schema is here, with the schema's types
    plain = OmegaConf.to_container(launcher, resolve=True)
    assert set(plain) == set(OmegaConf.structured(SlurmQueueConf).keys())
    OmegaConf.merge(OmegaConf.structured(SlurmQueueConf), plain)

    # -m: the sweeper's job lists (experiment=rm_margin_sweep sweeps reward.margin), each composed as its job
    sweep = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    (jobs,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(sweep), None)
    assert jobs == [["reward.margin=none"], ["reward.margin=small"], ["reward.margin=large"]]
    unresolved = OmegaConf.to_container(launcher)  # (the sweep directory's timestamp is resolved per compose)
    for job in jobs:
        job_cfg = _compose_with_hydra(base + job)
        assert job_cfg.reward.margin == job[0].split("=")[1]
        assert OmegaConf.to_container(job_cfg.hydra.launcher) == unresolved

    # a multi-GPU point: one task per GPU
    multi = _compose_with_hydra(base + ["trainer=ddp", "trainer.devices=4", "hydra.launcher.gpus_per_node=4"])
    assert multi.hydra.launcher.tasks_per_node == 4 == multi.trainer.devices

    # the launcher as Hydra builds it, and the sbatch file submitit would submit (submitit wants srun on PATH)
    monkeypatch.setenv("PATH", f"{_bin(tmp_path, srun=FAKE_SRUN)}:{os.environ.get('PATH', '')}")
    slurm = instantiate(cfg.hydra.launcher)
    assert type(slurm).__module__ + "." + type(slurm).__name__ == LAUNCHER_TARGET
    params = dict(slurm.params)  # what SlurmLauncher.launch hands to submitit
    executor = submitit.AutoExecutor(folder=params.pop("submitit_folder"), cluster="slurm",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    common = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in common else f"slurm_{k}": v for k, v in params.items()})
    text = executor._executor._make_submission_file_text("python -u -m submitit.core._submit X", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64GB", "#SBATCH --time=240", "#SBATCH --requeue",
                 "#SBATCH --job-name=llama2-lit-rm", "export OMP_NUM_THREADS=8"):
        assert line in text.splitlines(), (line, text)
    assert "#SBATCH --signal=" in text  # submitit's own timeout warning (USR2 by default)


# -- scripts/slurm ---------------------------------------------------------------------------------------------------
def test_slurm_scripts_parse_and_hold_the_requeue_on_75_logic():
    for f in sorted(SLURM_DIR.iterdir()):
        r = subprocess.run(["bash", "-n", str(f)], capture_output=True, text=True)
        assert r.returncode == 0, (f.name, r.stderr)
    for f in (SBATCH, RANK):
        assert os.access(f, os.X_OK), f.name
    text = SBATCH.read_text()
    sbatch = [line.split()[1] for line in text.splitlines() if line.startswith("#SBATCH")]
    for flag in ("--requeue", "--open-mode=append", "--ntasks-per-node=8", "--gpus-per-node=8", "--nodes=1"):
        assert flag in sbatch, flag
    (sig,) = [s for s in sbatch if s.startswith("--signal=")]
    name = sig.split("=", 1)[1].removeprefix("B:").split("@")[0]
    assert sig.startswith("--signal=B:") and f"SIG{name}" in Preemption().signals  # a signal the callback handles
    for piece in ("source scripts/slurm/requeue.sh", 'requeue_after_run "$status"', "resume_override",
                  "run_forwarding_signals srun scripts/slurm/rank.sh", "trainer.num_nodes=$NODES",
                  "trainer.devices=$TASKS_PER_NODE", "hydra.run.dir=$RUN_DIR", "auto_requeue:false",
                  "export MASTER_ADDR MASTER_PORT"):
        assert piece in text, piece
    requeue = REQUEUE.read_text()
    assert f"PREEMPTED_EXIT_CODE={PREEMPTED_EXIT_CODE}" in requeue and 'scontrol requeue "$job"' in requeue


@pytest.mark.parametrize("status", [0, 1, 2, PREEMPTED_EXIT_CODE, 137])
def test_requeue_calls_scontrol_requeue_exactly_on_exit_code_75(tmp_path, status):
    env = _env(tmp_path, SLURM_JOB_ID="4242")
    r = _bash(f"source {REQUEUE}; requeue_if_preempted {status}; echo returned=$?", env)
    assert r.stdout.strip() == f"returned={status}"  # the status goes on unchanged
    assert _scontrol_calls(tmp_path) == (["requeue 4242"] if status == PREEMPTED_EXIT_CODE else [])
    # an explicit job id wins over SLURM_JOB_ID
    (tmp_path / "scontrol.log").unlink(missing_ok=True)
    _bash(f"source {REQUEUE}; requeue_if_preempted {status} 99_3", env)
    assert _scontrol_calls(tmp_path) == (["requeue 99_3"] if status == PREEMPTED_EXIT_CODE else [])


def test_requeue_outside_slurm_or_when_scontrol_fails_keeps_the_status(tmp_path):
    r = _bash(f"source {REQUEUE}; requeue_if_preempted 75; echo returned=$?", _env(tmp_path))
    assert r.stdout.strip() == "returned=75" and _scontrol_calls(tmp_path) == []
    assert "outside a SLURM job: not requeued" in r.stderr
    r = _bash(f"source {REQUEUE}; requeue_if_preempted 75; echo returned=$?",
              _env(tmp_path, SLURM_JOB_ID="7", FAKE_SCONTROL_EXIT="1"))
    assert r.stdout.strip() == "returned=75" and _scontrol_calls(tmp_path) == ["requeue 7"]
    assert "scontrol requeue 7 failed" in r.stderr


def test_resume_override_only_when_the_run_directory_holds_a_checkpoint(tmp_path):
    run = tmp_path / "run"

    def resume() -> str:
        return _bash(f"source {REQUEUE}; resume_override {run}", _env(tmp_path)).stdout.strip()

    assert resume() == ""  # a fresh job: no ckpt_path (ckpt_path=last would be an error)
    (run / "checkpoints").mkdir(parents=True)
    assert resume() == ""
    (run / "checkpoints" / "last.ckpt").symlink_to("epoch=0-step=7.ckpt")  # dangling: llama2_lit falls back
    assert resume() == "ckpt_path=last"
    (run / "checkpoints" / "last.ckpt").unlink()
    (run / "checkpoints" / "last.ckpt").mkdir()  # a sharded (FSDP) checkpoint folder
    assert resume() == "ckpt_path=last"


def _run_signalled(tmp_path: Path, *signals: signal.Signals, shell_gets_them: bool = True) -> tuple[str, str]:
    """A batch shell that runs a stand-in for srun with run_forwarding_signals, then requeue_after_run; ``signals``
    are sent to the shell one by one (or, ``shell_gets_them=False``, to the stand-in alone). The stand-in exits with
    75 on SIGTERM, and on SIGUSR1 unless SIGTERM is to follow (a checkpoint slower than the warning). Out and err."""
    ready = tmp_path / "ready"
    ready.unlink(missing_ok=True)
    run = tmp_path / "run.sh"
    usr1 = "true" if signal.SIGTERM in signals else f"kill $s; exit {PREEMPTED_EXIT_CODE}"
    run.write_text(f"trap '{usr1}' USR1\ntrap 'kill $s; exit {PREEMPTED_EXIT_CODE}' TERM\n"
                   f"sleep 30 & s=$!\ntouch {ready}\nwhile kill -0 $s 2>/dev/null; do wait $s; done\nexit 0\n")
    script = (f"source {REQUEUE}; run_forwarding_signals bash {run}; status=$?; "
              "requeue_after_run $status; echo status=$status")
    shell = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=_env(tmp_path, SLURM_JOB_ID="555"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert shell.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    target = shell.pid
    if not shell_gets_them:  # e.g. scancel --signal=USR1 <job>: the steps get it, not the batch shell
        target = int(subprocess.check_output(["pgrep", "-P", str(shell.pid), "-f", str(run)]).split()[0])
    for sig in signals:
        os.kill(target, sig)
        time.sleep(0.3)
    out, err = shell.communicate(timeout=20)
    return out.strip(), err


def test_sigusr1_to_the_batch_shell_reaches_the_run_and_its_exit_75_requeues(tmp_path):
    out, err = _run_signalled(tmp_path, signal.SIGUSR1)  # what sbatch --signal=B:USR1@120 does
    assert out == f"status={PREEMPTED_EXIT_CODE}", err
    assert "SIGUSR1 received: passed on to the run" in err
    assert _scontrol_calls(tmp_path) == ["requeue 555"]
    for signals, to_shell in (((signal.SIGUSR1,), False),  # the ranks signalled, not the batch shell
                              ((signal.SIGUSR1, signal.SIGTERM), True)):  # the time limit came before the exit
        (tmp_path / "scontrol.log").unlink()
        out, err = _run_signalled(tmp_path, *signals, shell_gets_them=to_shell)
        assert out == f"status={PREEMPTED_EXIT_CODE}" and _scontrol_calls(tmp_path) == ["requeue 555"], err
    # no signal: the command's own status, nothing requeued
    (tmp_path / "scontrol.log").unlink()
    r = _bash(f"source {REQUEUE}; run_forwarding_signals bash -c 'exit 3'; status=$?; requeue_after_run $status; "
              "echo status=$status", _env(tmp_path, SLURM_JOB_ID="555"))
    assert r.stdout.strip() == "status=3" and _scontrol_calls(tmp_path) == []


def test_sigterm_alone_to_the_batch_shell_checkpoints_but_does_not_requeue(tmp_path):
    """scancel (and a preemption, which SLURM requeues itself) sends SIGTERM: the run stops with 75 all the same,
    but a cancelled job must stay cancelled."""
    out, err = _run_signalled(tmp_path, signal.SIGTERM)
    assert out == f"status={PREEMPTED_EXIT_CODE}", err
    assert "SIGTERM received: passed on to the run" in err and "not requeued" in err
    assert _scontrol_calls(tmp_path) == []


def test_rank_script_gives_ranks_above_0_their_own_log_and_no_hydra_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    env = _env(tmp_path, PYTHON=str(_bin(tmp_path, python=FAKE_PYTHON) / "python"), FAKE_OUT=str(out))
    for rank in (0, 3):
        r = subprocess.run([str(RANK), "stage=sft", "a=b c"], env={**env, "SLURM_PROCID": str(rank)},
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    assert (out / "args.0").read_text().splitlines() == ["-m", "llama2_lit", "stage=sft", "a=b c"]
    assert (out / "args.3").read_text().splitlines() == [
        "-m", "llama2_lit", "stage=sft", "a=b c", "hydra.output_subdir=null", "hydra.job.name=train_ddp_process_3"]


def _sbatch_env(tmp_path: Path, job_id: str, run_dir: Path, **extra: str) -> dict[str, str]:
    """What SLURM gives a batch script of 1 node x 2 tasks (the #SBATCH lines are not read outside sbatch)."""
    return _env(tmp_path, SLURM_JOB_ID=job_id, SLURM_JOB_NAME="cluster-test", SLURM_NNODES="1", SLURM_NTASKS="2",
                SLURM_NTASKS_PER_NODE="2", SLURM_JOB_NODELIST="localhost", SLURM_SUBMIT_DIR=str(ROOT),
                SLURM_CPUS_PER_TASK="1", RUN_DIR=str(run_dir), **extra)


@pytest.mark.parametrize("status", [0, 1, PREEMPTED_EXIT_CODE])
def test_sbatch_passes_slurms_layout_to_every_rank_and_requeues_only_on_75(tmp_path, status):
    out, run_dir = tmp_path / "out", tmp_path / "run"
    out.mkdir()
    python = _bin(tmp_path, python=FAKE_PYTHON) / "python"
    env = _sbatch_env(tmp_path, "31337", run_dir, PYTHON=str(python), FAKE_OUT=str(out), FAKE_EXIT=str(status))
    r = subprocess.run(["bash", str(SBATCH), "stage=sft", "trainer=fsdp"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == status, r.stderr
    args = (out / "args.0").read_text().splitlines()
    assert args[:2] == ["-m", "llama2_lit"] and args[-2:] == ["stage=sft", "trainer=fsdp"]  # the user's last: they win
    for a in ("trainer=ddp", "trainer.num_nodes=1", "trainer.devices=2", f"hydra.run.dir={run_dir}"):
        assert a in args, a
    assert any(a.startswith("+trainer.plugins=") and "auto_requeue:false" in a for a in args)
    assert not any(a.startswith("ckpt_path") for a in args)  # a fresh job
    assert (out / "args.1").read_text().splitlines()[-1] == "hydra.job.name=train_ddp_process_1"
    rank1 = dict(line.split("=", 1) for line in (out / "env.1").read_text().splitlines() if "=" in line)
    assert (rank1["SLURM_PROCID"], rank1["MASTER_ADDR"], rank1["MASTER_PORT"]) == ("1", "127.0.0.1", str(15000 + 1337))
    calls = [c for c in _scontrol_calls(tmp_path) if not c.startswith("show")]
    assert calls == (["requeue 31337"] if status == PREEMPTED_EXIT_CODE else [])

    # the requeued job (same id, same run directory, now holding a checkpoint) resumes
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    r = subprocess.run(["bash", str(SBATCH), "stage=sft"], cwd=tmp_path, env={**env, "FAKE_EXIT": "0"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and (out / "args.0").read_text().splitlines()[-1] == "ckpt_path=last", r.stderr


@pytest.mark.slow
@pytest.mark.fsdp
def test_ddp_sbatch_preempted_by_sigusr1_requeues_and_the_requeued_job_resumes(tmp_path, cache_dir):
    """scripts/slurm/train.sbatch end to end on CPU with a fake srun (2 tasks on this machine) and scontrol: SIGUSR1
    to the batch shell -> both ranks checkpoint and exit 75 -> scontrol requeue; the same script again (the requeued
    job) resumes from last.ckpt in the same run directory and finishes."""
    run_dir = tmp_path / "run"
    job = str(random.randint(10_000, 99_999))
    env = _sbatch_env(tmp_path, job, run_dir, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    max_steps = 60
    args = [*TINY_BASE, "trainer.accelerator=cpu", "trainer.precision=32-true", "stage.batch_size=4",
            "stage.max_epochs=1000", f"trainer.max_steps={max_steps}", "callbacks.checkpoint.every_n_steps=1",
            f"paths.cache_dir={cache_dir}"]
    t0 = time.perf_counter()
    with open(tmp_path / "first.txt", "w") as log:
        shell = subprocess.Popen(["bash", str(SBATCH), *args], cwd=tmp_path, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoints" / "last.ckpt").exists():
            assert shell.poll() is None and time.monotonic() < deadline, (tmp_path / "first.txt").read_text()[-3000:]
            time.sleep(0.1)
        shell.send_signal(signal.SIGUSR1)  # sbatch --signal=B:USR1@120: the batch shell gets it
        rc = shell.wait(timeout=120)
    finally:
        if shell.poll() is None:
            shell.kill()
            shell.wait()
    first = (tmp_path / "first.txt").read_text()
    assert rc == PREEMPTED_EXIT_CODE, first[-4000:]
    assert first.count("preempted: SIGUSR1: stopped with checkpoint") == 2 and "Traceback" not in first  # both ranks
    assert [c for c in _scontrol_calls(tmp_path) if not c.startswith("show")] == [f"requeue {job}"]
    stopped = json.loads((run_dir / "steps.jsonl").read_text().splitlines()[-1])["step"]
    assert stopped < max_steps

    second = subprocess.run(["bash", str(SBATCH), *args], cwd=tmp_path, env={**env, "SLURM_RESTART_COUNT": "1"},
                            capture_output=True, text=True, timeout=300)
    logs = second.stdout + second.stderr
    assert second.returncode == 0, logs[-4000:]
    assert "holds a checkpoint: resuming (restart 1)" in logs
    assert f"Restoring states from the checkpoint path at {run_dir / 'checkpoints' / 'last.ckpt'}" in logs
    assert json.loads((run_dir / "metrics.json").read_text())["trainer/steps"] == max_steps
    steps = [json.loads(x)["step"] for x in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert steps[-1] == max_steps and stopped + 1 in steps
    assert (run_dir / "train_ddp_process_1.log").is_file()  # rank 1's own log (scripts/slurm/rank.sh)
    assert len([c for c in _scontrol_calls(tmp_path) if not c.startswith("show")]) == 1  # not requeued again
    print(f"\nsbatch on CPU (2 ranks): preempted at step {stopped}, requeued, resumed to {max_steps}: "
          f"{time.perf_counter() - t0:.0f} s")
