import pytest

from llama2_lit.plan import GIB, Shape, activation_bytes, plan_memory, smallest_fit

LLAMA2 = {
    "llama2_7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32),
    "llama2_70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8),
}


def test_exact_parameter_counts_on_the_meta_device():
    s7 = Shape.from_config(LLAMA2["llama2_7b"])
    assert s7.params == 6_738_415_616
    assert s7.layer_params == 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    s70 = Shape.from_config(LLAMA2["llama2_70b"])
    assert s70.params == 68_976_648_192 and s70.kv_hidden == 1024


def test_hand_worked_plan():
    # a toy shape with round numbers: P = 1e9 parameters, 10 layers of 1e8, h = 1000, h_kv = 500, f = 3000, V = 100
    s = Shape(params=10**9, layers=10, hidden=1000, kv_hidden=500, ffn=3000, vocab=100, layer_params=10**8)
    p = plan_memory({"policy": s}, {"ref": s}, gpus=4, gpu_memory_gib=80, precision="bf16-mixed",
                    micro_batch=2, seq_len=1000, checkpointing=True, overhead_gib=2.0)
    c = p.components
    assert c["policy: weights"] == 1e9 * 4 / 4
    assert c["policy: gradients"] == 1e9 * 4 / 4
    assert c["policy: optimizer"] == 1e9 * 8 / 4
    assert c["ref: frozen weights"] == 1e9 * 2 / 4
    assert c["gathered layers (current + prefetch)"] == 2 * 1e8 * 2
    # tokens 2000; per layer (7*1000 + 3*500 + 4*3000) = 20500 values/token * 2 bytes
    per_layer = 20500 * 2000 * 2
    assert c["activations"] == 10 * 1000 * 2000 * 2 + per_layer + 100 * 2000 * 10
    assert activation_bytes(s, 2000, False, 2) == 10 * per_layer + 100 * 2000 * 10
    assert p.train_peak == sum(c.values())
    assert p.fits  # about 4.6 GiB


def test_generation_phase_and_smallest_fit():
    s = Shape.from_config(LLAMA2["llama2_70b"])
    gen = {"policy": "policy", "batch": 64, "length": 1024}

    def at(n):
        return plan_memory({"policy": s, "value": s}, {"reference": s, "rm_helpful": s, "rm_safety": s},
                           gpus=n, gpu_memory_gib=80, generation=gen)

    p8 = at(8)
    assert not p8.fits
    kv = 2 * 80 * 64 * 1024 * 1024 * 2
    assert p8.generation["kv cache"] == kv
    assert p8.generation["policy: consolidated per node"] == s.params * 2 / 8
    n = smallest_fit(at)
    assert n is not None and at(n).fits and not at(n - 8 if n > 8 else n // 2).fits
    # five 70B models, two of them trained with fp32 states: (16 + 16 + 3 * 2) bytes * 69e9 ~ 2.6 TB
    assert at(n).train_peak / GIB < 80


def test_unknown_precision_is_refused():
    s = Shape(params=10, layers=1, hidden=1, kv_hidden=1, ffn=1, vocab=1, layer_params=10)
    with pytest.raises(ValueError, match="precision"):
        plan_memory({"p": s}, {}, gpus=1, gpu_memory_gib=1, precision="fp8")


def test_plan_true_prints_the_plan_and_trains_nothing(make_cfg, tmp_path, capsys):
    from llama2_lit.run import run

    m = run(make_cfg("model=llama2_7b", "plan=true", "stage.batch_size=8", "trainer.devices=8", small=False,
                     out=tmp_path / "run"))
    text = capsys.readouterr().out
    assert "policy 6,738,415,616 parameters" in text and "smallest GPU count that fits" in text
    assert m["plan/fits"] == 1.0 and m["plan/gpus_needed"] <= 8
    assert not (tmp_path / "run").exists()


def test_paper_70b_plans_through_the_fsdp_preset(make_cfg):
    """`python -m llama2_lit stage=<s> model=llama2_70b trainer=fsdp_70b plan=true`: one sequence (or pair) per GPU
    forward, five 70B-class models for PPO; SFT and RM fit the preset's 32 GPUs, PPO needs more."""
    from llama2_lit.plan import plan_from_cfg

    got = {}
    for stage in ("sft", "rm", "ppo"):
        plan, need, text = plan_from_cfg(make_cfg(f"stage={stage}", "model=llama2_70b", "trainer=fsdp_70b",
                                                  small=False))
        got[stage] = (plan.fits, need)
        assert "micro-batch 1 x 4096" in text or "micro-batch 2 x 4096" in text
    assert got["sft"] == (True, 16) and got["rm"] == (True, 24) and got["ppo"] == (False, 48)


@pytest.mark.parametrize("preset,gpus,micro,accumulate", [("fsdp_7b", 8, 8, 1), ("fsdp_13b", 8, 4, 2),
                                                          ("fsdp_70b", 32, 1, 2)])
def test_fsdp_presets_plan_the_papers_64_sequences_per_step_with_no_extra_flag(make_cfg, preset, gpus, micro,
                                                                                accumulate):
    """stage.batch_size is global: each preset's GPUs x accumulated micro-batches x micro-batch = 64 sequences."""
    from llama2_lit.plan import plan_from_cfg

    size = preset.split("_")[1]
    _, _, text = plan_from_cfg(make_cfg("stage=sft", f"model=llama2_{size}", f"trainer={preset}", small=False))
    assert (f"batch: 64 sequences per step (global) = {gpus} ranks x {64 // gpus} per rank ({accumulate} "
            f"micro-batch{'es' if accumulate > 1 else ''} of {micro})") in text
    assert f"micro-batch {micro} x 4096 tokens" in text
    assert gpus * accumulate * micro == 64


def test_plan_counts_float32_master_weights_and_frozen_models_in_model_dtype(make_cfg):
    """bf16 compute does not shrink what trains (16 bytes a parameter); model.dtype sets the frozen copies' bytes."""
    from llama2_lit.plan import plan_from_cfg

    bf16, _, text = plan_from_cfg(make_cfg("stage=ppo", "model=llama2_7b", "trainer=fsdp_7b", small=False))
    fp32, _, _ = plan_from_cfg(make_cfg("stage=ppo", "model=llama2_7b", "trainer=fsdp_7b", "model.dtype=float32",
                                        small=False))
    p = 6_738_415_616
    assert bf16.components["policy: weights"] == fp32.components["policy: weights"] == p * 4 / 8
    assert bf16.components["policy: optimizer"] == p * 8 / 8
    assert bf16.components["reference: frozen weights"] == p * 2 / 8
    assert fp32.components["reference: frozen weights"] == p * 4 / 8
    assert "float32 master weights, frozen models in bfloat16" in text


def test_a_sharded_gpu_run_the_plan_says_does_not_fit_is_refused_unless_forced(make_cfg):
    """stage=ppo on 70B over the preset's 32 GPUs needs 48: refused before any model is built, naming the count;
    planner.force=true launches anyway; 64 GPUs fit; CPU runs are never planned."""
    from llama2_lit.errors import UserError
    from llama2_lit.run import check_plan_fits

    cfg = make_cfg("stage=ppo", "model=llama2_70b", "trainer=fsdp_70b", small=False)
    with pytest.raises(UserError, match=r"does not fit: peak 95\.44 GiB per GPU on 32 GPUs of 80 GiB \(48 GPUs is the"):
        check_plan_fits(cfg)
    check_plan_fits(make_cfg("stage=ppo", "model=llama2_70b", "trainer=fsdp_70b", "planner.force=true", small=False))
    check_plan_fits(make_cfg("stage=ppo", "model=llama2_70b", "trainer=fsdp_70b", "trainer.num_nodes=8", small=False))
    check_plan_fits(make_cfg("stage=ppo", "model=llama2_70b", "trainer=fsdp_70b", "trainer.accelerator=cpu",
                             small=False))
