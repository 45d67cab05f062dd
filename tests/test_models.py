"""Model loading from local folders (the code path hub ids use), the world tokenizer, generation."""
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from llama2_lit.errors import UserError
from llama2_lit.generation.engine import Engine, Sampling
from llama2_lit.models.loading import load_causal_lm, resolve_path


def test_world_tokenizer_has_real_special_tokens_and_splits_digits(tok):
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3
    assert tok.tokenize("4821") == ["4", "8", "2", "1"]
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<s><|user|>Hi<|assistant|>"
    assert tok.decode(tok("Reverse the word: lemon")["input_ids"]) == "Reverse the word: lemon"


def test_world_tokenizer_is_cached_and_deterministic(cache_dir, tok):
    from llama2_lit.world.tokenizer import build_world_tokenizer

    again = build_world_tokenizer(vocab_size=512, cache_dir=cache_dir)
    fresh = build_world_tokenizer(vocab_size=512, cache_dir=None)  # trained anew
    assert again.get_vocab() == tok.get_vocab() == fresh.get_vocab()


def test_llama2_config_loads_a_local_checkpoint_with_the_llama2_template(make_cfg, tmp_path, tok):
    # a small Llama saved like a hub checkpoint; the llama2_7b config pointed at it, as a user would
    torch.manual_seed(0)
    ref = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4, pad_token_id=tok.pad_token_id))
    ref.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    cfg = make_cfg("model=llama2_7b", f"model.path={tmp_path / 'ckpt'}", "model.dtype=float32", small=False)
    t = instantiate(cfg.model.tokenizer)
    assert "[INST]" in t.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
    model = load_causal_lm(OmegaConf.to_container(cfg.model, resolve=True), t)
    assert model.config.use_cache is False and model.is_activation_checkpointing
    for (n, a), (_, b) in zip(ref.state_dict().items(), model.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)


def test_paths_and_hub_ids():
    assert resolve_path("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    with pytest.raises(UserError, match="model.path: '/no/such/dir' does not exist"):
        resolve_path("/no/such/dir")
    with pytest.raises(UserError, match="does not exist"):
        resolve_path("./checkpoints/missing")


def test_generate_batches_with_left_padding_like_single_prompts(tok):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                         bos_token_id=tok.bos_token_id))
    prompts = ["Reverse the word: lemon", "What is 2 + 3?"]
    greedy = Sampling(max_new_tokens=6, temperature=0.0)
    batched = Engine(model, tok).generate_text(prompts, greedy)
    alone = [Engine(model, tok).generate_text([p], greedy)[0] for p in prompts]
    assert batched == alone and model.training  # training mode restored
    assert tok.padding_side == "right"


def _bad_model_folders(root, tok):
    """Paths that hold no loadable model: missing, an empty folder, a config (and tokenizer) without weights, an
    unknown config."""
    (root / "empty").mkdir()
    (root / "no_weights").mkdir()
    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4).save_pretrained(
        root / "no_weights")
    tok.save_pretrained(root / "no_weights")
    (root / "no_model_type").mkdir()
    (root / "no_model_type" / "config.json").write_text('{"hidden_size": 4}')
    return {"missing": (root / "does/not/exist", "does not exist"), "empty": (root / "empty", "holds no config.json"),
            "no_weights": (root / "no_weights", "no file named model.safetensors"),
            "no_model_type": (root / "no_model_type", "model_type")}


@pytest.mark.parametrize("case", ["missing", "empty", "no_weights", "no_model_type"])
@pytest.mark.parametrize("kind", ["causal_lm", "reward_model", "exported_reward_model"])
def test_a_path_without_a_model_is_a_one_line_user_error(case, kind, tok, tmp_path):
    from llama2_lit.models.reward import load_exported, load_reward_model

    path, why = _bad_model_folders(tmp_path, tok)[case]
    load = {"causal_lm": lambda: load_causal_lm({"path": str(path)}, tok),
            "reward_model": lambda: load_reward_model({"path": str(path)}, tok),
            "exported_reward_model": lambda: load_exported(path)}[kind]
    with pytest.raises(UserError) as e:
        load()
    what = "reward model path" if kind == "exported_reward_model" else "model.path"
    assert str(e.value).startswith(f"{what}: ") and str(path) in str(e.value) and why in str(e.value)
    assert "\n" not in str(e.value)


def test_cli_model_path_to_an_empty_folder_exits_2_with_one_line(tmp_path, cache_dir):
    from tests.test_errors import cli

    (tmp_path / "empty").mkdir()
    r = cli("stage=sft", "model=tiny", f"model.path={tmp_path / 'empty'}", f"hydra.run.dir={tmp_path / 'run'}",
            f"paths.cache_dir={cache_dir}")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (f"error: model.path: '{tmp_path / 'empty'}' holds no config.json, so "
                                                 "it is not a saved model (give a save_pretrained folder, such as a "
                                                 "run's hf/, or a hub id)")
