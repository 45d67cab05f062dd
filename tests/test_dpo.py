"""stage=dpo: answer masks token by token, the policy's batched log-probs against separate forwards, a tiny run that
changes the policy only (the reference bit-identical, its log-probs computed once per pair), exact resume, and hostile
pair files (issue 19)."""
from __future__ import annotations

import json

import pytest
import torch

from data_modules.pairwise import collate_pairs, encode_pairs
from data_modules.preferences import to_pair
from llama2_lit.errors import UserError
from tests.test_ppo import parts  # noqa: F401  (the random-init policy and reward models fixture)
from tests.test_resume import QUIET, killed_and_resumed, max_diff, reference, steps

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = [("What is 23 + 7?", "30", "31"), ("Reverse the word: lemon", "nomel", "nomle lemon"),
         ("Sort the digits: 5 2 9 1", "1 2 5 9", "9 5 2 1 1")]


def _batch(tok, max_length=128):
    pairs = [to_pair({"prompt": p, "chosen": c, "rejected": r, "rating": "better"}) for p, c, r in PAIRS]
    enc, _ = encode_pairs(pairs, tok, max_length=max_length, margin="small")
    return enc, collate_pairs(enc, tok.pad_token_id)


def test_answer_masks_token_by_token(tok):
    from data_modules.records import render

    enc, batch = _batch(tok)
    for i, (prompt, chosen, rejected) in enumerate(PAIRS):
        n_prompt = len(render(tok, [{"role": "user", "content": prompt}], add_generation_prompt=True))
        for side, answer in (("chosen", chosen), ("rejected", rejected)):
            ids, mask = batch[f"{side}_input_ids"][i], batch[f"{side}_attention_mask"][i]
            amask = batch[f"{side}_answer_mask"][i]
            n = int(mask.sum())
            assert amask.tolist() == [0] * n_prompt + [1] * (n - n_prompt) + [0] * (len(mask) - n)
            text = tok.decode(ids[amask.bool()].tolist())
            assert text.startswith(answer) and text != answer  # the answer, then the template's end of turn
    # truncated from the left: the answer keeps its tokens and the mask still starts at it
    _, short = _batch(tok, max_length=8)
    for side in ("chosen", "rejected"):
        assert (short[f"{side}_answer_mask"].sum(1) > 0).all()
        assert (short[f"{side}_answer_mask"] <= short[f"{side}_attention_mask"]).all()


def test_batched_answer_logps_equal_separate_unpadded_forwards(tok):
    from llama2_lit.core.losses import token_logprobs
    from llama2_lit.modules.dpo import DPOModule

    torch.manual_seed(0)
    m = DPOModule({"path": None, "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                            "num_attention_heads": 4, "num_key_value_heads": 2,
                                            "max_position_embeddings": 256, "initializer_range": 0.2}},
                  tokenizer=tok).eval()
    enc, batch = _batch(tok)
    with torch.no_grad():
        c, r = m.pair_logps(batch)
        for i, e in enumerate(enc):
            for got, ids, start in ((c[i], e.chosen, e.chosen_start), (r[i], e.rejected, e.rejected_start)):
                x = torch.tensor([ids])
                lp = token_logprobs(m.model(input_ids=x).logits[:, :-1], x[:, 1:])[0]
                torch.testing.assert_close(got, lp[start - 1:].sum(), atol=1e-4, rtol=0)
    assert (c < 0).all() and (r < 0).all()


def test_dpo_configs_compose(make_cfg):
    cfg = make_cfg("stage=dpo", small=False)
    assert cfg.stage.module._target_ == "llama2_lit.modules.dpo.DPOModule"
    assert (cfg.data.mix, cfg.data.gold_eval, cfg.data.path) == (False, True, "synthetic")
    assert (cfg.stage.module.beta, cfg.stage.module.loss_type, cfg.stage.seq_len) == (0.1, "sigmoid", 128)  # tiny
    files = make_cfg("stage=dpo", "data=pairs", "data.path=x.jsonl", small=False)
    assert (files.data.path, files.data.gold_eval) == ("x.jsonl", False)


DPO_SMALL = ["stage=dpo", "data.synthetic.policy=perturb", "data.synthetic.num_train=28", "data.synthetic.num_val=12",
             "data.synthetic.num_eval=4", "stage.pairs_per_step=8", "stage.module.kl_prompts=4",
             "stage.module.kl_max_new_tokens=4", "stage.module.lr=1e-3", "stage.module.warmup_ratio=0"]


def test_one_dpo_run_moves_the_policy_only_and_scores_each_pair_once_with_the_reference(make_cfg, parts, tmp_path):  # noqa: F811
    from llama2_lit.run import build

    cfg = make_cfg(*DPO_SMALL, f"model.path={parts / 'policy'}", "trainer.max_steps=-1", "stage.max_epochs=2",
                   "trainer.limit_val_batches=1.0")
    dm, module, trainer = build(cfg)
    policy0 = {k: v.clone() for k, v in module.model.state_dict().items()}
    ref0 = {k: v.clone() for k, v in module.ref_model.state_dict().items()}
    assert all(torch.equal(policy0[k], ref0[k]) for k in policy0)
    trainer.fit(module, datamodule=dm)
    assert any(not torch.equal(policy0[k], v) for k, v in module.model.state_dict().items())
    assert all(torch.equal(ref0[k], v) for k, v in module.ref_model.state_dict().items())
    assert not any(p.requires_grad for p in module.ref_model.parameters())
    # 2 epochs and several validations, yet every train and validation pair went through the reference once
    assert module.ref_forwards == len(dm.train_pairs) + len(dm.val_pairs) == len(module.ref_cache)
    m = trainer.callback_metrics
    for key in ("train/loss", "val/loss", "dpo/reward_margin", "dpo/accuracy"):
        assert key in m and torch.isfinite(m[key]), key
    assert any(k.startswith("dpo/accuracy/") for k in m)
    assert "dpo/kl" in module.final_metrics and module.final_metrics["dpo/kl_prompts"] == 4


def test_stage_dpo_writes_metrics_and_a_policy(make_cfg, parts, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM

    from llama2_lit.run import run

    metrics = run(make_cfg(*DPO_SMALL, f"model.path={parts / 'policy'}"))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    for key in ("dpo/accuracy", "dpo/reward_margin", "dpo/kl", "eval/gold_helpfulness", "eval/gold_safety",
                "dpo/ref_pairs_scored", "val/loss"):
        assert key in saved, key
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.config.llama2_lit == {"stage": "dpo", "beta": 0.1, "loss_type": "sigmoid"}


DPO_RESUME = [*DPO_SMALL, "trainer.max_steps=-1", "stage.max_epochs=2", "callbacks.checkpoint.every_n_steps=2",
              "stage.module.kl_prompts=0"]


def test_dpo_killed_mid_accumulation_resumes_exactly(make_cfg, tmp_path, cache_dir, parts):  # noqa: F811
    args = [*DPO_RESUME, f"model.path={parts / 'policy'}"]
    ref_metrics, ref = reference(make_cfg, tmp_path / "ref", args)
    n = len(ref)
    assert n >= 8 and ref[-1]["step"] == n // 2  # micro-batches of 4 pairs, 2 per optimizer step
    # killed after micro-batch 5 (half of step 3); the last checkpoint is step 2: batches 5.. are trained again
    run_dir = killed_and_resumed(tmp_path, cache_dir, args, 5, cli_resume=False, make_cfg=make_cfg)
    diff = max_diff(ref, steps(run_dir))
    print(f"\nDPO killed after micro-batch 5, resumed from step 2: max |diff| over {n} batches = {diff:.3g}")
    assert diff <= 1e-5
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["dpo/accuracy"] == pytest.approx(ref_metrics["dpo/accuracy"], abs=1e-5)
    assert metrics["val/loss"] == pytest.approx(ref_metrics["val/loss"], abs=1e-5)


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "hi", "chosen": "a"}], r"bad\.jsonl:1: field 'rejected' missing"),
    ([{"prompt": "hi", "chosen": "a", "rejected": "a"}], r"bad\.jsonl:1: field 'rejected' is identical to 'chosen'"),
    ([{"prompt": "hi", "chosen": "a", "rejected": "b", "rating": "meh"}], r"bad\.jsonl:1: field 'rating' unknown"),
], ids=["missing", "identical", "rating"])
def test_hostile_pair_files_give_the_reward_model_errors(make_cfg, parts, tmp_path, rows, message):  # noqa: F811
    from llama2_lit.run import run

    f = tmp_path / "bad.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    errors = []
    for stage in (["stage=rm"], ["stage=dpo", f"model.path={parts / 'policy'}"]):
        with pytest.raises(UserError, match=message) as e:
            run(make_cfg(*stage, "data=pairs", f"data.path={f}", "logger=none", small=False,
                         out=tmp_path / stage[0].split("=")[1]))
        errors.append(str(e.value))
    assert errors[0] == errors[1]


def test_dpo_with_lora_uses_the_base_model_as_reference(make_cfg, parts, tmp_path):  # noqa: F811
    from llama2_lit.run import build

    cfg = make_cfg(*DPO_SMALL, f"model.path={parts / 'policy'}", "model.lora.enabled=true", "model.lora.dropout=0",
                   "model.lora.target_modules=[q_proj,v_proj]", "trainer.max_steps=2")
    dm, module, trainer = build(cfg)
    assert module.ref_model is None  # no copy: the adapters switched off are the reference
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        loss, c, r = module._step(batch, "val")
    # LoRA's B matrices start at zero: the policy is its reference, every implicit reward 0, the loss log 2
    assert torch.equal(c, torch.zeros_like(c)) and torch.equal(r, torch.zeros_like(r))
    assert loss.item() == pytest.approx(0.693147, abs=1e-5)
    base0 = {k: v.clone() for k, v in module.model.named_parameters() if "lora_" not in k}
    lora0 = {k: v.clone() for k, v in module.model.named_parameters() if "lora_" in k}
    trainer.fit(module, datamodule=dm)
    named = dict(module.model.named_parameters())
    assert all(torch.equal(named[k], v) for k, v in base0.items())  # the reference (base weights) is untouched
    assert any(not torch.equal(named[k], v) for k, v in lora0.items())
