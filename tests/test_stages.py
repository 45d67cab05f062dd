"""The entry: every stage is dispatched from one table (llama2_lit.run.STAGES), its options are checked before
anything loads (llama2_lit.options), and every stage runs on the embedded default with nothing but its name,
bootstrapping what it lacks (llama2_lit.stages.bootstrap). The fast tests shrink the bootstrap; the full default
run of each stage is a slow test."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import get_args, get_type_hints

import pytest
from hydra.utils import get_class

from llama2_lit import options
from llama2_lit.errors import UserError
from llama2_lit.run import STAGES, run
from tests.conftest import ROOT

STAGE_YAMLS = sorted(p.stem for p in (ROOT / "conf" / "stage").glob("*.yaml"))


def _hydra_list(items) -> str:
    return "[" + ",".join(f"'{x}'" for x in items) + "]"


def cli(*args, timeout=300):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "llama2_lit", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------ the table


def test_every_stage_yaml_has_an_entry_and_every_entry_a_yaml():
    assert sorted(STAGES) == STAGE_YAMLS


@pytest.mark.parametrize("name", STAGE_YAMLS)
def test_a_stage_yaml_names_no_code_but_its_module(name, make_cfg):
    """No runner / prepare strings: the table says what runs; a fit stage's ``_target_`` is the table's module."""
    cfg = make_cfg(f"stage={name}", small=False)
    assert cfg.stage.name == name and "runner" not in cfg.stage and "prepare" not in cfg.stage
    entry = STAGES[name]
    assert (entry.module is None) != (entry.runner is None)
    if entry.module is not None:
        assert get_class(cfg.stage.module._target_) is entry.module
    else:
        assert cfg.stage.get("module") is None


def test_no_dispatch_through_config_strings():
    for path in (ROOT / "llama2_lit").rglob("*.py"):
        assert "get_method" not in path.read_text(), path


def test_option_choices_are_the_ones_the_code_accepts():
    from data_modules.sft import MODES
    from llama2_lit.core.rl import KL_KINDS
    from llama2_lit.models.value import VALUE_INITS
    from llama2_lit.modules.ppo import WHITEN
    from llama2_lit.scoring import SCORERS
    from llama2_lit.stages.collect import ANNOTATORS, TIES
    from llama2_lit.stages.rs import RESCORE
    from llama2_lit.stages.rs_bag import SELECTIONS

    def choices(cls, name):
        return set(get_args(get_type_hints(cls)[name]))

    assert choices(options.Stage, "data_mode") == set(MODES)
    assert choices(options.PPO, "kl_estimator") == set(KL_KINDS)
    assert choices(options.PPO, "value_init") == set(VALUE_INITS)
    assert choices(options.PPO, "whiten_rewards") == set(WHITEN)
    assert choices(options.PPO, "scorer") == choices(options.Pipeline, "scorer") == set(SCORERS)
    assert choices(options.Collect, "annotator") == set(ANNOTATORS)
    assert choices(options.Collect, "ties") == set(TIES)
    assert choices(options.RS, "rescore") == set(RESCORE)
    assert choices(options.RS, "selection") == set(SELECTIONS)


# ------------------------------------------------------------------------------------------ typed options


def test_every_shipped_config_passes_validation(make_cfg):
    for name in STAGE_YAMLS:
        for model in ("tiny", "smollm2_135m", "llama2_70b"):
            cfg = make_cfg(f"stage={name}", f"model={model}", small=False)
            options.validate(cfg, STAGES[name].module)
    for p in sorted((ROOT / "conf" / "experiment").glob("*.yaml")):
        cfg = make_cfg(f"experiment={p.stem}", small=False)
        options.validate(cfg, STAGES[cfg.stage.name].module)


@pytest.mark.parametrize("overrides,message", [
    (["stage=ppo", "+ppo.clipp=0.3"], r"^ppo\.clipp: unknown option \(did you mean clip\? valid: .*\bvalue_clip\b"),
    (["stage=ppo", "+ppo.eval.greedyy=true"], r"^ppo\.eval\.greedyy: unknown option .*valid: greedy, max_new_tokens"),
    (["stage=ppo", "ppo.clip=wide"], r"^ppo\.clip: expected a number, got 'wide'$"),
    (["stage=ppo", "ppo.kl_level=tokens"], r"^ppo\.kl_level: unknown 'tokens' \(choose token, sequence\)$"),
    (["stage=ppo", "ppo.iterations=2.5"], r"^ppo\.iterations: expected an integer"),
    (["stage=rs", "+rs.num_sample=4"], r"^rs\.num_sample: unknown option \(did you mean num_samples\?"),
    (["stage=collect", "+collect.sources.0.temp=1.0"], r"^collect\.sources\[0\]\.temp: unknown option"),
    (["stage=pipeline", "pipeline.iterations=three"], r"^pipeline\.iterations: expected an integer"),
    (["stage=sft", "+stage.seqlen=64"], r"^stage\.seqlen: unknown option \(did you mean seq_len\?"),
    (["stage=sft", "+stage.module.lrr=0.1"], r"^stage\.module\.lrr: unknown option of SFTModule \(did you mean lr\?"),
    (["stage=sft", "+ppo.clip=0.3"], r"^ppo: options of stage=ppo, but this run is stage=sft"),
    (["+bootstrap.enable=false"], r"^bootstrap\.enable: unknown option \(did you mean enabled\?"),
])
def test_a_wrong_option_stops_before_anything_loads_naming_the_key(make_cfg, tmp_path, overrides, message):
    cfg = make_cfg(*overrides, f"paths.output_root={tmp_path}/root", out=tmp_path / "run")
    with pytest.raises(UserError, match=message) as e:
        run(cfg)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists() and not (tmp_path / "root").exists()  # no bootstrap, no output


def test_a_typo_in_an_experiment_yaml_is_caught(make_cfg, tmp_path):
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "typo.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /stage: ppo\nppo:\n  kl_coeff: 0.1\n")
    cfg = make_cfg(f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "experiment=typo")
    with pytest.raises(UserError, match=r"^ppo\.kl_coeff: unknown option \(did you mean kl_coef\?"):
        run(cfg)


def test_cli_wrong_option_is_one_line_and_exit_2(tmp_path):
    r = cli("stage=ppo", "+ppo.clipp=0.3", f"paths.output_root={tmp_path}", f"hydra.run.dir={tmp_path}/run")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "error: ppo.clipp: unknown option (did you mean clip? valid: " in r.stderr
    assert not (tmp_path / "bootstrap").exists()


# ------------------------------------------------------------------------------------------ every stage by name

BOOT_SFT = ["logger=none", "trainer.max_steps=3", "trainer.enable_model_summary=false", "data.synthetic.num_train=120",
            "data.synthetic.num_val=16", "data.synthetic.num_eval=4", "stage.seq_len=128", "stage.batch_size=4",
            "callbacks.gold_eval.at_start=false", "callbacks.gold_eval.max_new_tokens=4",
            "model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_hidden_layers=2"]
BOOT_RM = ["logger=none", "trainer.max_steps=2", "trainer.enable_model_summary=false", "data.synthetic.num_train=80",
           "data.synthetic.policy=perturb", "data.synthetic.num_val=60", "data.synthetic.max_new_tokens=4",
           "stage.batch_size=4", "stage.pairs_per_step=4"]
BOOT_RS = ["logger=none", "data.synthetic.num_train=8", "stage.batch_size=4", "rs.num_samples=2", "rs.max_new_tokens=4"]

# each stage's own shrinking (SMALL of tests/conftest.py shrinks the model, data and steps)
SHRINK = {
    "pretrain": [],
    "sft": [],
    "rm": ["stage.pairs_per_step=4"],
    "dpo": ["stage.pairs_per_step=4", "data.synthetic.num_train=40", "data.synthetic.num_val=20",
            "data.synthetic.max_new_tokens=4", "stage.module.kl_prompts=2", "stage.module.kl_max_new_tokens=4"],
    "rs": ["data.synthetic.num_train=8", "rs.num_samples=2", "rs.max_new_tokens=4"],
    "rs_distill": ["data.val_fraction=0.2", "stage.seq_len=64"],
    "ppo": ["ppo.iterations=1", "ppo.mini_batch_size=4", "ppo.max_new_tokens=4", "ppo.eval.max_new_tokens=4",
            "trainer.max_steps=-1"],
    "collect": ["data.synthetic.num_train=8", "collect.max_new_tokens=4", "collect.batch_size=8", "collect.ties=keep"],
    "pipeline": ["pipeline.iterations=1"],
    "gatt": ["gatt.num_dialogues=4", "gatt.turns=3", "gatt.num_samples=2", "gatt.max_new_tokens=4",
             "callbacks.gatt_eval.dialogues=4", "callbacks.gatt_eval.turns=[1,3]", "stage.seq_len=128",
             "callbacks.gatt_eval.single_turn_prompts=4", "gatt.drop_broken=false"],
    "context_distill": ["context_distill.num_prompts=8", "context_distill.max_new_tokens=4",
                        "context_distill.keep_rule=all", "context_distill.bootstrap_sft_overrides=[]",
                        "callbacks.context_distill_eval.safety_prompts=4",
                        "callbacks.context_distill_eval.ordinary_prompts=4", "context_distill.anchor_num_prompts=4",
                        "stage.seq_len=128"],
}
# what each stage's bootstrap made (bootstrap.json; none: the stage needs nothing)
MADE = {"rs": {"policy", "helpfulness", "safety"}, "rs_distill": {"policy", "helpfulness", "safety", "rs"},
        "ppo": {"policy", "helpfulness", "safety"}, "collect": {"policy"}, "gatt": {"policy"},
        "context_distill": {"policy", "safety"}, "dpo": {"policy"}}


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory):
    """One output root for the module: the bootstrap runs (policy, RMs, RS selection) are made once and reused."""
    return tmp_path_factory.mktemp("root")


def test_the_table_covers_the_shrunk_settings():
    assert sorted(SHRINK) == sorted(STAGES)


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_runs_with_nothing_but_its_name(name, make_cfg, shared_root, tmp_path, monkeypatch, one_thread):
    """``stage=<name>`` plus the shrinking only: the stage picks its default data and bootstraps what it lacks."""
    if name == "pipeline":  # its steps are whole runs (tests/test_pipeline.py): here a stand-in runs them
        from llama2_lit.stages import pipeline
        from tests.test_pipeline import fake_runner

        monkeypatch.setattr(pipeline.run, "__defaults__", (fake_runner([]),))
    boot = [f"bootstrap.sft_overrides={_hydra_list(BOOT_SFT)}", f"bootstrap.rm_overrides={_hydra_list(BOOT_RM)}",
            f"bootstrap.rs_overrides={_hydra_list(BOOT_RS)}", f"paths.output_root={shared_root}"]
    m = run(make_cfg(f"stage={name}", *SHRINK[name], *boot, out=tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == pytest.approx(m)
    made = tmp_path / "run" / "bootstrap.json"
    assert set(json.loads(made.read_text())) == MADE[name] if name in MADE else not made.exists()
    if STAGES[name].module is not None:
        assert (tmp_path / "run" / "hf" / "config.json").is_file() and m["trainer/steps"] >= 1


def test_an_explicit_data_choice_wins(make_cfg, tmp_path):
    """stage=rs_distill data=synthetic is not the RS selection: the module's own error, no bootstrap."""
    with pytest.raises(UserError, match="data=rs_bag"):
        run(make_cfg("stage=rs_distill", "data=synthetic", f"paths.output_root={tmp_path}"))
    assert not (tmp_path / "bootstrap").exists()
    assert make_cfg("stage=rm", "data=pairs", "data.path=x.jsonl", small=False).data.path == "x.jsonl"


def test_without_the_bootstrap_a_missing_selection_is_named(make_cfg, tmp_path):
    with pytest.raises(UserError, match=r"stage=rs_distill needs data.path=.*bootstrap.enabled=true"):
        run(make_cfg("stage=rs_distill", "bootstrap.enabled=false"))
    with pytest.raises(UserError, match=r"stage=ppo needs model.path.*ppo.bootstrap.enabled=true"):
        run(make_cfg("stage=ppo", "bootstrap.enabled=false"))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STAGES))
def test_the_full_default_run_of_every_stage(name, tmp_path_factory):
    """``python -m llama2_lit stage=<name>``: the embedded default, unshrunk (bootstrap included; minutes to hours
    on 2 CPU cores: the pipeline runs the whole demo-sized loop)."""
    root = tmp_path_factory.getbasetemp() / "full_default_root"  # shared: the bootstrap runs are reused
    r = cli(f"stage={name}", "trainer.enable_progress_bar=false", f"paths.output_root={root}",
            f"hydra.run.dir={root}/runs/{name}", timeout=6 * 3600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (root / "runs" / name / "metrics.json").is_file()

