"""End to end: run(cfg) for each stage on model=tiny; the CLI, a multirun sweep and reproducibility."""
import json
import os
import subprocess
import sys

import pytest
import torch

from llama2_lit.run import run
from tests.conftest import ROOT, SMALL


def test_sft_end_to_end_writes_outputs_and_hf_export_reloads(make_cfg, tmp_path):
    cfg = make_cfg("stage=sft", "callbacks.gold_eval.at_start=true")
    metrics = run(cfg)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    for key in ("train/loss", "val/loss", "packing/efficiency", "eval/gold_helpfulness", "eval/gold_helpfulness_init"):
        assert key in saved, key
    assert saved["trainer/steps"] == 3
    assert 0.0 <= saved["eval/gold_helpfulness"] <= 1.0
    assert 0.0 <= saved["eval/gold_helpfulness_se"] <= 0.5 and "eval/gold_helpfulness_se_init" in saved
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert "perf/tokens_per_s" in json.loads((tmp_path / "perf.json").read_text())

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert tok.pad_token_id != tok.eos_token_id and tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "Reverse the word: lemon"}], tokenize=False,
                                   add_generation_prompt=True)
    enc = tok(text, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > enc["input_ids"].shape[1]
    # the export holds the trained weights: its logits match the last checkpoint's
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    w = ckpt["state_dict"]["model.model.embed_tokens.weight"]
    torch.testing.assert_close(model.model.embed_tokens.weight, w)


def test_pretrain_end_to_end(make_cfg, tmp_path):
    metrics = run(make_cfg("stage=pretrain"))
    assert metrics["trainer/steps"] == 3 and metrics["train/loss"] > 0
    assert metrics["packing/efficiency"] >= 0.9


def test_same_seed_same_metrics(make_cfg, tmp_path):
    a = run(make_cfg("seed=7", out=tmp_path / "a"))
    b = run(make_cfg("seed=7", out=tmp_path / "b"))
    assert (tmp_path / "a" / "metrics.json").read_text() == (tmp_path / "b" / "metrics.json").read_text()
    c = run(make_cfg("seed=8", out=tmp_path / "c"))
    assert c["train/loss"] != a["train/loss"]


def _cli(*args, cwd=ROOT, timeout=300):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "llama2_lit", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_run_writes_the_run_dir(tmp_path, cache_dir):
    small = [s for s in SMALL if not s.startswith("logger=")]
    r = _cli(*small, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path}/run")
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "run"
    for name in ("metrics.json", "perf.json", "hf", "checkpoints", "tensorboard", ".hydra"):
        assert (run_dir / name).exists(), name
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents*"))


def test_multirun_over_two_learning_rates(tmp_path, cache_dir):
    r = _cli("-m", *SMALL, f"paths.cache_dir={cache_dir}", "stage.module.lr=1e-3,5e-3",
             f"hydra.sweep.dir={tmp_path}/sweep")
    assert r.returncode == 0, r.stderr[-3000:]
    runs = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    assert len(runs) == 2
    cfgs = [(p.parent / ".hydra" / "overrides.yaml").read_text() for p in runs]
    assert "stage.module.lr=0.001" in cfgs[0] + cfgs[1] and "stage.module.lr=0.005" in cfgs[0] + cfgs[1]
    losses = [json.loads(p.read_text())["train/loss"] for p in runs]
    assert losses[0] != losses[1]
