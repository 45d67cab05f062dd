"""The PPO value model (critic): a scalar head read at every token, not only the last.

It is the reward model's architecture (``LlamaForSequenceClassification``, ``num_labels=1``), so it can start
from a trained reward model (``init=reward``: backbone and head, the usual choice) or from the policy checkpoint
(``init=policy``: the LM head dropped, a fresh scalar head). Values are ``score(hidden_states)`` at every position.

    vm = load_value_model("reward", policy_cfg, tokenizer, reward_path="outputs/runs/rm/hf")
    v = token_values(vm, input_ids, attention_mask, position_ids)      # (B, T) float32
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from transformers import AutoTokenizer

from llama2_lit.errors import UserError
from llama2_lit.models.loading import resolve_path
from llama2_lit.models.reward import load_reward_model
from llama2_lit.models.tokenizers import tokenizer_fingerprint

VALUE_INITS = ("auto", "reward", "policy")


def load_value_model(init: str, policy_cfg: Mapping[str, Any], tokenizer, reward_path: str | None = None):
    """A value model sharing ``tokenizer`` (the policy's: values are read at the policy's tokens).

    ``init=reward``: the exported reward model at ``reward_path``; refused when its tokenizer differs from the
    policy's. ``init=policy``: the policy checkpoint (``policy_cfg``) with a new scalar head.
    """
    if init not in VALUE_INITS:
        raise UserError(f"ppo.value_init: unknown '{init}' (choose {list(VALUE_INITS)})")
    if init == "auto":
        init = "reward" if reward_path else "policy"
    if init == "policy":
        return load_reward_model(dict(policy_cfg), tokenizer, freeze_layers=0).train()
    if not reward_path:
        raise UserError("ppo.value_init=reward needs a helpfulness reward model (ppo.reward_models.helpfulness)")
    src = resolve_path(str(reward_path), "ppo.reward_models.helpfulness")
    if tokenizer_fingerprint(AutoTokenizer.from_pretrained(src)) != tokenizer_fingerprint(tokenizer):
        raise UserError(f"ppo.value_init=reward: the reward model at '{reward_path}' has a different tokenizer from "
                        "the policy, and a value model reads values at the policy's tokens; use ppo.value_init=policy")
    cfg = {k: v for k, v in dict(policy_cfg).items() if k in ("dtype", "attn_implementation", "init_device")}
    return load_reward_model({**cfg, "path": src}, tokenizer, freeze_layers=0).train()


def token_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor | None = None, last: int | None = None) -> torch.Tensor:
    """The value head at every position (B, T) float32; ``last``: only the last ``last`` positions (B, last)."""
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state  # (B, T, H)
    if last is not None:
        hidden = hidden[:, -last:]
    return model.score(hidden)[..., 0].float()
