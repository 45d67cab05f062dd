"""Chat templates, and the real Llama 2 tokenizer with Meta's chat format attached.

``LLAMA2_CHAT_TEMPLATE`` renders a dialog exactly as Meta's reference ``chat_completion``
(``llama/generation.py``) tokenizes it::

    per answered turn:  [bos] + encode(f"[INST] {prompt.strip()} [/INST] {answer.strip()} ") + [eos]
    last (open) turn:   [bos] + encode(f"[INST] {prompt.strip()} [/INST]")

where a leading system message is folded into the first user turn as
``"<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user}"`` (stripped as a whole, like Meta does). As text::

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant} </s><s>[INST] {user} [/INST]

Note the space before ``</s>``: Meta encodes ``"... {answer} "`` so every answered turn ends with
the lone ``"▁"`` piece (id 29871) before EOS. The assistant part (``" {answer} </s>"``) is wrapped in
``{% generation %}`` so ``apply_chat_template(..., return_assistant_tokens_mask=True)`` marks the
answer tokens and the EOS, and nothing else, for the SFT loss.

Llama 2 has no separate "generation prompt": a user turn always ends at ``[/INST]``, so
``add_generation_prompt=True`` renders the same text as ``False`` when the last message is the
user's; with ``True`` the template refuses a conversation that ends with an assistant message.

Matching Meta token for token needs each text chunk between special tokens to get SentencePiece's
dummy-prefix ``"▁"`` (Meta encodes each turn separately). ``load_llama2_tokenizer`` builds the
tokenizer so it does; see its docstring for the traps in the other ways to load it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from llama2_lit.errors import UserError

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

LLAMA2_CHAT_TEMPLATE = (
    "{%- if messages | length == 0 -%}"
    "{{- raise_exception('Llama 2 chat: the conversation is empty') -}}"
    "{%- endif -%}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system_message = messages[0]['content'] -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- if loop_messages | length == 0 -%}"
    "{{- raise_exception('Llama 2 chat: a system message must be followed by a user message') -}}"
    "{%- endif -%}"
    "{%- else -%}"
    "{%- set system_message = none -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set expected = 'user' if loop.index0 % 2 == 0 else 'assistant' -%}"
    "{%- if message['role'] != expected -%}"
    "{{- raise_exception('Llama 2 chat: roles must alternate user/assistant/user/... after an optional "
    "leading system message; message ' ~ loop.index0 ~ ' is ' ~ message['role'] ~ ', expected ' ~ expected) -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system_message is not none -%}"
    "{%- set content = '<<SYS>>\\n' ~ system_message ~ '\\n<</SYS>>\\n\\n' ~ message['content'] -%}"
    "{%- else -%}"
    "{%- set content = message['content'] -%}"
    "{%- endif -%}"
    "{{- bos_token ~ '[INST] ' ~ (content | trim) ~ ' [/INST]' -}}"
    "{%- else -%}"
    "{%- generation -%}"
    "{{- ' ' ~ (message['content'] | trim) ~ ' ' ~ eos_token -}}"
    "{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and loop_messages[-1]['role'] != 'user' -%}"
    "{{- raise_exception('Llama 2 chat: add_generation_prompt needs the last message to be the user\\'s') -}}"
    "{%- endif -%}"
)

# Plain ChatML (as SmolLM2-Instruct uses), without SmolLM2's injected default system prompt.
CHATML_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- message['content'] ~ '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' ~ message['role'] ~ '\\n' ~ message['content'] ~ '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

CHAT_TEMPLATES: dict[str, str] = {"llama2": LLAMA2_CHAT_TEMPLATE, "chatml": CHATML_CHAT_TEMPLATE}

LLAMA2_PAD_TOKEN = "<pad>"
LLAMA2_CONTEXT = 4096


def ensure_chat_template(tokenizer: Any, name: str | None = None) -> Any:
    """Attach a chat template to ``tokenizer`` (in place) and return it.

    ``name`` (``"llama2"`` or ``"chatml"``) sets that template, replacing any the tokenizer had.
    Without ``name``, a tokenizer that already has a template keeps it, and one without gets the
    Llama 2 template.
    """
    if name is not None:
        if name not in CHAT_TEMPLATES:
            raise UserError(f"unknown chat template {name!r}; known: {', '.join(sorted(CHAT_TEMPLATES))}")
        tokenizer.chat_template = CHAT_TEMPLATES[name]
    elif not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
    return tokenizer


def load_llama2_tokenizer(path: str | os.PathLike, *, add_pad: bool = True) -> Any:
    """Load the real Llama 2 tokenizer as a fast (Rust) transformers tokenizer, chat template attached.

    ``path`` is a SentencePiece ``tokenizer.model`` file, or a folder. A folder holding a
    ``tokenizer.json`` (e.g. one saved by ``save_pretrained`` of a tokenizer this function made) is
    loaded as saved; a folder with only ``tokenizer.model`` is converted from it.

    What you get:

    * 32,000 SentencePiece pieces, ``<unk>``=0, ``<s>``=1 (BOS), ``</s>``=2 (EOS); ``tokenizer(text)``
      prepends BOS and appends no EOS, like ``meta-llama/Llama-2-*-hf``. ``apply_chat_template``
      tokenizes with ``add_special_tokens=False`` (the template writes ``<s>``/``</s>`` itself), so do
      not feed a rendered chat string back through ``tokenizer(text)``: that doubles the BOS.
    * Encodes exactly as ``sentencepiece.SentencePieceProcessor.encode`` does on plain text (runs of
      spaces, leading spaces, newlines via byte fallback), and every chunk after a special token gets
      the dummy-prefix ``"▁"``, as Meta's per-turn ``encode`` does.
    * Pad: Llama 2 has none. With ``add_pad=True`` (default) a distinct special token ``"<pad>"`` is
      added at id 32000, so ``len(tokenizer) == 32001`` and a model must
      ``resize_token_embeddings(len(tokenizer))`` before seeing it (its rows are never attended to
      when the attention mask is used). Reward models need pad != eos, to find the last real token.
      With ``add_pad=False`` there is no pad token; set ``pad_token = unk_token`` yourself if you
      want padding without resizing.
    * ``model_max_length`` 4096 (Llama 2's context), ``padding_side`` "right".
    * The Llama 2 chat template (``LLAMA2_CHAT_TEMPLATE``).

    Traps avoided (transformers 5.x):

    * ``LlamaTokenizer(vocab_file=...)`` silently builds a 3-token vocabulary (v5 ignores the file).
    * ``LlamaTokenizer.from_pretrained(folder)`` defaults to ``legacy=False``: its Metaspace only
      prefixes ``"▁"`` at the very start of the string, so ``"<s>[INST]"`` encodes ``"[INST]"`` as
      ``"["`` (29961) instead of Meta's ``"▁["`` (518); even with ``legacy=True`` its BPE splits
      runs of spaces differently from SentencePiece (``"b  c"``). The generic ``TokenizersBackend``
      built from the SentencePiece proto (used here) matches SentencePiece exactly.
    """
    from transformers import AutoTokenizer, TokenizersBackend

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such tokenizer file or folder")
    if path.is_dir() and (path / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(path))  # as saved; never trust_remote_code
    else:
        model_file = path / "tokenizer.model" if path.is_dir() else path
        if not model_file.is_file():
            raise UserError(f"{path}: holds neither tokenizer.json nor tokenizer.model")
        with tempfile.TemporaryDirectory(prefix="llama2-tok-") as tmp:
            # from_pretrained converts a folder's tokenizer.model; copy it so the name is the expected one.
            shutil.copyfile(model_file, Path(tmp) / "tokenizer.model")
            try:
                tokenizer = TokenizersBackend.from_pretrained(
                    tmp, add_bos_token=True, add_eos_token=False, model_max_length=LLAMA2_CONTEXT
                )
            except Exception as err:  # a corrupt or non-SentencePiece file
                raise UserError(f"{model_file}: not a SentencePiece tokenizer.model ({err})") from err
        if len(tokenizer) < 3 or tokenizer.convert_tokens_to_ids("<s>") != 1:
            raise UserError(f"{model_file}: not a Llama-style SentencePiece model (no <s> at id 1)")
    tokenizer.padding_side = "right"
    if add_pad and tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": LLAMA2_PAD_TOKEN})
    ensure_chat_template(tokenizer, "llama2")
    return tokenizer
