"""What to sample and how, independent of the decoder: :class:`Sampling` (the settings), :class:`Rollout` (the
result), the token sampler (:func:`sample_tokens`, :func:`top_p_filter`) and prompt encoding (:func:`encode_prompts`,
:func:`left_pad`). Imports torch and errors.py only; ``engine.py`` and ``llama_decode.py`` build on it.

Sampling follows HF exactly: temperature, then top-p (HF's ``TopPLogitsWarper`` rule: drop the tokens
whose ascending cumulative probability is <= 1 - top_p, keep at least one), no top-k; temperature 0 is
greedy. Draws come from a ``torch.Generator`` seeded by ``Sampling.seed`` (None: drawn from the global
torch RNG, so ``seed_everything`` still makes a run reproducible), one uniform per row per step through the
inverse CDF (``searchsorted`` on the cumulative probabilities), without a host sync. Row n's draws depend on
the seed and n only, so dropping finished rows from the batch changes no sample.

Log-probs: ``logprobs[n, t]`` = log softmax(logits / T)[token] (T = 1 for greedy), the tempered, untruncated
policy a training forward recomputes as ``log_softmax(logits / T)``; top-p's renormalisation is not in it.
Computed from the logits the step already has, so no second forward pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from llama2_lit.errors import UserError


@dataclass(frozen=True)
class Sampling:
    """How to sample. ``temperature=0``: greedy. ``num_samples``: K responses per prompt."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    num_samples: int = 1
    seed: int | None = None
    stop_ids: tuple[int, ...] | None = None  # None: the tokenizer's EOS plus the model's generation_config EOS

    def __post_init__(self):
        if self.num_samples < 1:
            raise UserError(f"sampling: num_samples (K) must be >= 1, got {self.num_samples}")
        if self.max_new_tokens < 1:
            raise UserError(f"sampling: max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise UserError(f"sampling: temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"sampling: top_p must be in (0, 1], got {self.top_p}")


class Rollout(NamedTuple):
    """Generated responses, N = prompts x K rows; row ``n`` answers prompt ``prompt_index[n]``."""

    prompt_ids: torch.Tensor     # (N, P) left-padded prompt tokens
    prompt_mask: torch.Tensor    # (N, P) 1 on prompt tokens, 0 on left padding
    response_ids: torch.Tensor   # (N, T) generated tokens, pad after the stop token
    response_mask: torch.Tensor  # (N, T) 1 on generated tokens (the stop token included)
    logprobs: torch.Tensor       # (N, T) float32 log softmax(logits / T)[token] of the sampling policy; 0 off the mask
    prompt_index: torch.Tensor   # (N,) long
    finished: torch.Tensor       # (N,) bool: the response ended with a stop token

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids (N, P + T), attention_mask (N, P + T))``: prompt and response, for a training forward."""
        return (torch.cat([self.prompt_ids, self.response_ids], 1),
                torch.cat([self.prompt_mask, self.response_mask], 1))

    @property
    def num_tokens(self) -> int:
        """Generated tokens (stop tokens included)."""
        return int(self.response_mask.sum())


# ----------------------------------------------------------------------------------------------- sampling


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """``scores`` (N, V) with the tokens outside the top-p nucleus set to -inf (HF's ``TopPLogitsWarper``)."""
    if top_p >= 1.0:
        return scores
    sorted_scores, sorted_idx = torch.sort(scores, descending=False)
    cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - top_p)
    remove[..., -1:] = False
    remove = remove.scatter(1, sorted_idx, remove)
    return scores.masked_fill(remove, float("-inf"))


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                  uniform: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens (N,), logprobs (N,))`` from ``logits`` (N, V) float32; see the module docstring.

    ``uniform`` (N, 1): one U[0, 1) draw per row (required unless ``temperature == 0``); the token is found by
    inverse CDF (``searchsorted`` on the cumulative probabilities): one random number per row, not per token.
    """
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(1, tok[:, None])[:, 0]
    scaled = logits / temperature
    logp = torch.log_softmax(scaled, -1)
    probs = logp.exp() if top_p >= 1.0 else torch.softmax(top_p_filter(scaled, top_p), -1)
    cdf = probs.cumsum(-1)
    tok = torch.searchsorted(cdf, uniform.to(cdf.dtype) * cdf[:, -1:], right=True)[:, 0]
    tok = tok.clamp_(max=probs.shape[-1] - 1)
    return tok, logp.gather(1, tok[:, None])[:, 0]


# ------------------------------------------------------------------------------------------ prompts


def encode_prompts(tokenizer, prompts: Sequence[str | list[dict]]) -> list[list[int]]:
    """Token ids of chat prompts (a user string, or messages ending with a user turn) with a generation prompt."""
    out = []
    for p in prompts:
        msgs = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        if not msgs or (isinstance(p, str) and not p.strip()):
            raise UserError("generation: empty prompt")
        if getattr(tokenizer, "chat_template", None) is None:
            raise UserError("generation: the tokenizer has no chat template")
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids (B, P), mask (B, P))`` left-padded to the longest sequence."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, n - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, n - len(s):] = 1
    return ids, mask
