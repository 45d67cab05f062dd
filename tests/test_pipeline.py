"""stage=pipeline: the V1..Vn step order and hand-offs (mocked stage runner), resume after a crash without rerunning
finished steps, refusal of a pipeline directory made with other settings, the report."""
import json

import pytest

from llama2_lit.errors import UserError
from llama2_lit.pipeline import execute, plan, report, run


def opts(root, iterations=5, ppo_from=4, **extra):
    return {"root": str(root), "iterations": iterations, "ppo_from": ppo_from, "seed": 7, **extra}


def arg(step, key):
    hits = [o.split("=", 1)[1] for o in step.overrides if o.startswith(key + "=")]
    assert len(hits) == 1, (step.name, key, step.overrides)
    return hits[0]


def test_v1_to_v5_order_and_hand_offs(tmp_path):
    steps = plan(opts(tmp_path), ["model=tiny"], None)
    per_it = ["collect", "rm_helpfulness", "rm_safety", "rs", "rs_distill"]
    expected = ["sft"] + per_it * 3 + (per_it + ["ppo"]) * 2  # PPO from V4 on (paper)
    assert [s.kind for s in steps] == expected
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
    # new prompts for every collection
    assert len({arg(by[f"v{k}/collect"], "data.seed") for k in range(1, 6)}) == 5
    # a given starting policy skips SFT
    given = plan(opts(tmp_path, iterations=1), [], "/ckpt/sft")
    assert [s.kind for s in given] == per_it and arg(given[0], "model.path") == "/ckpt/sft"


def fake_runner(calls, crash_at=None):
    def runner(step, extra):
        calls.append((step.name, tuple(extra)))
        if step.name == crash_at:
            (step.dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            (step.dir / "checkpoints" / "last.ckpt").write_text("partial")
            raise UserError("killed")
        step.dir.mkdir(parents=True, exist_ok=True)
        metrics = {"eval/gold_helpfulness": 0.1 * step.iteration, "eval/gold_safety": 1.0, "val/accuracy": 0.6,
                   "rs/reward_max@16": 0.7, "rs/reward_median@16": 0.5, "ppo/kl": 0.3}
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
    steps = plan(opts(tmp_path, iterations=2, ppo_from=2), [], None)
    execute(steps, fake_runner([]), None)
    text, rows = report(steps, {s.name: 60.0 for s in steps}, tmp_path)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert [r["gold_helpfulness"] for r in rows] == pytest.approx([0.0, 0.1, 0.2])
    assert rows[2]["policy"] == "v2/ppo" and rows[2]["ppo_kl"] == 0.3 and rows[1]["rs_max"] == 0.7
    assert "| 2 | v2/ppo | 0.200 | 1.000 | 0.600 | 0.600 | 0.700 / 0.500 | 0.300 | 6.0 |" in text
    assert (tmp_path / "report.png").stat().st_size > 0


def test_pipeline_dir_of_other_settings_is_refused(make_cfg, tmp_path):
    over = ["stage=pipeline", f"pipeline.root={tmp_path / 'p'}", "pipeline.iterations=1"]
    run(make_cfg(*over, out=tmp_path / "a"), runner=fake_runner([]))
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["pipeline/final_gold_helpfulness"] == 0.1
    run(make_cfg(*over, "pipeline.iterations=2", out=tmp_path / "b"), runner=fake_runner([]))  # extending is fine
    with pytest.raises(UserError, match="seed: was 1234, now 5"):
        run(make_cfg(*over, "seed=5", out=tmp_path / "c"), runner=fake_runner([]))
    with pytest.raises(UserError, match="iterations must be >= 1"):
        run(make_cfg(*over, "pipeline.iterations=0", out=tmp_path / "d"), runner=fake_runner([]))
