"""Global batch sizes on any rank count (llama2_lit/core/batching.py), and the statistics the recipe takes over a batch
(R̃_c, the running moments, the advantages) taken over the global batch on 2 gloo ranks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from llama2_lit.core.batching import BatchSplit, PPOSplit, split, split_pairs, split_ppo
from llama2_lit.errors import UserError
from tests.conftest import ROOT


def test_global_sizes_split_over_ranks_and_micro_batches():
    assert split(64, 8, micro=8) == BatchSplit(64, 8, 8, 8, 1)      # trainer=fsdp_7b
    assert split(64, 8, micro=4) == BatchSplit(64, 8, 8, 4, 2)      # trainer=fsdp_13b
    assert split(64, 32, micro=1) == BatchSplit(64, 32, 2, 1, 2)    # trainer=fsdp_70b
    assert split(16, 1) == BatchSplit(16, 1, 16, 16, 1)             # one process: unchanged
    assert split(16, 2, accumulate=4) == BatchSplit(16, 2, 8, 2, 4)
    assert split_pairs(512, 1, 32) == BatchSplit(512, 32, 16, 1, 16)  # the paper's RM on 32 GPUs
    assert split_ppo(512, 64, 8) == PPOSplit(512, 8, 64, 64, 8, 8)   # 8 steps of 64 per iteration
    assert split(64, 8, micro=4).describe("sequences") == (
        "64 sequences per step (global) = 8 ranks x 8 per rank (2 micro-batches of 4)")


@pytest.mark.parametrize("call,message", [
    (lambda: split(64, 3), "stage.batch_size=64 is global (all ranks together) and does not divide over 3 ranks: "
                           "choose a multiple of 3"),
    (lambda: split(64, 8, micro=3), "stage.batch_size=64 over 8 ranks is 8 per rank, which micro-batches of 3 do "
                                    "not divide: choose a micro-batch that divides 8"),
    (lambda: split(64, 8, micro=4, accumulate=3), "accumulates 2 per step, not trainer.accumulate_grad_batches=3"),
    (lambda: split_pairs(512, 3, 8), "stage.pairs_per_step=512 over 8 ranks is 64 per rank, which micro-batches "
                                     "of 3 do not divide"),
    (lambda: split_ppo(512, 48, 8), "ppo.mini_batch_size=48 does not divide stage.batch_size=512"),
    (lambda: split_ppo(512, 4, 8), "ppo.mini_batch_size=4 is global (all ranks together) and does not divide "
                                   "over 8 ranks"),
])
def test_sizes_that_do_not_divide_are_refused_in_one_line(call, message):
    with pytest.raises(UserError) as e:
        call()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_build_sets_the_per_rank_batch_and_accumulation_from_global_sizes(make_cfg):
    """One process: stage.batch_size=8 with trainer.micro_batch_size=2 -> loader batches of 2, 4 accumulated."""
    from llama2_lit.run import build

    dm, module, trainer = build(make_cfg("stage.batch_size=8", "trainer.micro_batch_size=2"))
    assert dm.batch_size == 2 and trainer.accumulate_grad_batches == 4
    with pytest.raises(UserError, match="micro-batches of 3 do not divide"):
        build(make_cfg("stage.batch_size=8", "trainer.micro_batch_size=3"))


# -- 2 gloo ranks ------------------------------------------------------------------------------------------------
def _whiten_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from llama2_lit.core.rl import RunningMoments, whiten

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)

    def all_reduce(x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 8, generator=gen, dtype=torch.float64) * 3 + 1  # the global batch: rank r holds row r
    later = torch.randn(2, 8, generator=gen, dtype=torch.float64) * 2 - 1
    adv = torch.randn(2, 4, 6, generator=gen)
    mask = torch.rand(2, 4, 6, generator=gen) > 0.3
    moments = RunningMoments()
    got = {"batch": whiten(scores[rank], all_reduce=all_reduce),
           "running1": whiten(scores[rank], moments=moments, all_reduce=all_reduce),
           "running2": whiten(later[rank], moments=moments, all_reduce=all_reduce),
           "adv": whiten(adv[rank], mask=mask[rank], all_reduce=all_reduce),
           "moments": torch.tensor([moments.count, moments.mean, moments.m2], dtype=torch.float64)}
    torch.save(got, f"{out}/whiten.rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.fsdp
def test_whitening_over_two_ranks_equals_the_one_rank_computation(tmp_path):
    import socket

    from llama2_lit.core.rl import RunningMoments, whiten

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_whiten_worker, args=(2, port, str(tmp_path)), nprocs=2)
    got = [torch.load(tmp_path / f"whiten.rank{r}.pt") for r in (0, 1)]

    gen = torch.Generator().manual_seed(0)  # the same draws as the workers', whitened in one process
    scores = torch.randn(2, 8, generator=gen, dtype=torch.float64) * 3 + 1
    later = torch.randn(2, 8, generator=gen, dtype=torch.float64) * 2 - 1
    adv = torch.randn(2, 4, 6, generator=gen)
    mask = torch.rand(2, 4, 6, generator=gen) > 0.3
    moments = RunningMoments()
    want = {"batch": whiten(scores.flatten()).view(2, 8),
            "running1": whiten(scores.flatten(), moments=moments).view(2, 8),
            "running2": whiten(later.flatten(), moments=moments).view(2, 8),
            "adv": whiten(adv.reshape(8, 6), mask=mask.reshape(8, 6)).view(2, 4, 6)}
    worst = 0.0
    for key, w in want.items():
        for r in (0, 1):
            worst = max(worst, (got[r][key] - w[r]).abs().max().item())
            torch.testing.assert_close(got[r][key], w[r], rtol=0, atol=1e-6)
    for r in (0, 1):
        torch.testing.assert_close(got[r]["moments"], torch.tensor([moments.count, moments.mean, moments.m2],
                                                                   dtype=torch.float64))
    # per-rank whitening, as before this change, differs: each rank's own mean and variance
    local = whiten(scores[0])
    assert (local - want["batch"][0]).abs().max() > 0.05
    print(f"\nwhitened on 2 ranks vs 1 rank (R̃_c, running moments over 2 iterations, masked advantages): "
          f"max |diff| {worst:.2e}; per-rank statistics would differ by {(local - want['batch'][0]).abs().max():.3f}")


class PairCounter(L.Callback):
    """Pairs each optimizer step saw, summed over ranks (rank 0 writes ``pairs_per_step.json``)."""

    def on_train_start(self, trainer, pl_module):
        self.seen, self.steps = 0, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen += int(batch["chosen_input_ids"].shape[0])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append(int(trainer.strategy.reduce(torch.tensor(float(self.seen)), reduce_op="sum").item()))
        self.seen = 0

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            Path(trainer.default_root_dir, "pairs_per_step.json").write_text(json.dumps(
                {"steps": self.steps, "accumulate": trainer.accumulate_grad_batches, "world": trainer.world_size}))


@pytest.mark.fsdp
def test_rm_optimizer_step_sees_exactly_pairs_per_step_pairs_on_two_ranks(tmp_path, cache_dir):
    """stage.pairs_per_step=16 with micro-batches of 4 pairs on 2 ranks: 2 accumulated micro-batches per rank, 16
    pairs per optimizer step in all (before this change each rank accumulated 4: 32 pairs a step)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HYDRA_FULL_ERROR": "1"}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "llama2_lit", "stage=rm", "data=synthetic_pairs", "data.synthetic.policy=perturb",
           "logger=none", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
           "trainer.limit_val_batches=0", "final_validation=false", "~callbacks.gold_eval", "stage.seq_len=128",
           "model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_hidden_layers=2",
           "stage.batch_size=4", "stage.pairs_per_step=16", "trainer.max_steps=3", "stage.module.warmup_steps=1",
           "trainer=fsdp", "trainer.devices=2", "trainer.accelerator=cpu",
           "+callbacks.pairs._target_=tests.test_batching.PairCounter", f"hydra.run.dir={out}",
           f"paths.cache_dir={cache_dir}", f"paths.output_root={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rec = json.loads((out / "pairs_per_step.json").read_text())
    print(f"\nRM on 2 ranks: pairs per optimizer step {rec['steps']} (accumulate {rec['accumulate']})")
    assert rec == {"steps": [16, 16, 16], "accumulate": 2, "world": 2}
    assert ("batch sizes: 16 pairs per step (global) = 2 ranks x 8 per rank (2 micro-batches of 4)"
            in proc.stdout + proc.stderr)
