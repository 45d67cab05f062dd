"""stage=pipeline: the V1..Vn step order and hand-offs (mocked stage runner), resume after a crash without rerunning
finished steps, refusal of a pipeline directory made with other settings, the report."""
import json

import pytest
import torch

from llama2_lit.errors import UserError
from llama2_lit.stages.pipeline import execute, plan, report, run


def opts(root, iterations=5, ppo_from=4, **extra):
    return {"root": str(root), "iterations": iterations, "ppo_from": ppo_from, "seed": 7, **extra}


def arg(step, key):
    hits = [o.split("=", 1)[1] for o in step.overrides if o.startswith(key + "=")]
    assert len(hits) == 1, (step.name, key, step.overrides)
    return hits[0]


EVAL = ["eval_rm"] * 5 + ["eval_compare", "eval_overopt"]


def test_v1_to_v5_order_and_hand_offs(tmp_path):
    steps = plan(opts(tmp_path), ["model=tiny"], None)
    per_it = ["collect", "rm_helpfulness", "rm_safety", "rs", "rs_distill"]
    expected = ["sft"] + per_it * 3 + (per_it + ["ppo"]) * 2  # PPO from V4 on (paper)
    assert [s.kind for s in steps] == expected + EVAL  # then the held-out checks (world prompts)
    steps = [s for s in steps if not s.kind.startswith("eval")]
    assert [s.name for s in steps][:3] == ["v0/sft", "v1/collect", "v1/rm_helpfulness"]
    by = {s.name: s for s in steps}
    # each iteration samples from the previous iteration's final policy
    assert arg(by["v1/collect"], "model.path") == str(tmp_path / "v0/sft/hf")
    assert arg(by["v2/collect"], "model.path") == str(tmp_path / "v1/rs_distill/hf")
    assert arg(by["v5/collect"], "model.path") == str(tmp_path / "v4/ppo/hf")
    # PPO starts from the same iteration's RS checkpoint and scores with that iteration's RMs
    assert arg(by["v4/ppo"], "model.path") == str(tmp_path / "v4/rs_distill/hf")
    assert arg(by["v4/ppo"], "ppo.reward_models.safety") == str(tmp_path / "v4/rm_safety/hf")
    # RMs train on every preference collected so far
    assert arg(by["v3/rm_safety"], "data.path") == "[" + ",".join(
        f"'{tmp_path}/v{k}/collect/pairs.jsonl'" for k in (1, 2, 3)) + "]"
    # rejection sampling: one bag for all iterations, numbered
    assert arg(by["v3/rs"], "rs.iteration") == "3" and arg(by["v3/rs"], "rs.bag_dir") == str(tmp_path / "rs_bag")
    assert arg(by["v3/rs_distill"], "data.path") == str(tmp_path / "v3/rs")
    # from V2 on the second answer of a pair comes from the previous policy (two model variants)
    assert "collect.sources.1.model=" + str(tmp_path / "v0/sft/hf") in by["v2/collect"].overrides
    assert not any(o.startswith("collect.sources") for o in by["v1/collect"].overrides)
    # new prompts for every collection
    assert len({arg(by[f"v{k}/collect"], "data.seed") for k in range(1, 6)}) == 5
    # a given starting policy skips SFT
    given = plan(opts(tmp_path, iterations=1, evaluate=False), [], "/ckpt/sft")
    assert [s.kind for s in given] == per_it and arg(given[0], "model.path") == "/ckpt/sft"
    # RS and PPO score with the trained RMs unless pipeline.scorer says gold (the RMs are trained either way)
    assert arg(by["v1/rs"], "rs.scorer") == "rm" and arg(by["v5/ppo"], "ppo.scorer") == "rm"
    gold = {s.name: s for s in plan(opts(tmp_path, scorer="gold", evaluate=False), [], None)}
    assert [s.kind for s in gold.values()] == expected
    assert arg(gold["v3/rs"], "rs.scorer") == "gold" and arg(gold["v4/ppo"], "ppo.scorer") == "gold"
    with pytest.raises(UserError, match="pipeline.scorer: unknown 'oracle'"):
        plan(opts(tmp_path, scorer="oracle"), [], None)
    # the oracle knows world prompts only: other prompts are refused before anything runs
    with pytest.raises(UserError, match="pipeline.rs_overrides sets data.path=/my/prompts.jsonl"):
        plan(opts(tmp_path, scorer="gold", rs_overrides=["data.path=/my/prompts.jsonl"]), [], None)
    with pytest.raises(UserError, match="pipeline.common_overrides sets data.path=p.jsonl"):
        plan(opts(tmp_path, scorer="gold"), ["data.path=p.jsonl"], None)
    # other prompts than the world's: no gold checks at the end
    assert [s.kind for s in plan(opts(tmp_path, scorer="rm", rs_overrides=["data.path=/my/prompts.jsonl"]), [], None)
            ] == expected


def test_rm_init_previous_carries_the_reward_models_over(tmp_path):
    steps = {s.name: s for s in plan(opts(tmp_path, iterations=3, rm_init="previous"), [], None)}
    t = str(tmp_path)
    assert arg(steps["v1/rm_helpfulness"], "model.path") == f"{t}/v0/sft/hf"  # V1: from the policy
    assert arg(steps["v2/rm_helpfulness"], "model.path") == f"{t}/v1/rm_helpfulness/hf"
    assert arg(steps["v3/rm_safety"], "model.path") == f"{t}/v2/rm_safety/hf"
    assert arg(steps["v3/rs"], "model.path") == f"{t}/v2/rs_distill/hf"  # the policy's chain is unchanged
    default = {s.name: s for s in plan(opts(tmp_path, iterations=2), [], None)}
    assert arg(default["v2/rm_safety"], "model.path") == f"{t}/v1/rs_distill/hf"  # the paper: the latest policy
    with pytest.raises(UserError, match="pipeline.rm_init: unknown 'last'"):
        plan(opts(tmp_path, rm_init="last"), [], None)


def test_rm_init_rm_sft_trains_the_reward_models_own_chat_model_first(tmp_path):
    o = opts(tmp_path, iterations=2, rm_init="rm_sft", sft_overrides=["model.config.num_hidden_layers=2"],
             rm_sft_overrides=["model.config.num_hidden_layers=6"], evaluate=False)
    steps = plan(o, ["model=tiny"], None)
    t = str(tmp_path)
    assert [s.name for s in steps][:3] == ["v0/sft", "v0/rm_sft", "v1/collect"]
    by = {s.name: s for s in steps}
    rm_sft = by["v0/rm_sft"]
    # its own SFT run from scratch at its own shape: not the policy's shape, not a given policy checkpoint
    assert rm_sft.overrides == ["stage=sft", "model=tiny", "model.path=null", "model.config.num_hidden_layers=6"]
    assert rm_sft.policy_out == f"{t}/v0/rm_sft/hf"
    assert "model.config.num_hidden_layers=2" in by["v0/sft"].overrides
    for k in (1, 2):  # every iteration's RMs start from it; the policy's chain is unchanged
        for reward in ("helpfulness", "safety"):
            assert arg(by[f"v{k}/rm_{reward}"], "model.path") == f"{t}/v0/rm_sft/hf"
    assert arg(by["v2/rs"], "model.path") == f"{t}/v1/rs_distill/hf"
    assert arg(by["v2/collect"], "model.path") == f"{t}/v1/rs_distill/hf"
    # the held-out comparison starts from the policy's SFT, not from the reward models' chat model
    compare = next(s for s in plan({**o, "evaluate": True}, ["model=tiny"], None) if s.name == "eval/compare")
    assert compare.overrides[:3] == [f"{t}/v0/sft/hf", f"{t}/v1/rs_distill/hf", f"{t}/v2/rs_distill/hf"]
    # with a given starting policy the RMs' chat model is still trained
    given = plan({**o, "iterations": 1}, [], "/ckpt/sft")
    assert [s.name for s in given][:2] == ["v0/rm_sft", "v1/collect"]
    # the report says who judges whom
    execute(steps, fake_runner([]), None)
    for d, cfg in (("v0/sft", {"num_hidden_layers": 2, "hidden_size": 64}),
                   ("v0/rm_sft", {"num_hidden_layers": 4, "hidden_size": 128}),
                   ("v1/rm_helpfulness", {"reward_head": "likelihood"}), ("v1/rm_safety", {})):
        (tmp_path / d / "hf").mkdir(parents=True, exist_ok=True)
        (tmp_path / d / "hf" / "config.json").write_text(json.dumps(cfg))
    text, _ = report(steps, {s.name: 60.0 for s in steps}, tmp_path)
    assert ("Judges: the policy has 2 layers x 64; the reward models start every iteration from v0/rm_sft, their own "
            "chat model of 4 layers x 128 (its own held-out gold 0.000 greedy, – T=1); reward heads: helpfulness "
            "likelihood, safety scalar.") in text


def test_evaluation_steps(tmp_path):
    steps = {s.name: s for s in plan(opts(tmp_path), [], None)}
    t = str(tmp_path)
    # each iteration's helpfulness RM ranks samples of the policy it scored (the one that iteration sampled from)
    rm3 = steps["eval/rm_v3"]
    assert rm3.module == "llama2_lit.tools.gold_compare" and rm3.dir == tmp_path / "eval" / "rm_v3"
    assert rm3.overrides == [f"{t}/v2/rs_distill/hf", "--rm", f"{t}/v3/rm_helpfulness/hf", "--n", "300", "--k", "8",
                             "--seed", "11", "--json", f"{t}/eval/rm_v3/metrics.json"]
    assert steps["eval/rm_v5"].overrides[0] == f"{t}/v4/ppo/hf"
    # every iteration's final policy against SFT on 1,000 held-out prompts of another seed than the in-run eval
    assert steps["eval/compare"].overrides == [
        f"{t}/v0/sft/hf", f"{t}/v1/rs_distill/hf", f"{t}/v2/rs_distill/hf", f"{t}/v3/rs_distill/hf", f"{t}/v4/ppo/hf",
        f"{t}/v5/ppo/hf", "--n", "1000", "--k", "4", "--seed", "11", "--json", f"{t}/eval/compare/metrics.json"]
    # the probe: last policy, last helpfulness RM, last PPO run's history, into the pipeline directory
    ov = steps["eval/overopt"]
    assert ov.module == "llama2_lit.tools.overopt" and ov.dir == tmp_path and ov.done == "overopt.json"
    assert ov.overrides == [f"{t}/v5/ppo/hf", "--rm", f"{t}/v5/rm_helpfulness/hf", "--n", "32", "--prompts", "200",
                            "--seed", "11", "--out", t, "--ppo", f"{t}/v5/ppo/ppo_history.jsonl"]
    assert not ov.finished()
    (tmp_path / "overopt.json").write_text("{}")
    assert ov.finished()
    # RS only (no PPO): no PPO curve
    ov = [s for s in plan(opts(tmp_path, iterations=1, ppo_from=9), [], None) if s.kind == "eval_overopt"][0]
    assert "--ppo" not in ov.overrides and ov.overrides[0] == f"{t}/v1/rs_distill/hf"
    with pytest.raises(UserError, match="compare_seed=9 draws the in-run evaluation's held-out prompts"):
        plan(opts(tmp_path, compare_seed=9), [], None)  # seed 7: the in-run evaluation uses 9


def test_gatt_and_context_distillation_where_the_paper_runs_them(tmp_path):
    """Context distillation inside iteration 2 after its RS / PPO steps, with that iteration's RMs; GAtt after
    iteration 2 (the paper: V3); later iterations and the checks start from their outputs."""
    t = str(tmp_path)
    steps = plan(opts(tmp_path, iterations=3, ppo_from=2, gatt_after=2, context_distill_at=2), [], None)
    kinds = [s.kind for s in steps if not s.kind.startswith("eval")]
    per_it = ["collect", "rm_helpfulness", "rm_safety", "rs", "rs_distill"]
    assert kinds == ["sft"] + per_it + per_it + ["ppo", "context_distill", "gatt"] + per_it + ["ppo"]
    by = {s.name: s for s in steps}
    cd, ga = by["v2/context_distill"], by["v2/gatt"]
    assert arg(cd, "model.path") == f"{t}/v2/ppo/hf" and arg(cd, "context_distill.scorer") == "rm"
    assert arg(cd, "context_distill.reward_models.safety") == f"{t}/v2/rm_safety/hf"
    assert arg(ga, "model.path") == f"{t}/v2/context_distill/hf" and arg(ga, "gatt.scorer") == "rm_rule"
    assert arg(ga, "gatt.reward_models.helpfulness") == f"{t}/v2/rm_helpfulness/hf"
    assert arg(by["v3/collect"], "model.path") == f"{t}/v2/gatt/hf"
    assert by["eval/compare"].overrides[:4] == [f"{t}/v0/sft/hf", f"{t}/v1/rs_distill/hf", f"{t}/v2/gatt/hf",
                                                f"{t}/v3/ppo/hf"]
    gold = {s.name: s for s in plan(opts(tmp_path, iterations=3, scorer="gold", gatt_after=3), [], None)}
    assert arg(gold["v3/gatt"], "gatt.scorer") == "gold" and "v3/context_distill" not in gold
    with pytest.raises(UserError, match=r"pipeline.gatt_after=4: not an iteration of this pipeline \(1..3\)"):
        plan(opts(tmp_path, iterations=3, gatt_after=4), [], None)
    # the report: adherence by turn before / after, and context distillation's figures
    steps = plan(opts(tmp_path, iterations=1, ppo_from=9, gatt_after=1, context_distill_at=1, evaluate=False), [], None)
    execute(steps, fake_runner([]), None)
    (tmp_path / "v1/gatt/metrics.json").write_text(json.dumps(
        {"gatt/adherence@turn2": 1.0, "gatt/adherence@turn20": 0.9, "gatt/adherence_init@turn2": 0.25,
         "gatt/adherence_init@turn20": 0.0, "gatt/content_gold@turn2": 0.5, "gatt/content_gold_init@turn2": 0.4}))
    (tmp_path / "v1/context_distill/metrics.json").write_text(json.dumps(
        {"cd/gold_safety_init": 0.9, "cd/gold_safety": 1.0, "cd/gold_helpfulness_init": 0.45,
         "cd/gold_helpfulness": 0.44, "cd/gold_helpfulness_diff": -0.01, "cd/gold_helpfulness_diff_se": 0.02,
         "cd/dropped_fraction": 0.625, "cd/kept": 30}))
    text, _ = report(steps, {s.name: 1.0 for s in steps}, tmp_path)
    assert "| | turn 2 | turn 20 |" in text and "| before | 0.250 | 0.000 |" in text
    assert "| after | 1.000 | 0.900 |" in text and "| content gold before | 0.400 | – |" in text
    assert "rows kept 30, dropped by the keep-rule 0.625" in text
    assert "| gold safety (greedy) | 0.900 | 1.000 |" in text and "| gold safety (T=1) | – | – |" in text
    assert "| gold helpfulness, ordinary prompts | 0.450 | 0.440 (paired diff -0.010 ± 0.020) |" in text


def fake_runner(calls, crash_at=None):
    def runner(step, extra):
        calls.append((step.name, tuple(extra)))
        if step.name == crash_at:
            (step.dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            (step.dir / "checkpoints" / "last.ckpt").write_text("partial")
            raise UserError("killed")
        step.dir.mkdir(parents=True, exist_ok=True)
        if step.kind.startswith("eval"):
            (step.dir / step.done).write_text("{}")
            return
        metrics = {"eval/gold_helpfulness": 0.1 * step.iteration, "eval/gold_safety": 1.0, "val/accuracy": 0.6,
                   **({"eval/gold_helpfulness_se": 0.012, "eval/gold_helpfulness_sampled": 0.15,
                       "eval/gold_helpfulness_sampled_se": 0.011} if step.kind == "ppo" else {}),
                   "rs/reward_max@16": 0.7, "rs/reward_median@16": 0.5, "ppo/kl": 0.3,
                   "rs/selected_gold_helpfulness_mean": 0.45, "rs/gold_helpfulness_mean": 0.35}
        (step.dir / "metrics.json").write_text(json.dumps(metrics))
    return runner


def test_resume_runs_only_unfinished_steps(tmp_path):
    steps = plan(opts(tmp_path, iterations=2, ppo_from=2), [], None)
    calls = []
    with pytest.raises(UserError, match="killed"):
        execute(steps, fake_runner(calls, crash_at="v1/rs_distill"), tmp_path / "timings.json")
    assert [c[0] for c in calls] == [s.name for s in steps][:6]
    calls.clear()
    timings = execute(steps, fake_runner(calls), tmp_path / "timings.json")
    # the crashed step is rerun from its own checkpoint, then the rest; nothing finished runs again
    assert calls[0] == ("v1/rs_distill", (f"ckpt_path={tmp_path}/v1/rs_distill/checkpoints/last.ckpt",))
    assert [c[0] for c in calls] == [s.name for s in steps][5:]
    assert set(timings) == {s.name for s in steps}
    calls.clear()
    execute(steps, fake_runner(calls), tmp_path / "timings.json")
    assert calls == []


def test_report_table(tmp_path):
    steps = plan(opts(tmp_path, iterations=2, ppo_from=2, evaluate=False), [], None)
    execute(steps, fake_runner([]), None)
    text, rows = report(steps, {s.name: 60.0 for s in steps}, tmp_path)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert [r["gold_helpfulness"] for r in rows] == pytest.approx([0.0, 0.1, 0.2])
    assert rows[2]["policy"] == "v2/ppo" and rows[2]["ppo_kl"] == 0.3 and rows[1]["rs_max"] == 0.7
    assert "| 1 | v1/rs_distill | 0.100 | – | 1.000 |" in text  # no standard error, no sampled score: none printed
    assert ("| 2 | v2/ppo | 0.200 ± 0.012 | 0.150 ± 0.011 | 1.000 | 0.600 | 0.600 | – | 0.700 / 0.500 | "
            "0.450 / 0.350 | 0.300 | 6.0 |") in text
    assert rows[2]["gold_sampled"] == 0.15 and rows[1]["rs_gold_selected"] == 0.45
    assert (tmp_path / "report.png").stat().st_size > 0


def test_report_with_evaluations(tmp_path):
    steps = plan(opts(tmp_path, iterations=1, ppo_from=1), [], None)
    execute(steps, fake_runner([]), None)
    (tmp_path / "pipeline.json").write_text(json.dumps({"scorer": "rm"}))
    (tmp_path / "eval" / "rm_v1" / "metrics.json").write_text(json.dumps(
        {"pair_accuracy": 0.8125, "best_by_rm": 0.5, "mean": 0.4, "best_by_gold": 0.7, "pairs": 16}))
    sft, ppo = str(tmp_path / "v0/sft/hf"), str(tmp_path / "v1/ppo/hf")
    (tmp_path / "eval" / "compare" / "metrics.json").write_text(json.dumps(
        {"prompts": 1000, "samples_per_prompt": 4,
         "policies": {sft: {"greedy": 0.4, "sampled": 0.3, "gold_safety": 1.0},
                      ppo: {"greedy": 0.42, "sampled": 0.33, "gold_safety": 0.99}},
         "vs_first": {ppo: {"greedy": {"diff": 0.02, "se": 0.005}, "sampled": {"diff": 0.03, "se": 0.004}}}}))
    (tmp_path / "overopt.json").write_text(json.dumps(
        {"n": 4, "prompts": 10, "k": [1, 2], "kl_bon": [0.0, 0.193], "gold": [0.3, 0.32], "gold_se": [0.01, 0.01],
         "proxy": [0.5, 0.6], "proxy_se": [0.02, 0.02],
         "ppo": {"iteration": [1, 2, 3], "sqrt_kl": [0.1, 0.2, 0.3], "proxy": [0.5, 0.6, 0.7],
                 "gold": [0.3, 0.34, 0.33]}}))
    text, rows = report(steps, {s.name: 60.0 for s in steps}, tmp_path)
    assert rows[1]["rm_onpolicy_acc"] == 0.8125
    assert "RS and PPO scored by: **rm**" in text
    assert "| 1.000 | 0.600 | 0.600 | 0.812 | 0.700 / 0.500 |" in text
    assert "| v0/sft/hf | 0.4000 | 0.3000 | 1.0000 | – | – |" in text
    assert "| v1/ppo/hf | 0.4200 | 0.3300 | 0.9900 | +0.0200 ± 0.0050 (+4.0 SE) | +0.0300 ± 0.0040 (+7.5 SE) |" in text
    assert "| 2 | 0.193 | 0.3200 ± 0.0100 | 0.6000 ± 0.0200 |" in text
    assert "gold 0.3000 -> 0.3300 (highest 0.3400 at iteration 2, sqrt(KL) 0.200)" in text
    assert "![over-optimisation](overopt.png)" in text
    assert "| total | 600 |" in text and "| the recipe's steps (without eval/) | 420 |" in text  # 7 steps + 3 checks


def test_pipeline_dir_of_other_settings_is_refused(make_cfg, tmp_path):
    over = ["stage=pipeline", f"pipeline.root={tmp_path / 'p'}", "pipeline.iterations=1"]
    run(make_cfg(*over, out=tmp_path / "a"), runner=fake_runner([]))
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["pipeline/final_gold_helpfulness"] == 0.1
    run(make_cfg(*over, "pipeline.iterations=2", out=tmp_path / "b"), runner=fake_runner([]))  # extending is fine
    with pytest.raises(UserError, match="seed: was 1234, now 5"):
        run(make_cfg(*over, "seed=5", out=tmp_path / "c"), runner=fake_runner([]))
    with pytest.raises(UserError, match="scorer: was 'rm', now 'gold'"):
        run(make_cfg(*over, "pipeline.scorer=gold", out=tmp_path / "c"), runner=fake_runner([]))
    with pytest.raises(UserError, match="plain folder name"):
        run(make_cfg("stage=pipeline", "pipeline.name=../../escape", out=tmp_path / "e"), runner=fake_runner([]))
    with pytest.raises(UserError, match="iterations must be >= 1"):
        run(make_cfg(*over, "pipeline.iterations=0", out=tmp_path / "d"), runner=fake_runner([]))


# ---------------------------------------------------------------------------------- real stages, model=tiny

SMALL_COMMON = ["logger=none", "trainer.enable_model_summary=false", "+model.config.initializer_range=0.2"]
TINY = [
    f"pipeline.common_overrides={_l}" for _l in [
        "[" + ",".join(f"'{x}'" for x in SMALL_COMMON) + "]"]
] + [
    "pipeline.sft_overrides=['trainer.max_steps=3','data.synthetic.num_train=120','data.synthetic.num_val=16',"
    "'data.synthetic.num_eval=8','stage.seq_len=128','stage.batch_size=4','callbacks.gold_eval.max_new_tokens=4',"
    "'model.config.hidden_size=32','model.config.intermediate_size=64','model.config.num_hidden_layers=2']",
    "pipeline.collect_overrides=['data.synthetic.num_train=40','collect.max_new_tokens=6','collect.ties=keep']",
    "pipeline.rm_overrides=['trainer.max_steps=2','stage.batch_size=4','stage.pairs_per_step=4',"
    "'data.val_fraction=0.2']",
    "pipeline.rs_overrides=['data.synthetic.num_train=8','rs.num_samples=3','rs.max_new_tokens=6']",
    "pipeline.rs_distill_overrides=['trainer.max_steps=2','stage.seq_len=64','data.val_fraction=0.2',"
    "'callbacks.gold_eval.max_new_tokens=4','callbacks.gold_eval.at_start=true']",
    "pipeline.ppo_overrides=['ppo.iterations=2','stage.batch_size=4','ppo.mini_batch_size=4','ppo.max_new_tokens=4',"
    "'ppo.eval.max_new_tokens=4','data.synthetic.num_eval=8','callbacks.gold_eval.max_new_tokens=4']",
    "pipeline.compare_prompts=20", "pipeline.rm_check_prompts=10", "pipeline.overopt_n=4", "pipeline.overopt_prompts=6",
]


def _cmd(root, iterations):
    import sys

    return [sys.executable, "-m", "llama2_lit", "stage=pipeline", f"pipeline.root={root}",
            f"pipeline.iterations={iterations}", "pipeline.ppo_from=2", "trainer.enable_progress_bar=false", *TINY,
            f"hydra.run.dir={root}/_pipeline_run"]


@pytest.mark.slow
def test_two_iterations_end_to_end_on_tiny(tmp_path):
    import subprocess

    root = tmp_path / "p"
    out = subprocess.run(_cmd(root, 2), capture_output=True, text=True, env=_env(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    for step in ("v0/sft", "v1/collect", "v1/rm_helpfulness", "v1/rm_safety", "v1/rs", "v1/rs_distill", "v2/collect",
                 "v2/rs", "v2/rs_distill", "v2/ppo"):
        assert (root / step / "metrics.json").is_file(), step
    text = (root / "report.md").read_text()
    assert "| 2 | v2/ppo |" in text and (root / "report.png").is_file()
    # the held-out checks ran and reached the report
    for f in ("eval/rm_v1/metrics.json", "eval/rm_v2/metrics.json", "eval/compare/metrics.json", "overopt.json",
              "overopt.png"):
        assert (root / f).is_file(), f
    assert "Held-out comparison" in text and "![over-optimisation](overopt.png)" in text
    assert json.loads((root / "overopt.json").read_text())["ppo"]["iteration"]
    m = json.loads((root / "_pipeline_run" / "metrics.json").read_text())
    assert 0.0 <= m["pipeline/final_gold_helpfulness"] <= 1.0 and m["pipeline/iterations"] == 2


def _env(tmp_path):
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.slow
def test_killed_pipeline_resumes_without_rerunning_finished_steps(tmp_path):
    import signal
    import subprocess
    import time

    root = tmp_path / "p"
    proc = subprocess.Popen(_cmd(root, 1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_env(tmp_path), start_new_session=True)
    deadline = time.time() + 240
    while not (root / "v1" / "collect" / "metrics.json").is_file():  # killed after SFT and collection
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:] if proc.stdout else ""
        time.sleep(0.2)
    os_killpg = __import__("os").killpg
    os_killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    sft_stamp = (root / "v0" / "sft" / "metrics.json").stat().st_mtime_ns
    out = subprocess.run(_cmd(root, 1), capture_output=True, text=True, env=_env(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "v0/sft finished earlier: skipped" in log and "v1/collect finished earlier: skipped" in log
    assert (root / "v0" / "sft" / "metrics.json").stat().st_mtime_ns == sft_stamp
    assert (root / "v1" / "rs_distill" / "metrics.json").is_file()
    timings = json.loads((root / "timings.json").read_text())
    # the rerun ran exactly the unfinished steps (collection's time may be lost: it was killed as it ended)
    assert [k for k in timings if k != "v1/collect"] == ["v0/sft", "v1/rm_helpfulness", "v1/rm_safety", "v1/rs",
                                                          "v1/rs_distill"]
    import re

    ran = re.findall(r"pipeline: (?:running|resuming) (\S+)", log)
    assert ran == ["v1/rm_helpfulness", "v1/rm_safety", "v1/rs", "v1/rs_distill"]


# ---------------------------------------------------------------------- the RS schedule and students (issue 18)


def test_the_bag_history_follows_the_paper_schedule(tmp_path):
    # the paper: "until RLHF V3" selection from the preceding iteration's samples only, from V4 on from all
    steps = {s.name: s for s in plan(opts(tmp_path, rs_bag_all_from=4, evaluate=False), [], None)}
    assert [arg(steps[f"v{k}/rs"], "rs.selection") for k in range(1, 6)] == (
        ["previous_iteration"] * 3 + ["all_iterations"] * 2)
    steps = {s.name: s for s in plan(opts(tmp_path, iterations=2, rs_bag_all_from=1, evaluate=False), [], None)}
    assert [arg(steps[f"v{k}/rs"], "rs.selection") for k in (1, 2)] == ["all_iterations"] * 2
    # null: the RS config decides; a user's rs override still wins (it comes later on the command line)
    steps = {s.name: s for s in plan(opts(tmp_path, iterations=2, rs_overrides=["rs.selection=all_iterations"],
                                          evaluate=False), [], None)}
    assert [o for o in steps["v1/rs"].overrides if o.startswith("rs.selection")] == ["rs.selection=all_iterations"]
    with pytest.raises(UserError, match="rs_bag_all_from=0"):
        plan(opts(tmp_path, rs_bag_all_from=0), [], None)


def test_rs_temperature_per_iteration_or_swept(tmp_path):
    def temps(**kw):
        steps = {s.name: s for s in plan(opts(tmp_path, iterations=3, evaluate=False, **kw), [], None)}
        return [[o for o in steps[f"v{k}/rs"].overrides if o.startswith("rs.temperature")] for k in (1, 2, 3)]
    assert temps() == [[], [], []]
    assert temps(rs_temperature=1.2) == [["rs.temperature=1.2"]] * 3
    assert temps(rs_temperature=[0.8, "sweep", 1.3], rs_temperature_candidates=[1.0, 1.4]) == [
        ["rs.temperature=0.8"], ["rs.temperature_sweep.candidates=[1.0,1.4]"], ["rs.temperature=1.3"]]
    assert temps(rs_temperature="sweep", rs_temperature_candidates=[0.7, 1]) == [
        ["rs.temperature_sweep.candidates=[0.7,1.0]"]] * 3
    with pytest.raises(UserError, match="2 temperatures for 3 iterations"):
        temps(rs_temperature=[1.0, 1.2])
    with pytest.raises(UserError, match="not a temperature > 0 or 'sweep'"):
        temps(rs_temperature="hot")
    with pytest.raises(UserError, match="rs_temperature_candidates"):
        temps(rs_temperature="sweep", rs_temperature_candidates=[])


def test_students_learn_the_teachers_selection_each_iteration(tmp_path):
    small = ["model.config.num_hidden_layers=2", "model.config.hidden_size=64"]
    steps = plan(opts(tmp_path, iterations=2, ppo_from=2, students=[{"name": "small", "overrides": small}]),
                 ["model=tiny"], None)
    by = {s.name: s for s in steps}
    assert [s.name for s in steps][:2] == ["v0/sft", "v0/student_small"]
    sft = by["v0/student_small"]
    assert sft.overrides[0] == "stage=sft" and sft.overrides[-3:] == ["model.path=null", *small]
    t = tmp_path
    for k, start in ((1, f"{t}/v0/student_small/hf"), (2, f"{t}/v1/student_small/hf")):
        st = by[f"v{k}/student_small"]
        assert arg(st, "data.path") == f"{t}/v{k}/rs" and arg(st, "model.path") == start  # the teacher's selection
        assert st.overrides[0] == "stage=rs_distill" and st.policy_out == f"{t}/v{k}/student_small/hf"
    # the teacher's lineage ignores the students; the final comparison adds the last student
    assert arg(by["v2/collect"], "model.path") == f"{t}/v1/rs_distill/hf"
    assert arg(by["v2/ppo"], "model.path") == f"{t}/v2/rs_distill/hf"
    compare = by["eval/compare"].overrides
    assert compare[:4] == [f"{t}/v0/sft/hf", f"{t}/v1/rs_distill/hf", f"{t}/v2/ppo/hf", f"{t}/v2/student_small/hf"]
    assert by["eval/overopt"].overrides[0] == f"{t}/v2/ppo/hf"
    for bad in ([{"name": "a/b"}], [{"name": "x"}, {"name": "x"}], [{"name": "x", "overrides": "a=1"}]):
        with pytest.raises(UserError, match="pipeline.students"):
            plan(opts(tmp_path, students=bad), [], None)


def test_report_shows_table_7_table_29_the_rs_schedule_and_students(tmp_path):
    steps = plan(opts(tmp_path, iterations=1, ppo_from=9, evaluate=False, students=[{"name": "s", "overrides": []}]),
                 [], None)
    execute(steps, fake_runner([]), None)
    by = {s.name: s for s in steps}
    rm = {"val/accuracy": 0.7, "val/accuracy/pool/helpfulness": 0.61, "val/count/pool/helpfulness": 80,
          "val/accuracy/pool/safety": 0.9, "val/count/pool/safety": 20}
    (by["v1/rm_helpfulness"].dir / "metrics.json").write_text(json.dumps(rm))
    (by["v1/rm_safety"].dir / "metrics.json").write_text(json.dumps({
        **rm, "val/accuracy/pool/helpfulness": 0.55, "val/accuracy/safety_bin/preferred_safe_other_unsafe": 0.95,
        "val/accuracy/safety_bin/both_safe": 0.6, "val/accuracy/safety_bin/both_unsafe": 0.75,
        "val/count/safety_bin/both_unsafe": 4, "val/unsafe_recall": 0.875, "val/count/unsafe_responses": 8}))
    (by["v1/rs"].dir / "metrics.json").write_text(json.dumps({
        "rs/temperature": 1.2, "rs/temperature_sweep/max@8/T=0.8": 0.5, "rs/temperature_sweep/max@8/T=1.2": 0.6,
        "rs/reward_max@8": 0.6, "rs/reward_median@8": 0.4}))
    (by["v1/rs"].dir / "selected.json").write_text(json.dumps({"selection": "previous_iteration", "iterations": [1]}))
    (by["v1/student_s"].dir / "metrics.json").write_text(json.dumps({
        "eval/gold_helpfulness": 0.08, "eval/gold_helpfulness_se": 0.01, "eval/gold_helpfulness_sampled": 0.05}))
    text, rows = report(steps, {s.name: 60.0 for s in steps}, tmp_path)
    assert rows[1]["rm_helpfulness_acc"] == 0.61 and rows[1]["rm_safety_acc"] == 0.9  # each RM on its own pool
    assert "| 1 | safety RM | 55.0 (80) | 90.0 (20) |" in text
    assert "| 1 | helpfulness RM | 61.0 (80) | 90.0 (20) |" in text
    assert "| paper, auxiliary loss | 64.5 | 94.3 | 56.9 | 59.9 | 90.4 |" in text
    assert "| 1 | 90.0 (20) | 95.0 | 60.0 | 75.0 (4) | 87.5 (8) |" in text
    assert "| 1 | 1.2 (swept 0.8, 1.2) | previous_iteration | 1 |" in text
    assert "| 1 | 0.100 | 0.080 ± 0.010 / 0.050 |" in text  # teacher (fake runner: 0.1 x iteration) | student
    assert "| 0 | 0.000 | 0.000 |" in text  # the student's own SFT beside the teacher's


def test_a_student_smaller_than_the_teacher_learns_from_the_teachers_bag(make_cfg, tmp_path):
    """The teacher (2 layers, width 32) samples and selects; a student of 1 layer, width 16, is fine-tuned on it."""
    from transformers import AutoModelForCausalLM

    from llama2_lit.run import run
    from llama2_lit.stages.rs import run as run_rs

    run_rs(make_cfg("stage=rs", "data=rs_prompts", "data.synthetic.num_train=10", "stage.batch_size=4",
                    "rs.num_samples=3", "rs.max_new_tokens=6", "rs.scorer=gold", "+model.config.initializer_range=0.2",
                    f"rs.bag_dir={tmp_path}/bag", out=tmp_path / "rs"))
    selected = json.loads((tmp_path / "rs" / "selected.json").read_text())["selected"]
    shape = ["model.config.hidden_size=16", "model.config.intermediate_size=32", "model.config.num_hidden_layers=1",
             "model.config.num_attention_heads=2", "model.config.num_key_value_heads=2"]
    run(make_cfg("stage=sft", *shape, out=tmp_path / "student_sft"))
    m = run(make_cfg("stage=rs_distill", "data=rs_bag", f"data.path={tmp_path}/rs", "data.val_fraction=0.2",
                     "stage.seq_len=64", f"model.path={tmp_path}/student_sft/hf", out=tmp_path / "student"))
    assert m["rs/distill_samples"] + m.get("data/val/rows", 0) >= 1 and m["train/loss"] > 0
    assert m["rs/distill_samples"] <= selected
    before = AutoModelForCausalLM.from_pretrained(tmp_path / "student_sft" / "hf")
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "student" / "hf")
    teacher_params = 2 * (4 * 32 * 32 + 3 * 32 * 64)  # 2 layers of attention + MLP at width 32 (embeddings aside)
    student_params = sum(p.numel() for n, p in after.named_parameters() if "layers." in n and "norm" not in n)
    assert (after.config.num_hidden_layers, after.config.hidden_size) == (1, 16) and student_params < teacher_params
    assert any(not torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))


def test_method_dpo_trains_the_policy_on_the_collected_pairs(tmp_path):
    steps = plan(opts(tmp_path, iterations=2, method="dpo", dpo_overrides=["stage.module.beta=0.2"]), ["model=tiny"],
                 None)
    assert [s.kind for s in steps] == ["sft", "collect", "dpo", "collect", "dpo", "eval_compare"]
    by, t = {s.name: s for s in steps}, tmp_path
    assert arg(by["v1/dpo"], "model.path") == f"{t}/v0/sft/hf" and arg(by["v2/dpo"], "model.path") == f"{t}/v1/dpo/hf"
    assert arg(by["v2/collect"], "model.path") == f"{t}/v1/dpo/hf"
    assert arg(by["v2/dpo"], "data.path") == f"['{t}/v1/collect/pairs.jsonl','{t}/v2/collect/pairs.jsonl']"
    assert (arg(by["v2/dpo"], "data.mix"), arg(by["v2/dpo"], "data.gold_eval")) == ("false", "true")
    assert by["v2/dpo"].overrides[-1] == "stage.module.beta=0.2"
    assert by["eval/compare"].overrides[:3] == [f"{t}/v0/sft/hf", f"{t}/v1/dpo/hf", f"{t}/v2/dpo/hf"]
    with pytest.raises(UserError, match="pipeline.method: unknown 'ppo'"):
        plan(opts(tmp_path, method="ppo"), [], None)
    with pytest.raises(UserError, match="need method=rs_ppo"):
        plan(opts(tmp_path, method="dpo", gatt_after=1), [], None)
    execute(steps, fake_runner([]), None)
    (tmp_path / "pipeline.json").write_text(json.dumps({"scorer": "rm", "method": "dpo"}))
    (by["v2/dpo"].dir / "metrics.json").write_text(json.dumps({"eval/gold_helpfulness": 0.3, "dpo/accuracy": 0.7,
                                                                "dpo/kl": 0.25}))
    text, rows = report(steps, {s.name: 60.0 for s in steps}, tmp_path)
    assert "Method: **DPO**" in text and rows[2]["rm_helpfulness_acc"] == 0.7 and rows[2]["ppo_kl"] == 0.25
    assert "| 2 | v2/dpo | 0.300 |" in text


def test_a_pipeline_from_before_new_settings_resumes(make_cfg, tmp_path):
    """pipeline.json files written before method, the RS schedule, students or dpo_overrides existed read those as
    what the pipeline then did, so the same command resumes instead of being refused."""
    over = ["stage=pipeline", f"pipeline.root={tmp_path / 'p'}", "pipeline.iterations=1", "pipeline.rs_bag_all_from=null"]
    run(make_cfg(*over, out=tmp_path / "a"), runner=fake_runner([]))
    manifest = tmp_path / "p" / "pipeline.json"
    old = json.loads(manifest.read_text())
    for key in ("method", "rs_temperature", "rs_bag_all_from", "students", "dpo_overrides"):
        del old[key]
    manifest.write_text(json.dumps(old))
    run(make_cfg(*over, out=tmp_path / "b"), runner=fake_runner([]))  # no "other settings" refusal
    with pytest.raises(UserError, match="rs_bag_all_from: was None, now 4"):  # the new default is a new setting
        run(make_cfg(*over[:-1], out=tmp_path / "c"), runner=fake_runner([]))
