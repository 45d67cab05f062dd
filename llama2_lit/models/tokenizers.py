"""Tokenizer helpers: a fingerprint that tells tokenizers apart (:func:`tokenizer_fingerprint`) and the tokenizer saved
in a model folder (:func:`folder_tokenizer`). Imports transformers only."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from transformers import AutoTokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of a tokenizer's vocabulary and special tokens (equal = the same token ids for any text)."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id]
    blob = json.dumps([vocab, special], ensure_ascii=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def folder_tokenizer(path: str | Path, default):
    """The tokenizer saved in the model folder ``path`` (pad = EOS when it has none), else ``default``."""
    path = Path(path).expanduser()
    if not (path / "tokenizer_config.json").exists():
        return default
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
