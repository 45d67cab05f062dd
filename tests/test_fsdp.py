"""trainer=fsdp on CPU: 2 gloo processes shard the model (FSDP2), train like one process over the same global
batch, resume from a sharded checkpoint, and consolidate it to a Hugging Face folder; the seeded meta-device init."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.conftest import ROOT

TINY = [
    "logger=none",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.limit_val_batches=1",
    "data.synthetic.num_train=120",
    "data.synthetic.num_val=16",
    "data.synthetic.num_eval=4",
    "stage.seq_len=128",
    "~callbacks.gold_eval",
    "model.config.hidden_size=32",
    "model.config.intermediate_size=64",
    "model.config.num_hidden_layers=2",
    # 2 epochs of 3 steps: steps 1-3 compare with one process, steps 4-6 with the run resumed at step 3
    "trainer.max_steps=6",
    "trainer.limit_train_batches=3",
    "callbacks.checkpoint.save_top_k=-1",
    "+callbacks.probe._target_=tests.test_fsdp.Probe",
]
PROBE_IDS = torch.arange(3, 35).unsqueeze(0)  # (1, 32) a fixed input whose logits the probe records


class Probe(L.Callback):
    """Records, per rank, the parameters it holds, each step's logged loss, and the final model's logits."""

    def on_train_start(self, trainer, pl_module):
        from llama2_lit.models.sharding import local_numel

        self.rec = {"rank": trainer.global_rank, "world": trainer.world_size, "local_params": local_numel(pl_module.model),
                    "total_params": sum(p.numel() for p in pl_module.model.parameters()), "loss": {}}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rec["loss"][trainer.global_step] = float(trainer.callback_metrics["train/loss_step"])

    def on_train_end(self, trainer, pl_module):
        out = Path(trainer.default_root_dir)
        model = pl_module.model
        model.eval()
        with torch.no_grad():  # a sharded forward is collective: every rank runs it
            logits = model(input_ids=PROBE_IDS.to(pl_module.device), use_cache=False).logits.float().cpu()
        model.train()
        if trainer.is_global_zero:
            torch.save(logits, out / "probe_logits.pt")
        (out / f"probe.rank{trainer.global_rank}.json").write_text(json.dumps(self.rec))


def _launch(out_root: Path, cache_dir: str, *extra: str) -> tuple[Path, float]:
    """``python -m llama2_lit`` with 2 CPU processes under trainer=fsdp; the run directory and wall seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HYDRA_FULL_ERROR": "1"}
    cmd = [sys.executable, "-m", "llama2_lit", *TINY, "trainer=fsdp", "trainer.devices=2", "trainer.accelerator=cpu",
           "stage.batch_size=2", f"paths.output_root={out_root}", f"paths.cache_dir={cache_dir}", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    took = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run_dir,) = (out_root / "runs" / "sft").iterdir()
    return run_dir, took


def _probe(run_dir: Path, rank: int = 0) -> dict:
    rec = json.loads((run_dir / f"probe.rank{rank}.json").read_text())
    rec["loss"] = {int(k): v for k, v in rec["loss"].items()}
    return rec


@pytest.mark.slow
@pytest.mark.fsdp
def test_fsdp_two_processes_shard_match_one_process_resume_and_consolidate(make_cfg, tmp_path, cache_dir):
    from transformers import AutoModelForCausalLM

    from llama2_lit.models.sharding import consolidate
    from llama2_lit.run import run

    # one process, the same global batch (4 rows a step) and the same seeded init. Lightning's DDP with one
    # process (gloo, world size 1) is that process plus the distributed sampler, which deals the rows in the
    # order the 2-rank run's sampler does (a plain DataLoader shuffles with its own generator).
    single = tmp_path / "single"
    env = dict(os.environ)
    try:
        run(make_cfg(*TINY, "trainer=cpu", "+trainer.strategy=ddp", "stage.batch_size=4", "model.init=seeded",
                     small=False, out=single))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(env)
    one = _probe(single)

    # two processes of 2 rows each; activation checkpointing on (it must not change the numbers)
    a_dir, a_time = _launch(tmp_path / "a", cache_dir, "model.gradient_checkpointing=true")
    r0, r1 = _probe(a_dir, 0), _probe(a_dir, 1)
    assert (r0["world"], r1["world"]) == (2, 2)
    assert r0["total_params"] == r1["total_params"] == one["total_params"]
    assert r0["local_params"] + r1["local_params"] == one["total_params"]
    assert abs(r0["local_params"] - one["total_params"] / 2) <= 0.01 * one["total_params"]
    print(f"\nparameters: {one['total_params']} in all; rank 0 holds {r0['local_params']}, rank 1 {r1['local_params']}")

    # steps 1-3 (epoch 0: the distributed sampler deals the same rows as the single process's batches)
    diff = max(abs(r0["loss"][s] - one["loss"][s]) for s in (1, 2, 3))
    print(f"loss, one process vs 2 ranks, steps 1-3: {[one['loss'][s] for s in (1, 2, 3)]} vs "
          f"{[r0['loss'][s] for s in (1, 2, 3)]}: max |diff| {diff:.2e}")
    assert diff < 1e-5
    assert r0["loss"] == r1["loss"]  # every rank logs the global batch's loss
    assert one["loss"][3] < one["loss"][1]

    # the sharded checkpoint at the end of epoch 0: a directory of per-rank shards; resume from it
    ckpt3 = a_dir / "checkpoints" / "epoch=0-step=3.ckpt"
    assert ckpt3.is_dir() and (ckpt3 / ".metadata").exists() and len(list(ckpt3.glob("*.distcp"))) == 2
    b_dir, b_time = _launch(tmp_path / "b", cache_dir, "model.gradient_checkpointing=true", f"ckpt_path='{ckpt3}'")
    b = _probe(b_dir)
    assert sorted(b["loss"]) == [4, 5, 6]  # global_step continues from 3
    assert json.loads((b_dir / "metrics.json").read_text())["trainer/steps"] == 6.0
    resumed = max(abs(b["loss"][s] - r0["loss"][s]) for s in (4, 5, 6))
    print(f"loss, uninterrupted vs resumed at step 3, steps 4-6: max |diff| {resumed:.2e}")
    assert resumed < 1e-6

    # consolidation: the final sharded checkpoint -> an HF folder whose logits are the trained model's
    hf = consolidate(a_dir / "checkpoints" / "last.ckpt", tmp_path / "consolidated")
    model = AutoModelForCausalLM.from_pretrained(hf).eval()
    with torch.no_grad():
        logits = model(input_ids=PROBE_IDS, use_cache=False).logits
    trained = torch.load(a_dir / "probe_logits.pt")
    err = (logits - trained).abs().max().item()
    exported = AutoModelForCausalLM.from_pretrained(a_dir / "hf").eval()  # the run's own hf/ (gathered on rank 0)
    for (k, v), (k2, v2) in zip(sorted(model.state_dict().items()), sorted(exported.state_dict().items())):
        assert k == k2 and torch.equal(v, v2), k
    print(f"consolidated HF logits vs the sharded model's: max |diff| {err:.2e}; runs took {a_time:.0f} s + {b_time:.0f} s")
    assert err < 1e-5


def test_fsdp_with_one_device_is_a_clear_error(make_cfg):
    from llama2_lit.__main__ import _user_error
    from llama2_lit.run import build

    with pytest.raises(Exception) as e:
        build(make_cfg("trainer=fsdp", "trainer.devices=1", "trainer.accelerator=cpu"))
    err = _user_error(e.value)
    assert err is not None and "trainer.devices" in str(err) and "trainer=cpu" in str(err)


def test_seeded_init_is_the_same_built_whole_or_on_meta_and_materialised(tok):
    from llama2_lit.models.init import has_meta, materialize_
    from llama2_lit.models.loading import load_causal_lm

    cfg = {"config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "num_key_value_heads": 2, "tie_word_embeddings": True}, "init": "seeded", "init_seed": 7}
    whole = load_causal_lm(cfg, tok)
    meta = load_causal_lm({**cfg, "init_device": "meta"}, tok)
    assert has_meta(meta) and not has_meta(whole)
    materialize_(meta, "cpu", seed=7)
    assert meta.lm_head.weight is meta.model.embed_tokens.weight  # ties survive materialisation
    for (k, v), (k2, v2) in zip(whole.state_dict().items(), meta.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert torch.equal(whole.model.rotary_emb.inv_freq, meta.model.rotary_emb.inv_freq)
    assert whole.model.embed_tokens.weight[tok.pad_token_id].abs().sum() == 0  # the padding row, as transformers
    assert torch.equal(whole.model.norm.weight, torch.ones(32))
    std = whole.model.layers[0].mlp.up_proj.weight.std().item()
    assert 0.015 < std < 0.025  # N(0, initializer_range=0.02)
    other = load_causal_lm({**cfg, "init_seed": 8}, tok)
    assert not torch.equal(other.lm_head.weight, whole.lm_head.weight)


def test_fsdp_with_a_stage_that_does_not_shard_stops_before_any_work(make_cfg, tmp_path):
    from llama2_lit.errors import UserError
    from llama2_lit.run import run

    with pytest.raises(UserError, match=r"trainer=fsdp: stage=ppo \(PPOModule\) does not shard"):
        run(make_cfg("stage=ppo", "trainer=fsdp", "trainer.devices=2", "trainer.accelerator=cpu"))
    assert not (tmp_path / "prepare").exists() and not list(tmp_path.iterdir())


def test_ckpt_path_resumes_a_one_process_run_at_an_epoch_end(make_cfg, tmp_path):
    """One process: the checkpoint's hyperparameters load under torch.load's weights_only default (OmegaConf
    containers in them made every ckpt_path= fail), and a run resumed at an epoch's end trains the next epoch
    (Lightning 2.6 counted the finished epoch twice and stopped at max_epochs). Its data order is not the
    uninterrupted run's: the one-process loader's shuffle generator is seeded once per loader, not per epoch."""
    from llama2_lit.run import run

    args = [*TINY, "trainer=cpu", "stage.batch_size=4"]
    run(make_cfg(*args, small=False, out=tmp_path / "a"))
    metrics = run(make_cfg(*args, f"ckpt_path='{tmp_path}/a/checkpoints/epoch=0-step=3.ckpt'", small=False,
                           out=tmp_path / "b"))
    assert sorted(_probe(tmp_path / "b")["loss"]) == [4, 5, 6] and metrics["trainer/steps"] == 6
