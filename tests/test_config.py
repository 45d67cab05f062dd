"""Every shipped config composes and instantiates; every config file opens with the command that runs it."""
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import ROOT

CONF = ROOT / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("scale",))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_config_file_opens_with_its_command():
    for p in sorted(CONF.rglob("*.yaml")):
        head = [l for l in p.read_text().splitlines()[:3] if l.startswith("#")]
        assert any("python -m llama2_lit" in l or "make " in l for l in head), p.relative_to(ROOT)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(make_cfg, group, option, tmp_path):
    cfg = make_cfg(f"{group}={option}", small=False)  # a file source's required path stays ??? here
    assert cfg.stage.name and cfg.model.name and cfg.trainer._target_


def test_default_pipeline_instantiates(make_cfg):
    from llama2_lit.run import build

    dm, module, trainer = build(make_cfg())
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert module(batch).shape[:2] == batch["input_ids"].shape
    assert trainer.max_steps == 3


def test_file_data_configs_instantiate(make_cfg, tmp_path):
    import json

    p = tmp_path / "d.jsonl"
    rows = {"alpaca": {"instruction": "Say hi", "input": "", "output": "hi"},
            "prompt_response": {"prompt": "Say hi", "response": "hi"},
            "chat": {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]},
            "text": {"text": "hello world"}}
    for option, row in rows.items():
        p.write_text("\n".join(json.dumps(row) for _ in range(6)) + "\n")
        stage = "pretrain" if option == "text" else "sft"
        cfg = make_cfg(f"data={option}", f"data.path={p}", f"stage={stage}", "stage.seq_len=64", small=False)
        dm = instantiate(cfg.data)
        dm.setup("fit")
        assert len(dm.train_rows) >= 1 and len(dm.val_rows) >= 1, option


# Llama 2 parameter counts (paper Table 1 sizes: 7B, 13B, 70B; exact counts of the released checkpoints)
PARAMS = {"llama2_7b": 6_738_415_616, "llama2_13b": 13_015_864_320, "llama2_70b": 68_976_648_192}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_llama2_configs_have_the_paper_dimensions(make_cfg, name):
    from omegaconf import OmegaConf
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = make_cfg(f"model={name}", small=False)
    assert cfg.model.tokenizer.chat_template == "llama2"
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**OmegaConf.to_container(cfg.model.config)))
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


def test_scale_specialisation_follows_stage_and_model(make_cfg):
    assert make_cfg(small=False).stage.seq_len == 256  # sft x tiny
    assert make_cfg("model=smollm2_135m", small=False).stage.seq_len == 512
    assert make_cfg("model=llama2_7b", small=False).stage.seq_len == 4096  # the paper's
    assert make_cfg("model=llama2_7b", small=False).stage.batch_size == 64


@pytest.mark.parametrize("model, threshold", [("tiny", 0.03), ("llama2_7b", 0.15), ("llama2_70b", 0.15),
                                              ("smollm2_135m", 0.15)])
def test_one_safety_threshold_per_scale_shared_by_rs_and_ppo(make_cfg, model, threshold):
    """Issue 18: RS gated at 0.15 while PPO gated at 0.03 on model=tiny; one setting per model now feeds both."""
    got = {stage: make_cfg(f"stage={stage}", f"model={model}", small=False)[stage].safety_threshold
           for stage in ("rs", "ppo", "gatt")}
    assert got == {"rs": threshold, "ppo": threshold, "gatt": threshold}
    assert make_cfg("stage=rs", "model=tiny", "model.safety_threshold=0.2", small=False).rs.safety_threshold == 0.2
