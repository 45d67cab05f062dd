"""Scoring responses for RS and PPO: trained reward models (helpfulness, safety) read on the sigmoid scale, or the
synthetic world's gold functions as a stand-in; and the safety-gated combination R_c of Llama 2 §3.2.3.

    scorer = build_scorer(cfg.rs, tokenizer, device)      # rs.scorer=rm|gold, rs.reward_models.{helpfulness,safety}
    helpful, safety = scorer(prompts, responses)          # (B,) float64 each, in [0, 1] (safety NaN without a safety RM)
    r_c = gated(helpful, safety, is_safety, 0.15)
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from llama2_lit.core.rl import safety_gated_reward
from llama2_lit.errors import UserError
from llama2_lit.models.reward import load_exported, score
from llama2_lit.models.tokenizers import tokenizer_fingerprint
from llama2_lit.world import oracle as world

log = logging.getLogger(__name__)
SCORERS = ("rm", "gold")


class GoldScorer:
    """The world's gold functions as sigmoid-scale scores (helpfulness, safety): a stand-in for trained RMs."""

    fingerprint = "gold"
    description = "gold oracle (llama2_lit.world.oracle), a stand-in for reward models"

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            h = [world.gold_helpfulness(p, r) for p, r in zip(prompts, responses)]
            s = [world.gold_safety(p, r) for p, r in zip(prompts, responses)]
        except ValueError as e:
            raise UserError(f"rs.scorer=gold scores synthetic-world prompts only: {e}") from None
        return torch.tensor(h, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)


class RMScorer:
    """Helpfulness and (optional) safety reward models exported by ``stage=rm``, read on the sigmoid scale.

    Each RM renders prompt and response with its own tokenizer's chat template from text, so a reward model
    whose tokenizer differs from the policy's scores correctly: responses are re-tokenised through text.
    Without a safety RM, the reward is the helpfulness score (no gating).

    ``on_meta``: the models are built on the meta device and no weight is read (``models.reward.load_exported``):
    a sharded run (``trainer=fsdp``) shards them and fills each rank's shard from the folders' safetensors files.
    """

    def __init__(self, helpfulness: str, safety: str | None, policy_tokenizer, batch_size: int = 32,
                 max_length: int | None = None, device: str | torch.device = "cpu", dtype: str = "float32",
                 on_meta: bool = False):
        self.paths = {"helpfulness": str(helpfulness), "safety": str(safety) if safety else None}
        self.batch_size, self.max_length = batch_size, max_length
        self.models = {"helpfulness": load_exported(helpfulness, dtype=dtype, device=device, on_meta=on_meta)}
        if safety:
            self.models["safety"] = load_exported(safety, dtype=dtype, device=device, on_meta=on_meta)
        mine = tokenizer_fingerprint(policy_tokenizer)
        for name, (_, tok) in self.models.items():
            if getattr(tok, "chat_template", None) is None:
                raise UserError(f"reward_models.{name}: the reward model's tokenizer has no chat template")
            if tokenizer_fingerprint(tok) != mine:
                log.info("the %s reward model's tokenizer differs from the policy's: responses are re-tokenised "
                         "through text", name)
        blob = json.dumps([[n, folder_fingerprint(p)] for n, p in self.paths.items() if p])
        self.fingerprint = "rm:" + hashlib.sha1(blob.encode()).hexdigest()[:12]
        self.description = f"reward models {self.paths}"

    def _score(self, name: str, prompts, responses) -> torch.Tensor:
        model, tok = self.models[name]
        return torch.sigmoid(score(model, tok, list(prompts), list(responses), batch_size=self.batch_size,
                                   max_length=self.max_length).double())

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(helpfulness, safety)`` (B,) each; a (prompt, response) pair that repeats (K samples of a small policy
        often do) is scored once."""
        keys = [(p if isinstance(p, str) else json.dumps(p, sort_keys=True), r) for p, r in zip(prompts, responses)]
        first: dict[tuple[str, str], int] = {}  # each distinct pair -> the index of its first occurrence
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        slot = {k: j for j, k in enumerate(first)}
        ps, rs = [prompts[i] for i in first.values()], [responses[i] for i in first.values()]
        h = self._score("helpfulness", ps, rs)
        s = self._score("safety", ps, rs) if "safety" in self.models else torch.full_like(h, math.nan)
        back = torch.tensor([slot[k] for k in keys], dtype=torch.long)
        return h[back], s[back]


def gated(helpful: torch.Tensor, safety: torch.Tensor, is_safety: torch.Tensor, threshold: float) -> torch.Tensor:
    """R_c (B,); with no safety score (NaN), the helpfulness score."""
    if torch.isnan(safety).all():
        return helpful.clone()
    return safety_gated_reward(safety, helpful, is_safety.bool(), threshold)


def build_scorer(rs: Mapping[str, Any], policy_tokenizer, device, dtype: str = "float32", stage: str = "rs",
                 on_meta: bool = False) -> GoldScorer | RMScorer:
    """The scorer ``rs`` (a stage's options: ``scorer``, ``reward_models``, ``rm_batch_size``, ``rm_max_length``)
    describes; ``stage`` names the option prefix in error messages; ``on_meta``: see :class:`RMScorer`."""
    kind = rs["scorer"]
    if kind not in SCORERS:
        raise UserError(f"{stage}.scorer: unknown '{kind}' (choose {list(SCORERS)})")
    if kind == "gold":
        return GoldScorer()
    rms = rs.get("reward_models") or {}
    if not rms.get("helpfulness"):
        raise UserError(f"{stage}.scorer=rm needs {stage}.reward_models.helpfulness=<a stage=rm run>/hf (and "
                        f"{stage}.reward_models.safety=...), or {stage}.scorer=gold on the synthetic world")
    return RMScorer(rms["helpfulness"], rms.get("safety"), policy_tokenizer, batch_size=int(rs["rm_batch_size"]),
                    max_length=rs.get("rm_max_length"), device=device, dtype=dtype, on_meta=on_meta)


def folder_fingerprint(path: str | None) -> list:
    if not path:
        return ["random-init"]
    p = Path(path)
    if not p.exists():
        return [str(path)]
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    return [str(p.resolve())] + [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
