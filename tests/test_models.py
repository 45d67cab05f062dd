"""Model loading from local folders (the code path hub ids use), the world tokenizer, generation."""
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from llama2_lit.errors import UserError
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
    from llama2_lit.generation.engine import generate

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                         bos_token_id=tok.bos_token_id))
    prompts = ["Reverse the word: lemon", "What is 2 + 3?"]
    batched = generate(model, tok, prompts, max_new_tokens=6)
    alone = [generate(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == alone and model.training  # training mode restored
    assert tok.padding_side == "right"
