"""The per-run temperature sweep of stage=rs (Llama 2 Fig. 8): the choice by max@K, the held-out sweep prompts, the
options' validation, and one tiny end-to-end run with the gold scorer (choice, metrics, bag, reuse on a rerun)."""
import json

import pytest

from llama2_lit.errors import UserError
from llama2_lit.stages.rs_bag import Bag, pick_temperature
from tests.test_rs import RS

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: single-threaded tiny models


# ----------------------------------------------------------------------------------------- pure parts


def test_pick_temperature_takes_the_highest_max_at_k_and_the_lowest_t_on_ties():
    assert pick_temperature({0.8: 0.61, 1.0: 0.70, 1.2: 0.66}) == 1.0
    assert pick_temperature({1.4: 0.5, 0.6: 0.2}) == 1.4  # mapping order plays no part
    assert pick_temperature({1.2: 0.7, 0.8: 0.7, 1.0: 0.69}) == 0.8  # a tie: the lower temperature
    # the same rewards summed in another order differ in the last bit: still a tie
    a, b = 0.1 + 0.2 + 0.3, 0.3 + 0.2 + 0.1
    assert a != b
    assert pick_temperature({1.3: a, 0.9: b}) == 0.9 and pick_temperature({1.3: b, 0.9: a}) == 0.9
    assert pick_temperature({0.9: 0.5, 1.3: 0.5 + 1e-9}) == 1.3  # a real difference is not a tie
    assert pick_temperature({1.0: 0.3}) == 1.0
    with pytest.raises(ValueError, match="empty"):
        pick_temperature({})
    with pytest.raises(ValueError, match="NaN"):
        pick_temperature({1.0: float("nan"), 1.2: 0.5})


def test_sweep_prompts_world_held_out_and_file_subsets(tok, tmp_path):
    from data_modules.prompts import PromptDataModule
    from llama2_lit.stages.rs import sweep_prompts
    from llama2_lit.world import oracle as world

    dm = PromptDataModule(tok, seed=3, synthetic={"num_train": 40})
    got, source = sweep_prompts(dm, 20, seed=11)
    assert "held-out" in source and 15 <= len(got) <= 20 and len({p.id for p in got}) == len(got)
    assert all(world.split_of(p.text) == "heldout" for p in got)
    assert all(world.split_of(p.text) == "train" for p in dm.prompts())  # RS samples the train split
    assert all(p.is_safety == world.is_safety_prompt(p.text) for p in got)
    assert [p.id for p in sweep_prompts(dm, 20, seed=11)[0]] == [p.id for p in got]  # seeded
    assert [p.id for p in sweep_prompts(dm, 20, seed=12)[0]] != [p.id for p in got]

    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(10)))
    file_dm = PromptDataModule(tok, path=str(f))
    got, source = sweep_prompts(file_dm, 4, seed=5)
    assert "not held out" in source and len(got) == 4 and len({p.id for p in got}) == 4
    assert {p.text for p in got} <= {f"question {i}" for i in range(10)}
    assert [p.id for p in sweep_prompts(file_dm, 4, seed=5)[0]] == [p.id for p in got]
    assert len(sweep_prompts(file_dm, 50, seed=5)[0]) == 10  # fewer prompts than asked: all of them
    v = tmp_path / "held_out.jsonl"
    v.write_text("".join(json.dumps({"prompt": f"held out {i}"}) + "\n" for i in range(6)))
    got, source = sweep_prompts(PromptDataModule(tok, path=str(f), val_path=str(v)), 3, seed=5)
    assert "data.val_path" in source and len(got) == 3 and all(p.text.startswith("held out") for p in got)


def test_sweep_options_validation():
    from omegaconf import OmegaConf

    from llama2_lit.stages.rs import sweep_options

    def opts(**sweep):
        return OmegaConf.create({"num_samples": 6, "temperature_sweep": {"candidates": None, "prompts": 64,
                                                                          "num_samples": None, **sweep}})

    assert sweep_options(opts()) is None
    assert sweep_options(OmegaConf.create({"num_samples": 6})) is None  # an older config without the key
    assert sweep_options(opts(candidates=[1.2, 0.8])) == {"candidates": [0.8, 1.2], "prompts": 64, "num_samples": 6}
    assert sweep_options(opts(candidates=[1], num_samples=2))["num_samples"] == 2
    bad = [({"candidates": []}, "rs.temperature_sweep.candidates"),
           ({"candidates": 1.0}, "rs.temperature_sweep.candidates"),
           ({"candidates": [1.0, 0.0]}, "rs.temperature_sweep.candidates"),
           ({"candidates": [1.0, -0.5]}, "rs.temperature_sweep.candidates"),
           ({"candidates": ["hot"]}, "rs.temperature_sweep.candidates"),
           ({"candidates": [True]}, "rs.temperature_sweep.candidates"),
           ({"candidates": [1.0, 1.0]}, "rs.temperature_sweep.candidates"),
           ({"candidates": [1.0], "prompts": 0}, "rs.temperature_sweep.prompts"),
           ({"candidates": [1.0], "num_samples": 0}, "rs.temperature_sweep.num_samples")]
    for extra, key in bad:
        with pytest.raises(UserError, match=key.replace(".", r"\.")) as e:
            sweep_options(opts(**extra))
        assert "\n" not in str(e.value), extra


# ------------------------------------------------------------------------------------------ the stage

# 12 sweep prompts: enough for the random-init policy's two candidates to differ in max@4 (on 6 they tie)
SWEEP = [*RS, "rs.temperature_sweep.candidates=[1.5,0.5]", "rs.temperature_sweep.prompts=12",
         "rs.temperature_sweep.num_samples=4", "rs.temperature=0.9"]


def test_rs_run_picks_the_temperature_by_max_at_k_and_reuses_the_sweep(make_cfg, tmp_path, monkeypatch):
    from llama2_lit.generation.engine import Engine
    from llama2_lit.stages.rs import run

    cfg = make_cfg(*SWEEP, f"rs.bag_dir={tmp_path}/bag", out=tmp_path / "run")
    m = run(cfg)
    run_dir = tmp_path / "run"
    sweep = json.loads((run_dir / "temperature_sweep.json").read_text())
    assert sweep["candidates"] == [0.5, 1.5] and sweep["num_samples"] == 4
    assert [c["temperature"] for c in sweep["curves"]] == [0.5, 1.5]
    assert all(len(c["max"]) == len(c["median"]) == 4 for c in sweep["curves"])
    assert 9 <= sweep["num_prompts"] <= 12 and m["rs/temperature_sweep/prompts"] == sweep["num_prompts"]
    # the choice: the higher max@K, ties to the lower temperature (computed here from the json)
    assert len({c["max"][-1] for c in sweep["curves"]}) == 2  # the setting tells them apart: not the tie rule
    best = max(c["max"][-1] for c in sweep["curves"])
    expect = min(c["temperature"] for c in sweep["curves"] if c["max"][-1] == best)
    assert sweep["chosen_temperature"] == expect and m["rs/temperature"] == expect
    for c in sweep["curves"]:
        assert m[f"rs/temperature_sweep/max@4/T={c['temperature']:g}"] == c["max"][-1]
        assert m[f"rs/temperature_sweep/median@4/T={c['temperature']:g}"] == c["median"][-1]
        assert c["max"][-1] >= c["median"][-1] and c["max"][0] == pytest.approx(c["median"][0])
    assert {"rs/temperature_sweep/max@4/T=0.5", "rs/temperature_sweep/max@4/T=1.5"} <= set(m)
    assert m["rs/temperature_sweep/seconds"] == sweep["seconds"] > 0
    assert json.loads((run_dir / "metrics.json").read_text()) == pytest.approx(m)
    assert (run_dir / "rs_temperature_sweep.png").stat().st_size > 0
    # the run sampled at the chosen temperature (the bag, its settings and the curves say so)
    rows = Bag(tmp_path / "bag").load()
    assert len(rows) == 30 and set(rows["temperature"]) == {expect}
    manifests = [json.loads(f.read_text()) for f in (tmp_path / "bag").rglob("manifest.json")]
    assert [x["settings"]["temperature"] for x in manifests] == [expect]
    assert json.loads((run_dir / "rs_curves.json").read_text())["temperature"] == expect

    # a rerun into the same directory: no sampling at all (the bag's set is complete, the sweep is reused)
    before = (run_dir / "temperature_sweep.json").read_bytes()

    def no_sampling(self, *args, **kwargs):
        raise AssertionError("sampled again")

    monkeypatch.setattr(Engine, "generate", no_sampling)
    m2 = run(make_cfg(*SWEEP, f"rs.bag_dir={tmp_path}/bag", out=run_dir))
    assert (run_dir / "temperature_sweep.json").read_bytes() == before
    assert m2 == pytest.approx(m)
    # other sweep settings (a third candidate) sample the sweep again
    with pytest.raises(AssertionError, match="sampled again"):
        run(make_cfg(*SWEEP, "rs.temperature_sweep.candidates=[0.5,1.0,1.5]", f"rs.bag_dir={tmp_path}/bag",
                     out=run_dir))


def test_rs_without_candidates_uses_rs_temperature(make_cfg, tmp_path):
    from llama2_lit.stages.rs import run

    m = run(make_cfg(*RS, "rs.temperature=0.9", f"rs.bag_dir={tmp_path}/bag", out=tmp_path / "run"))
    assert m["rs/temperature"] == 0.9 and not [k for k in m if k.startswith("rs/temperature_sweep")]
    assert set(Bag(tmp_path / "bag").load()["temperature"]) == {0.9}
    assert not (tmp_path / "run" / "temperature_sweep.json").exists()
    assert not (tmp_path / "run" / "rs_temperature_sweep.png").exists()


def test_rs_bad_sweep_config_fails_before_any_work(make_cfg, tmp_path):
    from llama2_lit.stages.rs import run

    for extra, key in ((["rs.temperature_sweep.candidates=[]"], r"rs\.temperature_sweep\.candidates"),
                       (["rs.temperature_sweep.candidates=[1.0,-1]"], r"rs\.temperature_sweep\.candidates"),
                       (["rs.temperature_sweep.candidates=[1.0]", "rs.temperature_sweep.prompts=0"],
                        r"rs\.temperature_sweep\.prompts")):
        with pytest.raises(UserError, match=key):
            run(make_cfg(*RS, f"rs.bag_dir={tmp_path}/bag", *extra, out=tmp_path / "run"))
        assert not (tmp_path / "bag").exists() and not (tmp_path / "run").exists()
