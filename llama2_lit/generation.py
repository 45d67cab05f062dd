"""Batched generation from chat prompts with a transformers model (reused by eval, RS and PPO)."""
from __future__ import annotations

from typing import Sequence

import torch


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str | list[dict]], max_new_tokens: int = 32,
             batch_size: int = 32, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             num_return_sequences: int = 1) -> list[list[str]]:
    """Generate answers for chat prompts (a user string, or a message list ending with a user turn).

    Returns one list of ``num_return_sequences`` strings per prompt (special tokens stripped).
    Uses left padding and the KV cache; the model's training mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    out: list[list[str]] = []
    try:
        for s in range(0, len(prompts), batch_size):
            chunk = prompts[s:s + batch_size]
            msgs = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in chunk]
            texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]
            enc = tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True).to(device)
            kwargs = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=True)
            if do_sample:
                kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
            seqs = model.generate(**enc, **kwargs)
            new = seqs[:, enc["input_ids"].shape[1]:]
            texts_out = tokenizer.batch_decode(new, skip_special_tokens=True)
            for i in range(len(chunk)):
                out.append([t.strip() for t in texts_out[i * num_return_sequences:(i + 1) * num_return_sequences]])
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out
