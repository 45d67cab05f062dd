"""trainer=fsdp on CPU: 2 gloo processes shard the model (FSDP2), train like one process over the same global
batch, resume from a sharded checkpoint, and consolidate it to a Hugging Face folder; the seeded meta-device init;
PPO with all five models sharded, rollouts on gathered weights, and checkpoint folders read shard by shard."""
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
from tests.test_ppo import parts  # noqa: F401  (fixture: a tiny policy and two reward models as HF folders)

TINY_BASE = [  # a tiny 2-rank SFT run (tests/test_faults.py trains it until stopped)
    "logger=none",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.limit_val_batches=1",
    "data.synthetic.num_train=120",
    # one-turn tasks only: steps 1-3 then see the batches the loss check below was written for (the multi-turn and
    # preprompted rows change which rows a step gets; this test is about sharding, not the data mix)
    "data.synthetic.dialogue_fraction=0.0",
    "data.synthetic.preprompt_fraction=0.0",
    "data.synthetic.num_val=16",
    "data.synthetic.num_eval=4",
    "stage.seq_len=128",
    "~callbacks.gold_eval",
    "model.config.hidden_size=32",
    "model.config.intermediate_size=64",
    "model.config.num_hidden_layers=2",
]
TINY = [
    *TINY_BASE,
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


def _launch(out_root: Path, cache_dir: str, *extra: str, base: list[str] = TINY, stage: str = "sft") -> tuple[Path, float]:
    """``python -m llama2_lit`` with 2 CPU processes under trainer=fsdp; the run directory and wall seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HYDRA_FULL_ERROR": "1"}
    cmd = [sys.executable, "-m", "llama2_lit", *base, "trainer=fsdp", "trainer.devices=2", "trainer.accelerator=cpu",
           "stage.batch_size=4", f"paths.output_root={out_root}", f"paths.cache_dir={cache_dir}", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    took = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run_dir,) = (out_root / "runs" / stage).iterdir()
    return run_dir, took


def _probe(run_dir: Path, rank: int = 0) -> dict:
    rec = json.loads((run_dir / f"probe.rank{rank}.json").read_text())
    rec["loss"] = {int(k): v for k, v in rec["loss"].items()}
    return rec


@pytest.mark.slow
@pytest.mark.fsdp
def test_fsdp_two_processes_shard_match_one_process_resume_and_consolidate(make_cfg, tmp_path, cache_dir):
    from transformers import AutoModelForCausalLM

    from llama2_lit.tools.consolidate import consolidate
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

    # two processes of 2 rows each (stage.batch_size=4 is global); activation checkpointing on (it must not change the numbers)
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
    # the README's command (the older module path runs llama2_lit.tools.consolidate): the same folder
    r = subprocess.run([sys.executable, "-m", "llama2_lit.models.sharding", "consolidate",
                        str(a_dir / "checkpoints" / "last.ckpt"), str(tmp_path / "cli")], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for f in ("config.json", "model.safetensors"):
        assert (tmp_path / "cli" / f).read_bytes() == (hf / f).read_bytes(), f
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


def test_consolidate_commands_refuse_a_folder_that_is_no_distributed_checkpoint(tmp_path):
    """``python -m llama2_lit.tools.consolidate`` and the README's older ``python -m llama2_lit.models.sharding
    consolidate``: one line, exit 2."""
    for cmd in (["llama2_lit.tools.consolidate"], ["llama2_lit.models.sharding", "consolidate"]):
        r = subprocess.run([sys.executable, "-m", *cmd, str(tmp_path), str(tmp_path / "out")], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert f"error: {tmp_path}: not a distributed checkpoint directory" in r.stderr


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


class NoShard(L.LightningModule):
    """A stage module without ``configure_model`` (every shipped stage has one now)."""


def test_fsdp_with_a_stage_that_does_not_shard_stops_before_any_work(make_cfg, tmp_path, monkeypatch):
    from llama2_lit import run as run_module
    from llama2_lit.errors import UserError
    from llama2_lit.run import Stage, run

    monkeypatch.setitem(run_module.STAGES, "sft", Stage(module=NoShard))
    with pytest.raises(UserError, match=r"trainer=fsdp: stage=sft \(NoShard\) does not shard"):
        run(make_cfg("trainer=fsdp", "trainer.devices=2", "trainer.accelerator=cpu",
                     "stage.module._target_=tests.test_fsdp.NoShard"))
    assert not list(tmp_path.iterdir())


def test_ckpt_path_resumes_a_one_process_run_at_an_epoch_end(make_cfg, tmp_path):
    """One process: the checkpoint's hyperparameters load under torch.load's weights_only default (OmegaConf
    containers in them made every ckpt_path= fail), and a run resumed at an epoch's end trains the next epoch
    (Lightning 2.6 counted the finished epoch twice and stopped at max_epochs), exactly as the uninterrupted run
    did (the resumable loader restores the data order: same losses)."""
    from llama2_lit.run import run

    args = [*TINY, "trainer=cpu", "stage.batch_size=4"]
    run(make_cfg(*args, small=False, out=tmp_path / "a"))
    metrics = run(make_cfg(*args, f"ckpt_path='{tmp_path}/a/checkpoints/epoch=0-step=3.ckpt'", small=False,
                           out=tmp_path / "b"))
    resumed, whole = _probe(tmp_path / "b")["loss"], _probe(tmp_path / "a")["loss"]
    assert sorted(resumed) == [4, 5, 6] and metrics["trainer/steps"] == 6
    assert resumed == {s: whole[s] for s in (4, 5, 6)}


# -- PPO sharded ------------------------------------------------------------------------------------------------
PPO = [
    "stage=ppo", "logger=none", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    "trainer.limit_val_batches=1", "trainer.max_steps=-1", "data.synthetic.num_train=40", "data.val_batch_size=2",
    # global sizes: 4 prompts per iteration (2 per rank), mini-batches of 2 (1 per rank): 2 optimizer steps each
    "ppo.iterations=2", "stage.batch_size=4", "ppo.mini_batch_size=2", "ppo.ppo_epochs=1", "ppo.max_new_tokens=6",
    "ppo.eval.max_new_tokens=4", "ppo.eval.greedy=false", "stage.val_check_interval=2", "ppo.rm_batch_size=2",
    "+callbacks.probe._target_=tests.test_fsdp.PPOProbe",
]
GEN_PROMPTS = ["What is 2 + 3?", "Name a colour.", "Say hello to the world, please.", "What is 7 times 6?"]
GEN = dict(max_new_tokens=8, temperature=1.0, seed=5)


class _CountingHandle:
    """A ``safe_open`` handle that adds the elements each read returns to ``counts[<the file's folder name>]``."""

    def __init__(self, handle, counts: dict, folder: str):
        self.handle, self.counts, self.folder = handle, counts, folder

    def __enter__(self):
        self.handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def _count(self, t: torch.Tensor) -> torch.Tensor:
        self.counts[self.folder] = self.counts.get(self.folder, 0) + t.numel()
        return t

    def get_tensor(self, name):
        return self._count(self.handle.get_tensor(name))

    def get_slice(self, name):
        piece, count = self.handle.get_slice(name), self._count

        class Slice:
            def get_shape(self):
                return piece.get_shape()

            def __getitem__(self, index):
                return count(piece[index])

        return Slice()


class PPOProbe(L.Callback):
    """Per rank, before PPO trains: the parameters it holds of every model, every model's gathered full weights
    (rank 0 saves them), and its own prompts' answers sampled with gathered weights and from the sharded policy.
    While the reward models load (from the first ``on_validation_start`` or ``on_fit_start``, which run before the
    module's: the run validates before fitting): the elements read from each folder's safetensors files and the
    number of whole-model ``from_pretrained`` loads of a sequence classifier."""

    def on_validation_start(self, trainer, pl_module):
        self._watch()

    def on_fit_start(self, trainer, pl_module):
        self._watch()

    def _watch(self):
        from unittest import mock

        import safetensors
        from transformers import AutoModelForSequenceClassification

        if hasattr(self, "read"):
            return
        self.read: dict[str, int] = {}
        real_open = safetensors.safe_open
        self.patches = [
            mock.patch.object(safetensors, "safe_open", lambda filename, *a, **k: _CountingHandle(
                real_open(filename, *a, **k), self.read, Path(filename).parent.name)),
            mock.patch.object(AutoModelForSequenceClassification, "from_pretrained",
                              wraps=AutoModelForSequenceClassification.from_pretrained)]
        self.whole = self.patches[1].start()
        self.patches[0].start()

    def on_train_start(self, trainer, pl_module):
        from llama2_lit.generation.engine import Engine, Sampling
        from llama2_lit.models.sharding import fsdp_modules, local_numel

        for patch in self.patches:
            patch.stop()
        rank, out = trainer.global_rank, Path(trainer.default_root_dir)
        models = pl_module._sharded_models()
        for m in models.values():  # a forward leaves the last layer gathered (it does not reshard after forward)
            for mod in fsdp_modules(m):
                mod.reshard()
        rec = {"world": trainer.world_size, "local": {k: local_numel(m) for k, m in models.items()},
               "total": {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()},
               "rm_read": self.read, "rm_whole_loads": self.whole.call_count}
        full = {f"{k}/{n}": p.full_tensor().detach().cpu() for k, m in models.items() for n, p in m.named_parameters()}
        if trainer.is_global_zero:
            torch.save(full, out / "full_weights.pt")
        prompts = GEN_PROMPTS[rank::2]  # different prompts per rank: answers of different lengths
        with pl_module._rollout_engine() as engine:
            rec["gathered_backend"] = engine.backend
            rec["gathered"] = engine.generate(prompts, Sampling(**GEN)).response_ids.tolist()
        gather, engine0 = pl_module.opts.get("gather_for_generation", True), pl_module.engine
        pl_module.opts["gather_for_generation"], pl_module.engine = False, Engine(pl_module.model, pl_module.tokenizer)
        try:
            with pl_module._rollout_engine() as engine:
                rec["sharded_backend"] = engine.backend
                rec["sharded"] = engine.generate(prompts, Sampling(**GEN)).response_ids.tolist()
        finally:
            pl_module.opts["gather_for_generation"], pl_module.engine = gather, engine0
        (out / f"ppo_probe.rank{rank}.json").write_text(json.dumps(rec))


@pytest.mark.slow
@pytest.mark.fsdp
def test_ppo_sharded_on_two_processes_gathers_for_generation_and_loads_shard_by_shard(tmp_path, parts, tok, cache_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from llama2_lit.generation.engine import Engine, Sampling

    run_dir, took = _launch(tmp_path / "out", cache_dir, f"model.path={parts / 'policy'}",
                            f"ppo.reward_models.helpfulness={parts / 'helpfulness'}",
                            f"ppo.reward_models.safety={parts / 'safety'}", base=PPO, stage="ppo")
    r = [json.loads((run_dir / f"ppo_probe.rank{i}.json").read_text()) for i in (0, 1)]
    assert r[0]["world"] == 2 and r[0]["total"] == r[1]["total"]
    for k, total in r[0]["total"].items():  # each rank holds about half of every model
        assert r[0]["local"][k] + r[1]["local"][k] == total, k
        assert abs(r[0]["local"][k] - total / 2) <= 0.02 * total, k
    print("\nparameters per rank (rank 0 / rank 1 / total): " + ", ".join(
        f"{k} {r[0]['local'][k]}/{r[1]['local'][k]}/{t}" for k, t in r[0]["total"].items()))
    # the reward models: built on meta, never loaded whole; each rank read from an RM's safetensors files exactly
    # the elements of its own shard (about half), nothing from any other file while they loaded
    for rank in (0, 1):
        assert r[rank]["rm_whole_loads"] == 0
        assert r[rank]["rm_read"] == {n: r[rank]["local"][f"rm_{n}"] for n in ("helpfulness", "safety")}
    print("reward-model elements read from safetensors per rank (rank 0 / rank 1 / total): " + ", ".join(
        f"{n} {r[0]['rm_read'][n]}/{r[1]['rm_read'][n]}/{r[0]['total'][f'rm_{n}']}" for n in ("helpfulness", "safety")))

    # sharded loading: each rank read its own rows of the safetensors files; gathered, the weights are the files'
    full = torch.load(run_dir / "full_weights.pt")
    files = {"policy": "policy", "ref": "policy", "value": "helpfulness", "rm_helpfulness": "helpfulness",
             "rm_safety": "safety"}
    for model, folder in files.items():
        saved = load_file(parts / folder / "model.safetensors")
        mine = {k.split("/", 1)[1]: v for k, v in full.items() if k.startswith(model + "/")}
        assert mine and all(torch.equal(v, saved[k]) for k, v in mine.items()), model
        if model.startswith("rm_"):  # every tensor of the RM's files, bit for bit
            assert mine.keys() == saved.keys() and all(v.dtype == saved[k].dtype for k, v in mine.items()), model
    whole = AutoModelForCausalLM.from_pretrained(parts / "policy").eval()  # the same checkpoint read whole
    assert all(torch.equal(full[f"policy/{k}"], v) for k, v in whole.named_parameters())

    # generation: gathered weights (llama backend) and the sharded policy (hf backend, ranks in lockstep) give
    # the unsharded model's tokens for the same seed
    for rank in (0, 1):
        want = Engine(whole, tok).generate(GEN_PROMPTS[rank::2], Sampling(**GEN)).response_ids.tolist()
        assert r[rank]["gathered_backend"] == "llama" and r[rank]["gathered"] == want
        assert r[rank]["sharded_backend"] == "hf" and r[rank]["sharded"] == want
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # ppo.iterations=2 runs 2 iterations (not 2 / ranks) of stage.batch_size=4 prompts over both ranks, each with
    # batch / mini-batch x ppo_epochs = 4 / 2 x 1 = 2 optimizer steps
    assert metrics["ppo/iteration"] == 2.0 and metrics["ppo/prompts"] == 4.0 and metrics["ppo/optimizer_steps"] == 2.0
    assert metrics["trainer/steps"] == 4.0 and metrics["ppo/skipped_batches"] == 0.0
    trained = AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    assert not torch.equal(trained.model.layers[0].mlp.up_proj.weight, whole.model.layers[0].mlp.up_proj.weight)
    print(f"sharded PPO run (2 iterations) took {took:.0f} s; generation with gathered weights equals unsharded")


def test_reward_model_built_on_meta_and_filled_from_its_files_scores_as_from_pretrained(parts, tmp_path):
    """The sharded path's reward model (``load_exported(on_meta=True)``: config only, weights from the folder's
    safetensors by ``load_safetensors_``) is the whole-read model, tensor for tensor and score for score; a folder
    whose files lack the scalar head is refused rather than given a fresh head."""
    import shutil

    from safetensors.torch import load_file, save_file

    from llama2_lit.errors import UserError
    from llama2_lit.models.init import has_meta, materialize_
    from llama2_lit.models.reward import load_exported, score
    from llama2_lit.models.shard_loading import load_safetensors_

    whole, tok = load_exported(parts / "helpfulness")
    meta, tok2 = load_exported(parts / "helpfulness", on_meta=True)
    assert has_meta(meta) and not meta.training and meta.config._attn_implementation == whole.config._attn_implementation
    load_safetensors_(materialize_(meta, "cpu"), meta.checkpoint_source)
    assert whole.state_dict().keys() == meta.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), meta.state_dict().values()))
    prompts, answers = ["What is 2 + 3?", "Name a colour."], ["5", "blue, I think"]
    assert torch.equal(score(whole, tok, prompts, answers), score(meta, tok2, prompts, answers))

    headless = tmp_path / "headless"
    shutil.copytree(parts / "helpfulness", headless)
    tensors = {k: v for k, v in load_file(headless / "model.safetensors").items() if not k.startswith("score.")}
    save_file(tensors, headless / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="lack 1 parameters .score.weight"):
        load_exported(headless, on_meta=True)


DPO = [
    "stage=dpo", "logger=none", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    "trainer.limit_val_batches=1", "trainer.max_steps=3", "data.synthetic.policy=perturb", "data.synthetic.num_train=60",
    "data.synthetic.num_val=8", "data.synthetic.num_eval=4", "~callbacks.gold_eval", "stage.pairs_per_step=8",
    "stage.module.lr=1e-3", "stage.module.warmup_ratio=0", "stage.module.kl_prompts=4",
    "+callbacks.probe._target_=tests.test_fsdp.Probe",
]


@pytest.mark.slow
@pytest.mark.fsdp
def test_dpo_sharded_on_two_processes_matches_one_process(tmp_path, parts, cache_dir):  # noqa: F811
    """stage=dpo under trainer=fsdp: policy and reference sharded, each rank half the policy; 8 pairs per step as
    one rank x 2 micro-batches of 4 or 2 ranks x 1; the same losses as one process (the reference log-probs of each
    rank's pairs computed on that rank)."""
    run_dir, took = _launch(tmp_path / "two", cache_dir, f"model.path={parts / 'policy'}", base=DPO, stage="dpo")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    one = tmp_path / "one"
    proc = subprocess.run([sys.executable, "-m", "llama2_lit", *DPO, f"model.path={parts / 'policy'}",
                           "stage.batch_size=4", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={one}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two0, two1, single = _probe(run_dir, 0), _probe(run_dir, 1), _probe(one)
    assert two0["world"] == 2 and two0["local_params"] + two1["local_params"] == single["local_params"]
    # the same three optimizer steps on the same 24 pairs: the trained models give the same logits
    diff = (torch.load(run_dir / "probe_logits.pt") - torch.load(one / "probe_logits.pt")).abs().max().item()
    assert diff < 1e-4, diff
    assert two0["loss"][1] == pytest.approx(0.6931, abs=1e-3)  # the policy is the reference at step 1: log 2
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["trainer/steps"] == 3.0 and "dpo/accuracy" in metrics and "dpo/kl" not in metrics  # KL: unsharded
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(parts / "policy")
    trained = AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    assert not torch.equal(trained.model.layers[0].mlp.up_proj.weight, start.model.layers[0].mlp.up_proj.weight)
    print(f"\nDPO on 2 sharded processes: final logits within {diff:.2g} of one process; {took:.0f} s")
