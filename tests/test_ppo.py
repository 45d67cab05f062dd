"""stage=ppo on model=tiny: config wiring (β from the model config, prompt data), one PPO iteration end to end
(the policy and critic move, π₀ and the reward models stay bit-identical), bad input (NaN rewards, a critic with
another tokenizer, untagged prompts, missing prerequisites)."""
import json

import pytest
import torch

from llama2_lit.errors import UserError


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: single-threaded tiny models


DIMS = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "max_position_embeddings": 256}


@pytest.fixture(scope="module")
def parts(tmp_path_factory, tok):
    """A random-init tiny policy and two random-init reward models, saved as HF folders."""
    from llama2_lit.models.loading import load_causal_lm
    from llama2_lit.models.reward import export_reward_model, load_reward_model

    root = tmp_path_factory.mktemp("ppo_parts")
    torch.manual_seed(0)
    policy = load_causal_lm({"config": DIMS}, tok)
    policy.save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    for i, name in enumerate(("helpfulness", "safety")):
        torch.manual_seed(10 + i)
        export_reward_model(load_reward_model({"config": DIMS}, tok), tok, root / name, metadata={"reward": name})
    return root


def ppo_overrides(parts, *extra):
    return ["stage=ppo", f"model.path={parts / 'policy'}", f"ppo.reward_models.helpfulness={parts / 'helpfulness'}",
            f"ppo.reward_models.safety={parts / 'safety'}", "ppo.iterations=2", "stage.batch_size=8",
            "ppo.mini_batch_size=4", "ppo.ppo_epochs=2", "ppo.max_new_tokens=6", "ppo.eval.max_new_tokens=6", "stage.val_check_interval=2",
            "data.val_batch_size=4", "data.synthetic.num_train=40", "trainer.max_steps=-1", *extra]


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_beta_is_read_from_the_model_config(make_cfg):
    assert make_cfg("stage=ppo", small=False).ppo.kl_coef == 0.01  # tiny
    assert make_cfg("stage=ppo", "model=llama2_7b", small=False).ppo.kl_coef == 0.01
    assert make_cfg("stage=ppo", "model=llama2_13b", small=False).ppo.kl_coef == 0.01
    assert make_cfg("stage=ppo", "model=llama2_70b", small=False).ppo.kl_coef == 0.005


def test_ppo_stage_composes_with_prompt_data_and_paper_defaults(make_cfg):
    cfg = make_cfg("stage=ppo", "model=llama2_7b", small=False)
    assert cfg.data._target_ == "data_modules.prompts.PromptDataModule"
    assert cfg.data.num_batches == cfg.ppo.iterations == 200
    assert (cfg.stage.batch_size, cfg.ppo.mini_batch_size, cfg.ppo.clip, cfg.ppo.lr) == (512, 64, 0.2, 1e-6)
    assert (cfg.ppo.safety_threshold, list(cfg.ppo.betas), cfg.ppo.eps, cfg.ppo.weight_decay) == (
        0.15, [0.9, 0.95], 1e-5, 0.1)
    assert cfg.trainer.gradient_clip_val is None and cfg.trainer.log_every_n_steps == 1
    # the command line still chooses the data; other stages keep theirs
    assert make_cfg("stage=ppo", "data=rs_prompts", small=False).data.get("num_batches") is None
    assert make_cfg(small=False).data._target_ == "data_modules.sft.PackedSFTDataModule"


def test_one_ppo_run_moves_the_policy_and_critic_only(make_cfg, parts, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from llama2_lit.run import build

    cfg = make_cfg(*ppo_overrides(parts))
    dm, module, trainer = build(cfg)
    policy0, value0, ref0 = state(module.model), state(module.value_model), state(module.ref_model)
    rm_h = state(AutoModelForSequenceClassification.from_pretrained(parts / "helpfulness"))
    assert same(policy0, ref0)
    # the critic starts as the helpfulness RM (ppo.value_init=auto with an RM given)
    assert same({k: v for k, v in value0.items()}, rm_h)
    trainer.fit(module, datamodule=dm)
    # 2 iterations x (8 prompts / mini-batches of 4) x ppo_epochs 2 = 8 optimizer steps (one optimizer over the
    # policy and the critic: one step each)
    steps = cfg.ppo.iterations * (cfg.stage.batch_size // cfg.ppo.mini_batch_size) * cfg.ppo.ppo_epochs
    assert steps == 8 and trainer.global_step == steps and module.iteration == 2
    assert not same(policy0, state(module.model))
    assert not same(value0, state(module.value_model))
    assert same(ref0, state(module.ref_model))
    for name, (model, _) in module.scorer.models.items():
        assert same(state(AutoModelForSequenceClassification.from_pretrained(parts / name)), state(model))
        assert not any(p.requires_grad for p in model.parameters())
    m = trainer.callback_metrics
    for key in ("ppo/reward_raw", "ppo/kl", "ppo/entropy", "ppo/clip_frac", "ppo/approx_kl", "ppo/value_loss",
                "ppo/explained_variance", "ppo/response_length", "ppo/safety_scored_frac", "time/generation_s",
                "time/scoring_s", "time/training_s", "val/reward", "val/gold_helpfulness"):
        assert key in m and torch.isfinite(m[key]), key
    assert 0.0 <= float(m["ppo/reward_raw"]) <= 1.0


def test_ppo_end_to_end_writes_outputs(make_cfg, parts, tmp_path):
    from transformers import AutoModelForCausalLM

    from llama2_lit.run import run

    metrics = run(make_cfg(*ppo_overrides(parts), out=tmp_path))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    for key in ("val/reward_init", "val/reward", "val/reward_greedy", "val/gold_helpfulness_greedy_init",
                "eval/gold_helpfulness", "val/gold_helpfulness_init",
                "ppo/kl", "data/prompts_without_safety_tag"):
        assert key in saved, key
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf") is not None
    assert (tmp_path / "value" / "config.json").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    # every iteration's scalars, with the gold of its rollouts (world prompts), for the over-optimisation probe
    history = [json.loads(line) for line in (tmp_path / "ppo_history.jsonl").read_text().splitlines()]
    assert [h["ppo/iteration"] for h in history] == [float(i) for i in range(1, int(saved["ppo/iteration"]) + 1)]
    assert all(0.0 <= h["ppo/gold_helpfulness"] <= 1.0 and "ppo/kl" in h and "ppo/helpfulness_score" in h
               for h in history)


def test_nan_rewards_skip_then_stop(make_cfg, parts, monkeypatch):
    from llama2_lit.run import build
    from llama2_lit.scoring import RMScorer

    def nan_scores(self, prompts, responses):
        h = torch.full((len(prompts),), float("nan"), dtype=torch.float64)
        return h, h.clone()

    monkeypatch.setattr(RMScorer, "__call__", nan_scores)
    dm, module, trainer = build(make_cfg(*ppo_overrides(parts, "ppo.iterations=5", "ppo.max_bad_batches=3",
                                                        "initial_validation=false", "stage.val_check_interval=5")))
    with pytest.raises(UserError, match="3 iterations in a row were skipped"):
        trainer.fit(module, datamodule=dm)
    assert module.skipped == 3 and trainer.global_step == 0


def test_critic_with_another_tokenizer_is_refused(make_cfg, parts, cache_dir, tmp_path):
    from llama2_lit.models.loading import load_tokenizer
    from llama2_lit.models.reward import export_reward_model, load_reward_model
    from llama2_lit.run import build

    other = load_tokenizer(kind="world_bpe", vocab_size=400, cache_dir=cache_dir)
    export_reward_model(load_reward_model({"config": DIMS}, other), other, tmp_path / "rm_other")
    from hydra.errors import InstantiationException

    cfg = make_cfg(*ppo_overrides(parts, f"ppo.reward_models.helpfulness={tmp_path / 'rm_other'}"))
    with pytest.raises(InstantiationException, match="UserError.*different tokenizer"):  # __main__ unwraps it
        build(cfg)
    # the reward models themselves re-tokenise through text: with the critic from the policy it runs
    dm, module, _ = build(make_cfg(*ppo_overrides(parts, f"ppo.reward_models.helpfulness={tmp_path / 'rm_other'}",
                                                  "ppo.value_init=policy")))
    assert module.value_model.config.vocab_size == module.model.config.vocab_size


def test_prompts_without_a_safety_tag_default_to_false_and_are_counted(tmp_path, tok):
    from data_modules.prompts import PromptDataModule

    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n{"prompt": "b", "is_safety": true}\n{"prompt": "c"}\n')
    dm = PromptDataModule(tok, path=str(f), batch_size=2, num_batches=3, val_path=str(f))
    ps = dm.prompts()
    assert [p.is_safety for p in ps] == [False, True, False]
    assert dm.stats["data/prompts_without_safety_tag"] == 2.0
    batches = list(dm.train_dataloader())
    assert len(batches) == 3 and all(len(b) == 2 for b in batches)
    # 6 draws over 3 prompts: two full passes, each prompt twice
    drawn = sorted(p.text for b in batches for p in b)
    assert drawn == ["a", "a", "b", "b", "c", "c"]
    assert [p.text for b in dm.val_dataloader() for p in b] == ["a", "b", "c"]


def test_missing_prerequisites_are_clear_errors(make_cfg, tmp_path):
    from llama2_lit.stages.bootstrap import prepare_ppo

    with pytest.raises(UserError, match="model.path, ppo.reward_models.helpfulness, ppo.reward_models.safety"):
        prepare_ppo(make_cfg("stage=ppo", "ppo.bootstrap.enabled=false"))
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n')
    with pytest.raises(UserError, match="synthetic world only"):
        prepare_ppo(make_cfg("stage=ppo", f"data.path={f}"))


BOOT_SFT = ["logger=none", "trainer.max_steps=3", "trainer.enable_model_summary=false", "data.synthetic.num_train=120",
            "data.synthetic.num_val=16", "data.synthetic.num_eval=4", "stage.seq_len=128", "stage.batch_size=4",
            "callbacks.gold_eval.at_start=false", "callbacks.gold_eval.max_new_tokens=4",
            "model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_hidden_layers=2"]
BOOT_RM = ["logger=none", "trainer.max_steps=2", "trainer.enable_model_summary=false", "data.synthetic.num_train=80",
           "data.synthetic.policy=perturb",
           "data.synthetic.num_val=60", "data.synthetic.max_new_tokens=4", "stage.batch_size=4",
           "stage.pairs_per_step=4"]


def _hydra_list(items):
    return "[" + ",".join(f"'{x}'" for x in items) + "]"


@pytest.mark.slow
def test_bootstrap_trains_the_missing_policy_and_reward_models_once(make_cfg, tmp_path, caplog):
    """`python -m llama2_lit stage=ppo` with nothing given: SFT, then both RMs, then PPO; a second run reuses them."""
    from llama2_lit.run import run

    boot = tmp_path / "boot"
    over = ["stage=ppo", f"ppo.bootstrap.dir={boot}", f"ppo.bootstrap.sft_overrides={_hydra_list(BOOT_SFT)}",
            f"ppo.bootstrap.rm_overrides={_hydra_list(BOOT_RM)}", "ppo.iterations=1", "stage.batch_size=4",
            "ppo.mini_batch_size=4", "ppo.max_new_tokens=4", "ppo.eval.max_new_tokens=4", "trainer.max_steps=-1",
            f"paths.output_root={tmp_path}"]
    run(make_cfg(*over, out=tmp_path / "ppo1"))
    made = json.loads((tmp_path / "ppo1" / "bootstrap.json").read_text())
    assert set(made) == {"policy", "helpfulness", "safety"}
    for path in made.values():
        assert (boot / path.split("/")[-2] / "metrics.json").is_file()
    rm_cfg = json.loads((boot / made["safety"].split("/")[-2] / "hf" / "config.json").read_text())
    assert rm_cfg["llama2_lit"]["reward"] == "safety"
    stamps = {p: (boot / p.split("/")[-2] / "metrics.json").stat().st_mtime_ns for p in made.values()}
    caplog.clear()
    with caplog.at_level("INFO"):
        run(make_cfg(*over, out=tmp_path / "ppo2"))
    assert json.loads((tmp_path / "ppo2" / "bootstrap.json").read_text()) == made
    assert stamps == {p: (boot / p.split("/")[-2] / "metrics.json").stat().st_mtime_ns for p in made.values()}
    assert sum("bootstrap: reusing" in r.getMessage() for r in caplog.records) == 3
