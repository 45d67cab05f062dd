"""The Llama 2 chat template and tokenizer against Meta's reference tokenization.

Tests marked by the ``real_sp`` fixture use the real Llama 2 ``tokenizer.model`` from
``../shared/data`` and skip where it is absent; the template-rendering tests below them need
nothing but a toy tokenizer.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from llama2_lit.errors import UserError
from llama2_lit.models.chat_templates import (
    B_INST,
    B_SYS,
    CHATML_CHAT_TEMPLATE,
    E_INST,
    E_SYS,
    LLAMA2_CHAT_TEMPLATE,
    ensure_chat_template,
    load_llama2_tokenizer,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LLAMA2_MODEL = SHARED_DATA / "tokenizers" / "llama2" / "tokenizer.model"

DIALOG = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": " Paris.  "},
    {"role": "user", "content": "And of  Italy?\n"},
]
# Computed once from sentencepiece with Meta's algorithm and checked piece by piece (EXPECTED_PIECES).
EXPECTED_IDS = [
    1, 518, 25580, 29962, 3532, 14816, 29903, 6778, 13, 3492, 526, 263, 3022, 895, 20255, 29889, 13,
    29966, 829, 14816, 29903, 6778, 13, 13, 5618, 338, 278, 7483, 310, 3444, 29973, 518, 29914, 25580,
    29962, 3681, 29889, 29871, 2,
    1, 518, 25580, 29962, 1126, 310, 29871, 12730, 29973, 518, 29914, 25580, 29962,
]
EXPECTED_PIECES = [
    "<s>", "▁[", "INST", "]", "▁<<", "SY", "S", ">>", "<0x0A>", "You", "▁are", "▁a", "▁conc", "ise",
    "▁assistant", ".", "<0x0A>", "<", "</", "SY", "S", ">>", "<0x0A>", "<0x0A>", "What", "▁is", "▁the",
    "▁capital", "▁of", "▁France", "?", "▁[", "/", "INST", "]", "▁Paris", ".", "▁", "</s>",
    "<s>", "▁[", "INST", "]", "▁And", "▁of", "▁", "▁Italy", "?", "▁[", "/", "INST", "]",
]


def meta_chat_tokens(sp, dialog: list[dict], *, open_turn: bool = True) -> tuple[list[int], list[int]]:
    """Meta's ``chat_completion`` tokenization (llama/generation.py), on a raw SentencePieceProcessor.

    Returns ``(ids, answer_mask)``; the mask is 1 on each answer's tokens and its EOS. With
    ``open_turn=False`` the dialog must end with an answer (the training form) and no open
    ``[INST]`` prompt is appended.
    """
    if dialog[0]["role"] == "system":
        dialog = [
            {"role": dialog[1]["role"], "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}
        ] + dialog[2:]
    assert all(m["role"] == "user" for m in dialog[::2]) and all(m["role"] == "assistant" for m in dialog[1::2])
    ids: list[int] = []
    mask: list[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        turn = [sp.bos_id()] + sp.encode(f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} ")
        turn += [sp.eos_id()]
        prompt_ids = [sp.bos_id()] + sp.encode(f"{B_INST} {prompt['content'].strip()} {E_INST}")
        n_prompt = len(prompt_ids)
        assert turn[:n_prompt] == prompt_ids  # the answer starts on a word boundary
        ids += turn
        mask += [0] * n_prompt + [1] * (len(turn) - n_prompt)
    if open_turn:
        assert dialog[-1]["role"] == "user"
        last = [sp.bos_id()] + sp.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}")
        ids += last
        mask += [0] * len(last)
    else:
        assert dialog[-1]["role"] == "assistant"
    return ids, mask


@pytest.fixture(scope="module")
def real_sp():
    if not LLAMA2_MODEL.is_file():
        pytest.skip(f"../shared/data absent: {LLAMA2_MODEL} not found (the real Llama 2 tokenizer.model)")
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(LLAMA2_MODEL))


@pytest.fixture(scope="module")
def llama2_tok(real_sp):
    return load_llama2_tokenizer(LLAMA2_MODEL)


# --- the real Llama 2 tokenizer -------------------------------------------------------------


def test_two_turn_chat_matches_meta_reference(real_sp, llama2_tok):
    ids = llama2_tok.apply_chat_template(DIALOG, add_generation_prompt=True, tokenize=True)["input_ids"]
    reference, _ = meta_chat_tokens(real_sp, DIALOG, open_turn=True)
    assert ids == reference
    assert ids == EXPECTED_IDS
    assert [real_sp.id_to_piece(i) for i in EXPECTED_IDS] == EXPECTED_PIECES
    text = llama2_tok.apply_chat_template(DIALOG, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<s>[INST] <<SYS>>\nYou are a concise assistant.\n<</SYS>>\n\nWhat is the capital of France? [/INST]"
        " Paris. </s><s>[INST] And of  Italy? [/INST]"
    )


def test_training_form_and_assistant_mask_match_meta(real_sp, llama2_tok):
    dialog = DIALOG + [{"role": "assistant", "content": "Rome — 2,873 km² of it.\n\nCapital since 1871."}]
    out = llama2_tok.apply_chat_template(dialog, tokenize=True, return_assistant_tokens_mask=True)
    ids, mask = meta_chat_tokens(real_sp, dialog, open_turn=False)
    assert out["input_ids"] == ids
    assert out["assistant_masks"] == mask
    assert sum(mask) > 0 and out["input_ids"][-1] == 2 and mask[-1] == 1  # the EOS is trained on


def test_renderings_are_prefix_stable(llama2_tok):
    """Prompt-with-generation-prompt ids are a prefix of the ids with the answer (for label masking)."""
    dialog = DIALOG + [{"role": "assistant", "content": "Rome."}]
    for i, message in enumerate(dialog):
        if message["role"] != "assistant":
            continue
        prompt = llama2_tok.apply_chat_template(dialog[:i], add_generation_prompt=True)["input_ids"]
        full = llama2_tok.apply_chat_template(dialog[: i + 1])["input_ids"]
        assert full[: len(prompt)] == prompt and len(full) > len(prompt)
        text = llama2_tok.apply_chat_template(dialog[: i + 1], tokenize=False)
        assert llama2_tok(text, add_special_tokens=False)["input_ids"] == full


@pytest.mark.parametrize(
    "text",
    [
        "Hello world",
        "b  c   d",  # runs of spaces: transformers' LlamaTokenizer class splits these differently
        " leading space",
        "trailing space ",
        "line\n\nbreaks\tand tabs",
        "2023: café, naïve, 日本語, 🙂",
        "[INST] not special [/INST] <<SYS>>",
        "",
    ],
)
def test_plain_text_encodes_like_sentencepiece(real_sp, llama2_tok, text):
    assert llama2_tok(text, add_special_tokens=False)["input_ids"] == real_sp.encode(text)
    assert llama2_tok(text)["input_ids"] == [1] + real_sp.encode(text)  # BOS added, no EOS
    assert llama2_tok.decode(real_sp.encode(text)) == real_sp.decode(real_sp.encode(text))


def test_special_tokens_and_distinct_pad(llama2_tok):
    tok = llama2_tok
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    assert tok.pad_token == "<pad>" and tok.pad_token_id == 32000 and len(tok) == 32001
    assert tok.pad_token_id != tok.eos_token_id
    assert tok("a<pad>b", add_special_tokens=False)["input_ids"].count(32000) == 1
    assert tok.model_max_length == 4096 and tok.padding_side == "right"
    assert tok.chat_template == LLAMA2_CHAT_TEMPLATE
    batch = tok(["a", "a b c"], padding=True)
    assert batch["input_ids"][0][-1] == 32000 and batch["attention_mask"][0][-1] == 0


def test_save_and_reload_keep_everything(llama2_tok, tmp_path):
    from transformers import AutoTokenizer

    llama2_tok.save_pretrained(tmp_path / "saved")
    expected = llama2_tok.apply_chat_template(DIALOG, add_generation_prompt=True)["input_ids"]
    for tok in (load_llama2_tokenizer(tmp_path / "saved"), AutoTokenizer.from_pretrained(tmp_path / "saved")):
        assert tok.apply_chat_template(DIALOG, add_generation_prompt=True)["input_ids"] == expected == EXPECTED_IDS
        assert tok.pad_token_id == 32000 and len(tok) == 32001
        assert tok("b  c")["input_ids"] == llama2_tok("b  c")["input_ids"]

    folder = tmp_path / "spm-only"
    folder.mkdir()
    shutil.copyfile(LLAMA2_MODEL, folder / "tokenizer.model")
    tok = load_llama2_tokenizer(folder, add_pad=False)
    assert tok.pad_token is None and len(tok) == 32000
    assert tok.apply_chat_template(DIALOG, add_generation_prompt=True)["input_ids"] == EXPECTED_IDS


def test_bad_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such tokenizer"):
        load_llama2_tokenizer(tmp_path / "missing.model")
    with pytest.raises(UserError, match="neither tokenizer.json nor tokenizer.model"):
        load_llama2_tokenizer(tmp_path)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a sentencepiece model")
    with pytest.raises(UserError, match="junk.model"):
        load_llama2_tokenizer(junk)


# --- the template itself (no shared data needed) ------------------------------------------------


@pytest.fixture
def toy_tok():
    from tokenizers import Tokenizer, models
    from transformers import TokenizersBackend

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    return TokenizersBackend(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _render(tok, messages, **kw):
    return tok.apply_chat_template(messages, tokenize=False, chat_template=LLAMA2_CHAT_TEMPLATE, **kw)


def test_template_renders_meta_format(toy_tok):
    assert _render(toy_tok, DIALOG, add_generation_prompt=True) == (
        "<s>[INST] <<SYS>>\nYou are a concise assistant.\n<</SYS>>\n\nWhat is the capital of France? [/INST]"
        " Paris. </s><s>[INST] And of  Italy? [/INST]"
    )
    # no system; contents stripped; generation prompt adds nothing after a user turn
    msgs = [{"role": "user", "content": "\n hi \n"}]
    assert _render(toy_tok, msgs) == _render(toy_tok, msgs, add_generation_prompt=True) == "<s>[INST] hi [/INST]"
    # like Meta, only the folded "<<SYS>>...user" string is stripped, not the system text inside it
    sys_msgs = [{"role": "system", "content": "  be brief  "}, {"role": "user", "content": "q "}]
    assert _render(toy_tok, sys_msgs) == "<s>[INST] <<SYS>>\n  be brief  \n<</SYS>>\n\nq [/INST]"
    done = msgs + [{"role": "assistant", "content": " hello "}]
    assert _render(toy_tok, done) == "<s>[INST] hi [/INST] hello </s>"
    prefill = msgs + [{"role": "assistant", "content": "Sure, here"}]
    assert _render(toy_tok, prefill, continue_final_message=True) == "<s>[INST] hi [/INST] Sure, here"


@pytest.mark.parametrize(
    "messages, kw, match",
    [
        ([{"role": "assistant", "content": "a"}], {}, "message 0 is assistant, expected user"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], {}, "expected assistant"),
        ([{"role": "system", "content": "s"}], {}, "followed by a user message"),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}],
            {},
            "message 1 is system",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            {"add_generation_prompt": True},
            "add_generation_prompt needs the last message to be the user",
        ),
    ],
)
def test_template_rejects_what_meta_rejects(toy_tok, messages, kw, match):
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match=match):
        _render(toy_tok, messages, **kw)


def test_ensure_chat_template(toy_tok):
    assert not toy_tok.chat_template
    assert ensure_chat_template(toy_tok) is toy_tok and toy_tok.chat_template == LLAMA2_CHAT_TEMPLATE
    toy_tok.chat_template = "{{ 'mine' }}"
    ensure_chat_template(toy_tok)
    assert toy_tok.chat_template == "{{ 'mine' }}"  # an existing template is kept without a name
    ensure_chat_template(toy_tok, "chatml")
    assert toy_tok.chat_template == CHATML_CHAT_TEMPLATE
    text = toy_tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tokenize=False
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    ensure_chat_template(toy_tok, "llama2")
    assert toy_tok.chat_template == LLAMA2_CHAT_TEMPLATE
    with pytest.raises(UserError, match="unknown chat template 'vicuna'"):
        ensure_chat_template(toy_tok, "vicuna")
