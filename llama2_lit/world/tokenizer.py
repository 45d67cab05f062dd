"""A small byte-level BPE tokenizer trained offline on the synthetic world's text.

It has real ``<pad>``, ``<s>`` and ``</s>`` tokens (pad != eos, which reward models need), role
tokens for a chat template, and splits digits one by one (as Llama's tokenizer does) so that the
arithmetic families stay learnable. Training takes about a second; the result is cached on disk
keyed by its settings, so every stage of a pipeline sees the same ids.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llama2_lit.world import oracle as world

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]

# The separator between prompt and answer is the <|assistant|> token (paper §3.1: "a special token
# is utilized to separate the prompt and answer segments"); every answer ends with </s>.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('unknown role: ' + m['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_VERSION = 2  # 2: the constraint families joined the corpus


def build_world_tokenizer(vocab_size: int = 512, cache_dir: str | None = None, corpus_size: int = 4000,
                          seed: int = 0) -> PreTrainedTokenizerFast:
    """Train (or load from ``cache_dir``) the world tokenizer."""
    key = hashlib.sha1(json.dumps([_VERSION, vocab_size, corpus_size, seed]).encode()).hexdigest()[:10]
    target = Path(cache_dir) / f"world_bpe_{vocab_size}_{key}" if cache_dir else None
    if target is not None and (target / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(target))

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(world.corpus(n=corpus_size, seed=seed), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    if target is not None:
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")  # the ranks of one run may each build it
        fast.save_pretrained(str(tmp))
        try:
            if not target.exists():
                tmp.replace(target)
        except OSError:  # another process put it there first: theirs is the same tokenizer
            pass
        shutil.rmtree(tmp, ignore_errors=True)
    return fast
