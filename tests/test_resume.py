"""Exact resume after SIGKILL (SFT, RM, PPO), crash-safe checkpoints, preemption (SIGTERM / SIGUSR1), determinism.

Each resume test trains a reference run in this process, then the same config under ``python -m llama2_lit`` with a
callback that kills its own process (SIGKILL) after N batches, then the same command with ``ckpt_path=last`` in the
same run directory; the ``steps.jsonl`` of the killed-and-resumed run must equal the reference's line for line: the
same batches (CRC of their data) in the same order, and the same loss and learning rate to 1e-5 (0.0 measured here).
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from llama2_lit.errors import Preempted, UserError
from tests.conftest import ROOT, SMALL
from tests.test_ppo import parts  # noqa: F401  (the random-init policy and reward models fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
# 48 world examples (multi-turn and preprompted rows among them) -> 3 packed batches of 4 rows an epoch; 2 epochs;
# a step checkpoint every 2 steps
SFT = ["stage=sft", "data.synthetic.num_train=48", "trainer.max_steps=-1", "stage.max_epochs=2",
       "callbacks.checkpoint.every_n_steps=2"]
# 12 micro-batches of 4 pairs over 2 epochs, 2 per optimizer step (6 steps)
# 28 prompts: 12 micro-batches of 4 pairs over 2 epochs (prompts whose two answers tie give no pair)
RM = ["stage=rm", "data=synthetic_pairs", "data.synthetic.policy=perturb", "data.synthetic.num_train=28",
      "stage.pairs_per_step=8", "stage.module.warmup_steps=1", "trainer.max_steps=-1", "stage.max_epochs=2",
      "callbacks.checkpoint.every_n_steps=2"]


def ppo_args(parts) -> list[str]:  # noqa: F811
    """6 PPO iterations of 8 prompts, held-out evaluation every 2 (and early stopping on), a checkpoint every 2."""
    return ["stage=ppo", f"model.path={parts / 'policy'}", f"ppo.reward_models.helpfulness={parts / 'helpfulness'}",
            f"ppo.reward_models.safety={parts / 'safety'}", "ppo.iterations=6", "stage.batch_size=8",
            "ppo.mini_batch_size=4", "ppo.ppo_epochs=2", "ppo.max_new_tokens=6", "ppo.eval.max_new_tokens=6",
            "stage.val_check_interval=2", "data.val_batch_size=4", "data.synthetic.num_train=40",
            "trainer.max_steps=-1", "callbacks.checkpoint.every_n_steps=2"]


class SignalAfter(L.Callback):
    """Sends ``sig`` to its own process when ``batches`` training batches have ended (``+callbacks.signal...``)."""

    def __init__(self, batches: int, sig: str = "SIGKILL"):
        self.batches, self.sig = batches, sig

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.fit_loop.epoch_loop.batch_progress.total.processed == self.batches:
            os.kill(os.getpid(), getattr(signal, self.sig))


def steps(run_dir: Path) -> list[dict]:
    f = Path(run_dir) / "steps.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def max_diff(a: list[dict], b: list[dict]) -> float:
    """Largest |difference| of the float fields of two step logs that trained the same data in the same order."""
    assert [r["batch"] for r in b] == [r["batch"] for r in a], "batches missing or repeated"
    assert [r["data"] for r in b] == [r["data"] for r in a], "other data, or another order"
    assert [r["step"] for r in b] == [r["step"] for r in a]
    worst = 0.0
    for x, y in zip(a, b):
        keys = {k for k in x if isinstance(x[k], float)}
        assert keys == {k for k in y if isinstance(y[k], float)}
        worst = max([worst, *(abs(x[k] - y[k]) for k in keys)])
    return worst


def cli(run_dir: Path, cache_dir: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HYDRA_FULL_ERROR": "0"}
    small = [s for s in SMALL if s != "trainer.max_steps=3"]
    return subprocess.run([sys.executable, "-m", "llama2_lit", *small, *QUIET, f"paths.cache_dir={cache_dir}",
                           f"hydra.run.dir={run_dir}", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def reference(make_cfg, out: Path, args: list[str]):
    from llama2_lit.run import run

    metrics = run(make_cfg("trainer.max_steps=-1", *QUIET, *args, out=out))
    return metrics, steps(out)


def killed_and_resumed(tmp_path: Path, cache_dir: str, args: list[str], batches: int, cli_resume: bool, make_cfg):
    """The run killed (SIGKILL) after ``batches`` batches, then resumed with ckpt_path=last; its run dir."""
    run_dir = tmp_path / "killed"
    kill = [f"+callbacks.kill._target_={__name__}.SignalAfter", f"+callbacks.kill.batches={batches}"]
    r = cli(run_dir, cache_dir, *args, *kill)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert len(steps(run_dir)) == batches and not (run_dir / "metrics.json").exists()
    if cli_resume:
        r = cli(run_dir, cache_dir, *args, "ckpt_path=last")
        assert r.returncode == 0, r.stderr[-3000:]
    else:
        from llama2_lit.run import run

        run(make_cfg("trainer.max_steps=-1", *QUIET, *args, "ckpt_path=last", out=run_dir))
    return run_dir


# ------------------------------------------------------------------------------------------------ data loaders
def test_resumable_loader_keeps_the_old_order_and_resumes_mid_epoch():
    from torch.utils.data import DataLoader

    from data_modules.pairwise import LengthGroupedBatchSampler
    from data_modules.resumable import EpochRandomSampler, ResumableDataLoader
    from data_modules.prompts import CyclingSampler

    ds = list(range(37))
    # the order of DataLoader(shuffle=True, generator=seeded), pass after pass, as a function of (seed, epoch)
    old = DataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(7))
    sampler = EpochRandomSampler(ds, 7)
    new = ResumableDataLoader(ds, batch_size=4, sampler=sampler)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        assert [b.tolist() for b in new] == [b.tolist() for b in old]

    def loaders():
        lengths = [(i * 7919) % 50 + 1 for i in range(37)]
        yield lambda: ResumableDataLoader(ds, batch_size=4, sampler=EpochRandomSampler(ds, 3))
        yield lambda: ResumableDataLoader(ds, batch_sampler=LengthGroupedBatchSampler(lengths, 4, mega_batch=2))
        yield lambda: ResumableDataLoader(ds, batch_size=4, sampler=CyclingSampler(len(ds), 60, seed=1))

    for make in loaders():
        a = make()
        from lightning.fabric.utilities.data import _set_sampler_epoch

        _set_sampler_epoch(a, 2)  # what Lightning calls before each epoch
        it = iter(a)
        first = [next(it).tolist() for _ in range(5)]
        state = a.state_dict()
        rest = [b.tolist() for b in it]
        b = make()
        b.load_state_dict(state)
        _set_sampler_epoch(b, 2)
        assert [x.tolist() for x in b] == rest  # the rest of the epoch, nothing again, nothing skipped
        assert b.state_dict()["served"] == len(first) + len(rest) == len(b)
        _set_sampler_epoch(b, 3)
        assert len([x for x in b]) == len(b)  # the next epoch starts at its beginning


# ------------------------------------------------------------------------------------------------ SIGKILL + resume
def test_sft_killed_mid_epoch_resumes_exactly(make_cfg, tmp_path, cache_dir):
    ref_metrics, ref = reference(make_cfg, tmp_path / "ref", SFT)
    assert len(ref) == 6 and {r["epoch"] for r in ref} == {0, 1}
    # killed after step 5 (epoch 1, batch 2 of 3); the last checkpoint is step 4: steps 5 and 6 are trained again
    run_dir = killed_and_resumed(tmp_path, cache_dir, SFT, 5, cli_resume=True, make_cfg=make_cfg)
    got = steps(run_dir)
    diff = max_diff(ref, got)
    print(f"\nSFT killed after step 5, resumed from step 4: max |loss/lr diff| over 6 steps = {diff:.3g}")
    assert diff <= TOL
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["trainer/steps"] == 6 and metrics["val/loss"] == pytest.approx(ref_metrics["val/loss"], abs=TOL)


def test_rm_killed_mid_accumulation_resumes_exactly(make_cfg, tmp_path, cache_dir):
    ref_metrics, ref = reference(make_cfg, tmp_path / "ref", RM)
    assert len(ref) == 12 and ref[-1]["step"] == 6
    # killed after micro-batch 9 (half of step 5); the last checkpoint is step 4 (batch 8)
    run_dir = killed_and_resumed(tmp_path, cache_dir, RM, 9, cli_resume=False, make_cfg=make_cfg)
    diff = max_diff(ref, steps(run_dir))
    print(f"\nRM killed after micro-batch 9, resumed from step 4: max |diff| over 12 batches = {diff:.3g}")
    assert diff <= TOL
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val/accuracy"] == pytest.approx(ref_metrics["val/accuracy"], abs=TOL)


def test_ppo_killed_resumes_exactly(make_cfg, tmp_path, cache_dir, parts):  # noqa: F811
    args = ppo_args(parts)
    ref_metrics, ref = reference(make_cfg, tmp_path / "ref", args)
    assert len(ref) == 6 and "ppo/policy_loss" in ref[0]
    # killed after iteration 5; the last checkpoint is iteration 4 (written after its held-out evaluation)
    run_dir = killed_and_resumed(tmp_path, cache_dir, args, 5, cli_resume=False, make_cfg=make_cfg)
    diff = max_diff(ref, steps(run_dir))
    print(f"\nPPO killed after iteration 5, resumed from iteration 4: max |diff| over 6 iterations = {diff:.3g}")
    assert diff <= TOL
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("val/reward", "val/reward_best", "val/best_iteration", "val/reward_init", "ppo/kl"):
        assert metrics[key] == pytest.approx(ref_metrics[key], abs=TOL), key


# ------------------------------------------------------------------------------------------------ preemption
def test_sigterm_saves_at_the_step_boundary_exits_75_and_resumes(make_cfg, tmp_path, cache_dir):
    _, ref = reference(make_cfg, tmp_path / "ref", SFT)
    run_dir = tmp_path / "preempted"
    term = [f"+callbacks.term._target_={__name__}.SignalAfter", "+callbacks.term.batches=5",
            "+callbacks.term.sig=SIGTERM"]
    r = cli(run_dir, cache_dir, *SFT, *term)
    assert r.returncode == 75, r.stderr[-3000:]
    assert "preempted: SIGTERM" in r.stderr and "ckpt_path=last" in r.stderr and "Traceback" not in r.stderr
    assert len(steps(run_dir)) == 5 and not (run_dir / "metrics.json").exists()
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 5  # not the step-4 one
    r = cli(run_dir, cache_dir, *SFT, "ckpt_path=last")
    assert r.returncode == 0, r.stderr[-3000:]
    assert max_diff(ref, steps(run_dir)) <= TOL
    assert json.loads((run_dir / "metrics.json").read_text())["trainer/steps"] == 6


def test_sigusr1_preempts_too(make_cfg, tmp_path):
    from llama2_lit.run import run

    with pytest.raises(Preempted, match="SIGUSR1: stopped with checkpoint .*step 2") as e:
        run(make_cfg(*QUIET, *SFT, f"+callbacks.usr._target_={__name__}.SignalAfter", "+callbacks.usr.batches=2",
                     "+callbacks.usr.sig=SIGUSR1", out=tmp_path))
    assert e.value.exit_code == 75
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None)  # the handler is gone with the trainer
    assert len(steps(tmp_path)) == 2


# ------------------------------------------------------------------------------------------------ damaged checkpoints
def test_ckpt_path_last_without_a_checkpoint_names_the_path(make_cfg, tmp_path):
    from llama2_lit.run import run

    with pytest.raises(UserError, match=f"ckpt_path=last: .*{tmp_path}/checkpoints/last.ckpt does not exist"):
        run(make_cfg("ckpt_path=last", out=tmp_path))
    assert not (tmp_path / "steps.jsonl").exists()  # stopped before any work


def test_a_truncated_checkpoint_is_reported_and_the_previous_one_used(make_cfg, tmp_path, caplog):
    from callbacks.checkpoint import resolve_ckpt_path
    from llama2_lit.run import run

    _, ref = reference(make_cfg, tmp_path / "ref", [*SFT, "callbacks.checkpoint_best.save_top_k=0"])
    ckpts = tmp_path / "ref" / "checkpoints"
    # kept: the newest 2 (steps 4 and 6) and last.ckpt -> step 6
    assert sorted(p.name for p in ckpts.glob("epoch=*.ckpt")) == ["epoch=1-step=4.ckpt", "epoch=1-step=6.ckpt"]
    assert os.readlink(ckpts / "last.ckpt") == "epoch=1-step=6.ckpt"
    newest = ckpts / "epoch=1-step=6.ckpt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a half-written file
    with caplog.at_level("WARNING"):
        chosen = resolve_ckpt_path("last", ckpts)
    assert chosen == str(ckpts / "epoch=1-step=4.ckpt")
    assert any(f"checkpoint {ckpts / 'last.ckpt'} is unusable: it does not load" in r.getMessage()
               for r in caplog.records)
    # resuming from there trains steps 5 and 6 again, exactly
    run(make_cfg("trainer.max_steps=-1", *QUIET, *SFT, f"ckpt_path={ckpts}/last.ckpt", out=tmp_path / "b"))
    assert max_diff(ref[4:], steps(tmp_path / "b")) <= TOL
    # nothing that loads: every file tried is named
    (ckpts / "epoch=1-step=4.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="no checkpoint to resume from loads: .*last.ckpt .*step=4.ckpt"):
        resolve_ckpt_path("last", ckpts)


def test_a_failed_write_stops_the_run_and_keeps_the_previous_checkpoint(make_cfg, tmp_path, monkeypatch):
    import callbacks.checkpoint as ck
    from llama2_lit.__main__ import _user_error
    from llama2_lit.run import run

    real, calls = ck._write, []

    def disk_full_on_third_write(checkpoint, path):
        calls.append(path)
        if len(calls) == 3:  # steps 2 and 3 (epoch end) were written; step 4's write fails half-way
            path.write_bytes(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(checkpoint, path)

    monkeypatch.setattr(ck, "_write", disk_full_on_third_write)
    ckpts = tmp_path / "checkpoints"
    with pytest.raises(Exception) as e:
        run(make_cfg(*QUIET, *SFT, "callbacks.checkpoint_best.save_top_k=0", out=tmp_path))
    err = _user_error(e.value)  # the entry point prints it as one line, exit code 2
    assert err is not None and "No space left on device" in str(err)
    assert f"could not write checkpoint {ckpts / 'epoch=1-step=4.ckpt'}" in str(err)
    assert f"the previous checkpoint {ckpts / 'epoch=0-step=3.ckpt'} is intact" in str(err)
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0-step=2.ckpt", "epoch=0-step=3.ckpt", "last.ckpt"]
    assert os.readlink(ckpts / "last.ckpt") == "epoch=0-step=3.ckpt"
    assert torch.load(ckpts / "last.ckpt", weights_only=True, map_location="cpu")["global_step"] == 3
    assert not (tmp_path / "metrics.json").exists()


def test_atomic_write_leaves_no_partial_file_under_the_name(tmp_path, monkeypatch):
    import callbacks.checkpoint as ck

    io = ck.AtomicCheckpointIO()
    target = tmp_path / "c" / "x.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, target)
    before = target.read_bytes()

    def interrupted(checkpoint, path):
        path.write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, target)
    assert target.read_bytes() == before and [p.name for p in target.parent.iterdir()] == ["x.ckpt"]


# ------------------------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("stage", ["rm", "ppo"])
def test_same_seed_same_metrics_json(stage, make_cfg, tmp_path, parts):  # noqa: F811
    from llama2_lit.run import run

    args = {"rm": RM, "ppo": ppo_args(parts)}[stage]
    for name in ("a", "b"):
        run(make_cfg("trainer.max_steps=-1", *QUIET, *args, "seed=11", out=tmp_path / name))
    a, b = ((tmp_path / n / "metrics.json").read_text() for n in ("a", "b"))
    assert a == b and len(json.loads(a)) > 5
    assert (tmp_path / "a" / "steps.jsonl").read_text() == (tmp_path / "b" / "steps.jsonl").read_text()


# ------------------------------------------------------------------------- RSDistillModule's old checkpoint layout
class _Selection(L.LightningDataModule):
    """What RSDistillModule.setup checks (the samples' tokenizer) and a few batches of labelled rows."""

    def __init__(self, tok):
        super().__init__()
        from llama2_lit.models.tokenizers import tokenizer_fingerprint

        self.source_tokenizers, self.source_policies, self.file = [tokenizer_fingerprint(tok)], ["p"], "sel.parquet"
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, len(tok), (8, 12), generator=g)
        self.rows = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i.clone()} for i in ids]

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.rows, batch_size=4)


def _distill(tok):
    from llama2_lit.modules.rs_distill import RSDistillModule  # the alias saved run configs name
    from tests.test_ppo import DIMS

    torch.manual_seed(0)
    return RSDistillModule({"config": DIMS, "attn_implementation": "eager"}, tok, lr=1e-2)


def _trainer(tmp_path, steps: int) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)


def test_rs_distill_checkpoints_of_the_wrapped_layout_still_load(tok, tmp_path):
    """Before issue 15 RSDistillModule wrapped an SFTModule (``self.sft``): its weights were ``sft.model.*``. Such a
    checkpoint resumes (``ckpt_path=``, optimizer state included) and loads with ``load_state_dict`` (consolidation)."""
    trained = _distill(tok)
    trainer = _trainer(tmp_path, 2)
    trainer.fit(trained, datamodule=_Selection(tok))
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    ckpt = torch.load(tmp_path / "new.ckpt", weights_only=False)
    assert all(k.startswith("model.") for k in ckpt["state_dict"])
    ckpt["state_dict"] = {f"sft.{k}": v for k, v in ckpt["state_dict"].items()}  # the old layout
    torch.save(ckpt, tmp_path / "old.ckpt")
    want = {k: v.clone() for k, v in trained.state_dict().items()}

    resumed = _distill(tok)
    again = _trainer(tmp_path, 2)
    again.fit(resumed, datamodule=_Selection(tok), ckpt_path=str(tmp_path / "old.ckpt"))
    assert again.global_step == 2
    assert all(torch.equal(v, want[k]) for k, v in resumed.state_dict().items())
    a, b = (t.optimizers[0].state_dict()["state"] for t in (trainer, again))
    assert a.keys() == b.keys() and all(torch.equal(a[i]["exp_avg"], b[i]["exp_avg"]) for i in a)

    fresh = _distill(tok)
    fresh.load_state_dict(ckpt["state_dict"])  # strict: every old key found its parameter
    assert all(torch.equal(v, want[k]) for k, v in fresh.state_dict().items())
