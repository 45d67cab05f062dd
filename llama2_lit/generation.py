"""Batched generation from chat prompts (eval, RS, PPO, preference collection).

``generate(model, tokenizer, prompts, max_new_tokens, batch_size, do_sample, temperature, top_p,
num_return_sequences)`` is the engine's (``llama2_lit/engine.py``: static KV cache, fused Llama decode),
token-identical to transformers' ``generate`` for greedy decoding (tests/test_engine.py).
"""
from llama2_lit.engine import generate

__all__ = ["generate"]
