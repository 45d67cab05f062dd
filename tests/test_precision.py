"""Precision policy: what trains keeps float32 master weights and float32 AdamW state under model.dtype=bfloat16;
bf16 is the compute dtype (bf16-mixed autocast; FSDP2's MixedPrecisionPolicy); model.dtype is the dtype of frozen
copies and exports. At the paper's learning rates bf16 weights would not move: an AdamW step of ~1e-6 on a weight
of ~0.02 is below half a bf16 ulp (2^-7 relative), so it rounds away."""
from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.conftest import ROOT

# 5 optimizer steps at lr 1e-6, no warm-up, on the seeded init (the same weights on any number of ranks)
BASE = [
    "logger=none", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    "trainer.limit_val_batches=0", "data.synthetic.num_train=120", "data.synthetic.num_val=16",
    "data.synthetic.num_eval=4", "stage.seq_len=128", "~callbacks.gold_eval", "model.config.hidden_size=32",
    "model.config.intermediate_size=64", "model.config.num_hidden_layers=2", "model.init=seeded",
    "trainer.max_steps=5", "stage.batch_size=4", "stage.module.lr=1e-6", "stage.module.warmup_steps=0",
    "stage.module.min_lr_ratio=1.0", "final_validation=false", "+callbacks.weights._target_=tests.test_precision.WeightProbe",
]
BF16 = ["model.dtype=bfloat16"]


class WeightProbe(L.Callback):
    """Saves (rank 0) the trained model's full weights at the first and the last step, the parameters' and the
    AdamW moments' dtypes (``weights.pt`` in the run directory). Sharded parameters are gathered: every rank joins."""

    @staticmethod
    def _full(pl_module) -> dict[str, torch.Tensor]:
        out = {}
        for n, p in pl_module.model.named_parameters():
            if p.requires_grad:
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                out[n] = full.detach().float().cpu().clone()
        return out

    def on_train_start(self, trainer, pl_module):
        self.start = self._full(pl_module)
        self.param_dtypes = sorted({str(p.dtype) for p in pl_module.model.parameters()})

    def on_train_end(self, trainer, pl_module):
        end = self._full(pl_module)
        opt = trainer.optimizers[0]
        moments = sorted({str(v.dtype) for st in opt.state.values() for k, v in st.items()
                          if k in ("exp_avg", "exp_avg_sq")})
        if trainer.is_global_zero:
            torch.save({"start": self.start, "end": end, "param_dtypes": self.param_dtypes, "moment_dtypes": moments,
                        "steps": trainer.global_step}, Path(trainer.default_root_dir) / "weights.pt")


def _moved(rec) -> float:
    n = sum(v.numel() for v in rec["start"].values())
    return sum((rec["end"][k] != v).sum().item() for k, v in rec["start"].items()) / n


def _delta(rec) -> torch.Tensor:
    return torch.cat([(rec["end"][k] - v).flatten() for k, v in rec["start"].items()])


def _compare(bf16, fp32) -> tuple[float, float, float]:
    """(max |param difference|, relative L2 difference of the two runs' updates, cosine of the updates)."""
    diff = max((bf16["end"][k] - fp32["end"][k]).abs().max().item() for k in fp32["end"])
    a, b = _delta(bf16), _delta(fp32)
    return diff, ((a - b).norm() / b.norm()).item(), torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def _one_process(out: Path, cache_dir: str, *extra: str) -> dict:
    """One process, 4 rows a step. Lightning's DDP with one process (gloo, world size 1) is that process plus the
    distributed sampler, which deals the rows in the order the 2-rank run's sampler does (tests/test_fsdp.py)."""
    from llama2_lit.config import compose
    from llama2_lit.run import run

    env = dict(os.environ)
    try:
        run(compose([*BASE, "trainer=cpu", "+trainer.strategy=ddp", *extra, f"paths.output_dir={out}",
                     f"paths.cache_dir={cache_dir}"]))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(env)
    return torch.load(out / "weights.pt")


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory, cache_dir):
    """The reference: float32 weights and compute."""
    return _one_process(tmp_path_factory.mktemp("fp32"), cache_dir)


def test_bf16_model_trains_float32_master_weights_under_bf16_mixed(tmp_path, cache_dir, fp32_run):
    """model.dtype=bfloat16 + trainer.precision=bf16-mixed in one process: 5 steps at lr 1e-6 move >= 90% of the
    weights; parameters and AdamW moments are float32; the result matches the fp32 run within bf16 compute
    tolerance; hf/ is exported in bfloat16."""
    from safetensors import safe_open

    rec = _one_process(tmp_path, cache_dir, *BF16, "trainer.precision=bf16-mixed")
    moved, moved_ref = _moved(rec), _moved(fp32_run)
    diff, rel, cos = _compare(rec, fp32_run)
    print(f"\none process, bf16-mixed: {moved:.2%} of weights moved (fp32 run: {moved_ref:.2%}); max |param - fp32 "
          f"run's| {diff:.2e}; updates: relative L2 difference {rel:.4f}, cosine {cos:.5f}")
    assert rec["steps"] == 5
    assert rec["param_dtypes"] == ["torch.float32"] and rec["moment_dtypes"] == ["torch.float32"]
    assert moved >= 0.90 and moved_ref >= 0.90
    assert rel < 0.05 and cos > 0.99 and diff < 1e-5  # bf16 rounding of activations, not a different update
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_bf16_weights_would_not_learn_at_the_papers_learning_rate():
    """Why the policy exists (the measured failure, as arithmetic): an AdamW step of 1e-6 on bf16 weights of the
    model's scale rounds to no change for almost every weight; float32 keeps it."""
    torch.manual_seed(0)
    w = torch.randn(10_000) * 0.02
    step = torch.full_like(w, 1e-6)
    bf = w.to(torch.bfloat16)
    moved_bf16 = ((bf - step.to(torch.bfloat16)) != bf).float().mean().item()
    moved_fp32 = ((w - step) != w).float().mean().item()
    assert moved_bf16 < 0.05 and moved_fp32 == 1.0


def test_16_bit_weight_precisions_are_refused(make_cfg):
    from llama2_lit.errors import UserError
    from llama2_lit.run import build

    with pytest.raises(UserError, match=r"trainer.precision=bf16-true would train 16-bit weights"):
        build(make_cfg("trainer.precision=bf16-true"))


def test_frozen_copies_follow_model_dtype_and_trainable_ones_stay_float32(tok):
    from llama2_lit.models.loading import load_causal_lm
    from llama2_lit.models.reward import load_reward_model

    cfg = {"dtype": "bfloat16", "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                           "num_attention_heads": 4, "num_key_value_heads": 4}}
    assert {p.dtype for p in load_causal_lm(cfg, tok).parameters()} == {torch.float32}
    assert {p.dtype for p in load_reward_model(cfg, tok).parameters()} == {torch.float32}
    assert {p.dtype for p in load_causal_lm(cfg, tok, trainable=False).parameters()} == {torch.bfloat16}


@pytest.mark.fsdp
def test_fsdp_bf16_trains_float32_shards_that_match_one_process(tmp_path, cache_dir, fp32_run):
    """trainer=fsdp on 2 gloo ranks with model.dtype=bfloat16 and bf16 mixed precision (bf16 compute and
    all-gathers, fp32 gradient reduction): float32 shards and AdamW moments, >= 90% of the weights moved in 5
    steps at lr 1e-6, and the same parameters as the one-process fp32 run within bf16 compute tolerance."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HYDRA_FULL_ERROR": "1"}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "llama2_lit", *BASE, *BF16, "trainer=fsdp", "trainer.devices=2",
           "trainer.accelerator=cpu", "trainer.strategy.mixed_precision=bf16", f"hydra.run.dir={out}",
           f"paths.cache_dir={cache_dir}", f"paths.output_root={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "batch sizes: 4 sequences per step (global) = 2 ranks x 2 per rank (1 micro-batch of 2)" in proc.stdout + proc.stderr
    rec = torch.load(out / "weights.pt")
    moved = _moved(rec)
    diff, rel, cos = _compare(rec, fp32_run)
    print(f"\n2 ranks, FSDP2 bf16: {moved:.2%} of weights moved; max |param - one-process fp32 run's| {diff:.2e}; "
          f"updates: relative L2 difference {rel:.4f}, cosine {cos:.5f}")
    assert rec["steps"] == 5
    assert rec["param_dtypes"] == ["torch.float32"] and rec["moment_dtypes"] == ["torch.float32"]
    assert moved >= 0.90
    assert rel < 0.05 and cos > 0.99 and diff < 1e-5  # bf16 rounding of activations, not a different update
