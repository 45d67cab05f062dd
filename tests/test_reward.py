"""Reward models: loading from a causal LM, one-forward scoring, export round trip, freezing, end to end stage=rm."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaForCausalLM

from data_modules.pairwise import collate_pairs, encode_pairs, pad_right
from data_modules.preferences import to_pair
from llama2_lit.errors import UserError
from llama2_lit.core.losses import ranking_loss
from llama2_lit.models.loading import llama_config
from llama2_lit.models.reward import freeze_lower_layers, load_exported, load_reward_model, rewards, score
from llama2_lit.run import build, run

TINY = {"path": None, "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                                 "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}}
PROMPTS = ["Reverse the word: lemon", "What is 23 + 7?", "Sort the digits: 5 2 9 1",
           [{"role": "user", "content": "Uppercase the word: cat"}, {"role": "assistant", "content": "CAT"},
            {"role": "user", "content": "Repeat the word dog 3 times."}]]
CHOSEN = ["nomel", "30", "1 2 5 9", "dog dog dog"]
REJECTED = ["nomle lemon lemon lemon", "31", "1 2 5", "dog"]
RATINGS = ["better", "slightly_better", "significantly_better", None]


def _module(tok, **kw):
    from llama2_lit.modules.reward import RewardModule

    torch.manual_seed(0)
    return RewardModule(TINY, tokenizer=tok, **kw).eval()


def _batch(tok, margin="small"):
    pairs = [to_pair({"prompt": p, "chosen": c, "rejected": r, "rating": g})
             for p, c, r, g in zip(PROMPTS, CHOSEN, REJECTED, RATINGS)]
    enc, _ = encode_pairs(pairs, tok, max_length=128, margin=margin)
    return enc, collate_pairs(enc, tok.pad_token_id)


def test_one_forward_scores_equal_two_separate_forwards(tok):
    m = _module(tok)
    enc, batch = _batch(tok)
    assert len({len(p.chosen) for p in enc} | {len(p.rejected) for p in enc}) > 2  # real padding in play
    with torch.no_grad():
        chosen, rejected = m.pair_rewards(batch)  # one forward over the 2B concatenated rows
        c_ids, c_mask = pad_right([p.chosen for p in enc], tok.pad_token_id)  # each side padded to its own max
        r_ids, r_mask = pad_right([p.rejected for p in enc], tok.pad_token_id)
        c2, r2 = rewards(m.model, c_ids, c_mask), rewards(m.model, r_ids, r_mask)
        alone = [rewards(m.model, torch.tensor([p.chosen]), torch.ones(1, len(p.chosen), dtype=torch.long)).item()
                 for p in enc]  # no padding at all
    assert chosen.shape == rejected.shape == (4,)
    torch.testing.assert_close(chosen, c2, atol=1e-5, rtol=0)
    torch.testing.assert_close(rejected, r2, atol=1e-5, rtol=0)
    torch.testing.assert_close(chosen, torch.tensor(alone), atol=1e-5, rtol=0)


def test_module_loss_is_the_ranking_loss_with_row_margins(tok):
    m = _module(tok)
    _, batch = _batch(tok, margin="large")
    assert batch["margin"].tolist() == [2.0, 1.0, 3.0, 0.0]
    with torch.no_grad():
        loss, c, r = m._step(batch, "val")
    expected = -torch.nn.functional.logsigmoid(c - r - torch.tensor([2.0, 1.0, 3.0, 0.0])).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(loss, ranking_loss(c, r, batch["margin"]))


def test_export_loads_with_auto_class_and_scores_identically(tok, tmp_path):
    m = _module(tok, reward_name="safety", margin="large")
    with torch.no_grad():  # make the head non-trivial
        m.model.score.weight.normal_()
    _, batch = _batch(tok)
    with torch.no_grad():
        chosen, rejected = m.pair_rewards(batch)
    m.export(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["id2label"] == {"0": "reward"}
    assert cfg["pad_token_id"] == tok.pad_token_id and cfg["llama2_lit"] == {"reward": "safety", "margin": "large"}
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == tok2.pad_token_id != tok2.eos_token_id
    got_c = score(hf, tok2, PROMPTS, CHOSEN, batch_size=3)
    got_r = score(hf, tok2, PROMPTS, REJECTED, batch_size=2)
    torch.testing.assert_close(got_c, chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_r, rejected, atol=1e-5, rtol=0)
    # the module's own helper and load_exported agree
    torch.testing.assert_close(m.score(PROMPTS, CHOSEN), chosen, atol=1e-5, rtol=0)
    rm, tok3 = load_exported(tmp_path / "hf")
    torch.testing.assert_close(score(rm, tok3, PROMPTS, REJECTED), rejected, atol=1e-5, rtol=0)


def test_load_from_a_causal_lm_checkpoint_replaces_the_head_and_freezes(tok, tmp_path):
    torch.manual_seed(1)
    lm = LlamaForCausalLM(llama_config(tok, TINY["config"]))
    lm.save_pretrained(tmp_path / "lm")
    rm = load_reward_model({"path": str(tmp_path / "lm")}, tok)
    assert type(rm).__name__ == "LlamaForSequenceClassification" and rm.score.weight.shape == (1, 32)
    torch.testing.assert_close(rm.model.layers[0].mlp.up_proj.weight, lm.model.layers[0].mlp.up_proj.weight)
    assert rm.config.pad_token_id == tok.pad_token_id and not hasattr(rm, "lm_head")

    assert freeze_lower_layers(rm, -1) == 2  # all but the top layer
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert "model.embed_tokens.weight" not in trainable and "score.weight" in trainable
    assert [all(not p.requires_grad for p in layer.parameters()) for layer in rm.model.layers] == [True, True, False]
    assert rm.model.norm.weight.requires_grad
    with pytest.raises(UserError, match="has 3 decoder layers"):
        freeze_lower_layers(rm, 4)
    rm2 = load_reward_model(dict(TINY, freeze_layers=1), tok)
    assert [all(not p.requires_grad for p in layer.parameters()) for layer in rm2.model.layers] == [True, False, False]


def test_pad_equal_to_eos_is_refused(tok):
    from copy import deepcopy

    bad = deepcopy(tok)
    bad.pad_token = bad.eos_token
    with pytest.raises(UserError, match="pad token distinct from EOS"):
        load_reward_model(TINY, bad)


RM = ["stage=rm", "data=synthetic_pairs", "data.synthetic.policy=perturb", "stage.pairs_per_step=8",
      "stage.module.warmup_steps=1"]


def test_stage_rm_end_to_end_on_tiny_with_synthetic_pairs(make_cfg, tmp_path):
    metrics = run(make_cfg(*RM, "reward.margin=large"))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    for key in ("train/loss", "val/loss", "val/accuracy", "val/count", "data/mix/helpfulness", "data/mix/safety",
                "data/train/pairs", "data/synthetic/train/pairs"):
        assert key in saved, key
    assert saved["trainer/steps"] == 3 and 0.0 <= saved["val/accuracy"] <= 1.0
    assert any(k.startswith("val/accuracy/") for k in saved) and any(k.startswith("val/count/") for k in saved)
    assert (tmp_path / "pairs" / "train.jsonl").exists()
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert hf.config.num_labels == 1 and hf.config.llama2_lit == {"reward": "helpfulness", "margin": "large"}


def test_pairs_per_step_sets_gradient_accumulation(make_cfg):
    cfg = make_cfg(*RM, "reward=safety", "trainer.max_steps=2", "trainer.limit_val_batches=0")
    dm, module, trainer = build(cfg)
    trainer.fit(module, datamodule=dm)
    assert trainer.accumulate_grad_batches == 2  # 8 pairs per step / 4 per micro-batch
    assert trainer.global_step == 2 and trainer.fit_loop.epoch_loop.batch_progress.total.completed == 4
    assert dm.stats["data/mix/safety"] > dm.stats["data/mix/helpfulness"] > 0  # the 90/10 mix


def test_stage_rm_without_pair_data_is_a_clear_error(make_cfg):
    with pytest.raises(UserError, match="stage=rm needs preference pairs.*data=synthetic_pairs"):
        run(make_cfg("stage=rm", "data=synthetic", "data.synthetic.num_train=8", "data.synthetic.num_val=4"))


@pytest.mark.parametrize("overrides", [
    ["experiment=rm_tiny"], ["experiment=rm_margin_sweep"], ["experiment=rm_hh_harmless_smollm2"],
    ["stage=rm", "data=pairs", "data.path=x.jsonl"], ["stage=rm", "data=hh_harmless", "reward=safety"],
    ["stage=rm", "model=llama2_70b", "data=synthetic_pairs"],
])
def test_rm_configs_compose(overrides, make_cfg):
    cfg = make_cfg(*overrides, small=False)
    assert cfg.stage.name == "rm" and cfg.data._target_ == "data_modules.pairwise.PairwiseDataModule"
    assert cfg.data.margin == cfg.reward.margin and cfg.data.reward == cfg.reward.name
    if "model=llama2_70b" in overrides:
        assert cfg.stage.module.lr == 5e-6
    if "experiment=rm_hh_harmless_smollm2" in overrides:
        assert cfg.stage.module.freeze_layers == 24 and cfg.data.format == "hh" and cfg.reward.name == "safety"


def test_margin_summary_table(tmp_path):
    from llama2_lit.tools.summarize import write_table

    for i, (margin, accs) in enumerate([("large", (0.9, 0.7, 0.6, 0.5)), ("none", (0.8, 0.6, 0.55, 0.5)),
                                        ("small", (0.85, 0.65, 0.6, 0.45))]):
        run_dir = tmp_path / str(i)
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra" / "config.yaml").write_text(f"reward:\n  margin: {margin}\n")
        m = {f"val/accuracy/{b}": a for b, a in zip(
            ("significantly_better", "better", "slightly_better", "negligibly_better"), accs)}
        m.update({"val/accuracy": sum(accs) / 4, "val/count": 40})
        (run_dir / "metrics.json").write_text(json.dumps(m))
    text = write_table(tmp_path)
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert lines[1:] == ["| No Margin | 80.0 | 60.0 | 55.0 | 50.0 | 61.3 | 40 |",
                         "| Margin Small | 85.0 | 65.0 | 60.0 | 45.0 | 63.8 | 40 |",
                         "| Margin Large | 90.0 | 70.0 | 60.0 | 50.0 | 67.5 | 40 |"]
    assert json.loads((tmp_path / "margin_table.json").read_text())["rows"][0]["value"] == "none"


def test_margin_sweep_cli_writes_the_table(tmp_path, cache_dir):
    """experiment=rm_margin_sweep: three RMs (margin none, small, large) in one multirun, then the Table 28 file."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT, SMALL

    args = SMALL + ["data.synthetic.policy=perturb", "stage.pairs_per_step=4", "trainer.max_steps=2"]
    r = subprocess.run([sys.executable, "-m", "llama2_lit", "-m", "experiment=rm_margin_sweep", *args,
                        f"paths.cache_dir={cache_dir}", f"hydra.sweep.dir={tmp_path}/sweep"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert r.returncode == 0, r.stderr[-3000:]
    table = (tmp_path / "sweep" / "margin_table.md").read_text()
    rows = [ln.split(" | ")[0] for ln in table.splitlines() if ln.startswith("| ") and "Avg" not in ln]
    assert rows == ["| No Margin", "| Margin Small", "| Margin Large"]
    assert len(list((tmp_path / "sweep").glob("*/hf/model.safetensors"))) == 3
