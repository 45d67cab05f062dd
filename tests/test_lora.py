"""LoRA (model.lora.*): only the adapters (and a reward model's head) train, the base weights stay bit-identical,
and hf/ is a plain transformers folder whose logits equal the adapted model's."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from llama2_lit.errors import UserError
from llama2_lit.run import run

LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8", "model.lora.dropout=0.1",
        "model.lora.target_modules=[q_proj,v_proj,down_proj]", "+callbacks.lora_probe._target_=tests.test_lora.Probe"]
IDS = torch.arange(3, 40).unsqueeze(0)  # (1, 37)


class Probe(L.Callback):
    """Snapshots the base weights at fit start; at train end checks them and records the adapted model's outputs."""

    last: "Probe | None" = None

    def __init__(self):
        Probe.last = self

    def on_fit_start(self, trainer, pl_module):
        model = pl_module.model
        self.trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        self.frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        self.adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_train_end(self, trainer, pl_module):
        model = pl_module.model
        params = dict(model.named_parameters())
        self.changed_base = [n for n, v in self.frozen.items() if not torch.equal(params[n], v)]
        self.changed_adapters = [n for n, v in self.adapters.items() if not torch.equal(params[n], v)]
        model.eval()
        with torch.no_grad():
            self.outputs = model(input_ids=IDS, attention_mask=torch.ones_like(IDS), use_cache=False).logits
        model.train()


def test_lora_sft_trains_only_adapters_and_exports_merged_weights(make_cfg, tmp_path):
    run(make_cfg(*LORA, "trainer.max_steps=4"))
    probe = Probe.last
    assert probe.trainable and all(".lora_A." in n or ".lora_B." in n for n in probe.trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in probe.trainable} == {"q_proj", "v_proj", "down_proj"}
    assert len(probe.trainable) == 2 * 3 * 2  # A and B x 3 targets x 2 layers
    assert probe.changed_base == []  # the base weights are bit-identical after training
    assert any(".lora_B." in n for n in probe.changed_adapters)  # B starts at zero and moved
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()  # plain transformers, no peft
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert not any("lora" in k for k in hf.state_dict())
    with torch.no_grad():
        logits = hf(input_ids=IDS, attention_mask=torch.ones_like(IDS), use_cache=False).logits
    torch.testing.assert_close(logits, probe.outputs, atol=1e-5, rtol=0)
    assert not torch.equal(hf.model.layers[0].self_attn.q_proj.weight, probe.frozen[
        "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"])  # the adapters were folded in


def test_lora_reward_model_trains_adapters_and_the_whole_head(make_cfg, tmp_path):
    run(make_cfg("stage=rm", "data=synthetic_pairs", "data.synthetic.policy=perturb", "stage.pairs_per_step=8",
                 "stage.module.warmup_steps=1", *LORA))
    probe = Probe.last
    heads = [n for n in probe.trainable if ".lora_" not in n]
    assert heads == ["base_model.model.score.weight"]
    assert probe.changed_base == [] and heads[0] in probe.changed_adapters
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification" and not any("lora" in k for k in hf.state_dict())
    with torch.no_grad():
        scores = hf(input_ids=IDS, attention_mask=torch.ones_like(IDS), use_cache=False).logits
    torch.testing.assert_close(scores, probe.outputs, atol=1e-5, rtol=0)


def test_lora_on_a_model_without_the_target_modules_names_them(tok):
    from llama2_lit.models.loading import load_causal_lm

    cfg = {"config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4},
           "lora": {"enabled": True, "target_modules": ["q_proj", "qkv_proj", "c_attn"]}}
    with pytest.raises(UserError, match=r"target_modules: qkv_proj, c_attn not found in LlamaForCausalLM "
                                        r"\(its linear layers: .*q_proj"):
        load_causal_lm(cfg, tok)
    assert type(load_causal_lm({**cfg, "lora": {"enabled": False}}, tok)).__name__ == "LlamaForCausalLM"
