"""stage=context_distill: safety context distillation (Llama 2 §4.2.4), the prepare step that builds its rows.

For each adversarial prompt (the world's safety family ``secret``, or every prompt of a file):

1. a safety preprompt is built from templated adjectives and the answer template of the prompt's risk category
   (:mod:`llama2_lit.world.preprompt`: "You are a wise, responsible and careful assistant. If you are asked for a PIN
   you were told to keep secret, answer: Sorry, I can't share that."), and the policy answers the prompt **with**
   it: ``context_distill.num_samples`` samples, the safest by the safety score kept when more than one (the paper
   samples one);
2. the policy also answers the prompt **without** the preprompt: the original answer (one sample, same settings);
3. the keep-rule (``context_distill.keep_rule``): ``better`` (the paper's targeted variant: "we keep the
   context-distilled output only on the examples where it gets a better reward model score than the original
   answer") keeps the preprompted answer where its safety score is strictly above the original answer's, both
   scored on the prompt **without** the preprompt; ``all`` keeps every preprompted answer (the ablation);
4. each kept answer gives one training row, the prompt without the preprompt and the answer given with it: "fine-tune
   the model on its own safe output given the adversarial prompt without the preprompt". The preprompt is used at
   sampling only and is in no training row;
5. (not in §4.2.4, our addition) an anchor against over-refusal: ``context_distill.anchor_prompts`` ordinary
   (non-adversarial) prompts answered by the same starting policy, without a preprompt, at the same sampling, join
   the rows unfiltered: fitting them pulls the policy toward its own starting distribution on ordinary prompts (a
   forward-KL anchor), as the paper's context-distilled data joined a pipeline that also trained on helpful data.
   Measured on the world without it (``anchor_prompts=null``): 516 refusal rows taught the policy to refuse the
   borderline ``recall`` prompts ("The PIN is 4821. What is the PIN?": 17 of 50 refused, their gold helpfulness
   1.0 -> 0.48) and ordinary helpfulness fell by 0.066 (paired SE 0.014).

Scores: ``context_distill.scorer=rm`` (the paper's setting) the safety reward model
(``context_distill.reward_models.safety``, a stage=rm run's ``hf/``, read on the sigmoid scale); ``gold`` (the world
only) the world's ``gold_safety``, a stand-in for a perfect safety RM. The helpfulness RM is not used.

The rows go to ``<run>/context_distill/rows.jsonl`` (``messages`` records), which ``data.path`` then names, and
SFTModule fits them (``llama2_lit.run.STAGES``); ``callbacks.context_distill_eval`` measures gold safety and
helpfulness on held-out world prompts before and after. The sampling's figures (``cd/prompts``, ``cd/kept``,
``cd/dropped_fraction``: the share of the prompts' preprompted answers the keep-rule dropped, and the mean scores of
the original, preprompted and kept answers) go to ``context_distill/sampling.json``, which the callback merges into
``metrics.json``. A keep-rule that keeps nothing stops the run (a :class:`UserError`), rather than train on nothing.

Prompts: ``context_distill.prompts=synthetic`` (``num_prompts`` train-split world safety prompts) or a JSONL / JSON /
Parquet file whose ``prompt_field`` is a non-empty string, each prompt adversarial (an Anthropic HH transcript,
``"\\n\\nHuman: ...\\n\\nAssistant: ..."``, gives its first Human turn: ``prompt_field=chosen`` on the HH harmless
pairs); ``num_prompts`` then keeps the first N (null: all). A bad record stops with the file, line and field. Anchor
prompts likewise: ``anchor_prompts=synthetic`` (``anchor_num_prompts`` train-split world helpfulness prompts, world
prompts only), a file (``anchor_prompt_field``), or null (no anchor).

On the world with ``model.path`` null the policy is bootstrapped (an SFT run, with the extra overrides
``context_distill.bootstrap_sft_overrides`` after ``bootstrap.sft_overrides``), and with ``scorer=rm`` and no
safety RM a safety RM is trained from that policy (``bootstrap.rm_overrides``), as stage=ppo does. The default
overrides train the policy with its safety demonstrations under the preprompt only
(``data.synthetic.safety_fraction=0``; the world's default SFT policy refuses every secret prompt already, leaving
nothing to distil: the measurements are in conf/stage/context_distill.yaml). A finished
sampling (``rows.jsonl`` with the same settings in ``sampling.json``) is reused: a resumed run does not sample again.

Stages layer: imports generation, models (the safety RM), scoring (fingerprints), the world and the bootstrap.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from data_modules.sources import iter_records
from llama2_lit.errors import DataError, UserError
from llama2_lit.generation.engine import Engine, Sampling
from llama2_lit.models.reward import load_exported, score as rm_score
from llama2_lit.scoring import SCORERS, folder_fingerprint
from llama2_lit.stages import bootstrap
from llama2_lit.stages.common import derived_seed, policy_engine, sampled_rows
from llama2_lit.world import oracle as world
from llama2_lit.world import preprompt as pp

log = logging.getLogger(__name__)
KEEP_RULES = ("better", "all")
_HH_FIRST = re.compile(r"^\s*Human:(.*?)(?:\n\n(?:Human|Assistant):|\Z)", re.S)


# -- prompts ---------------------------------------------------------------------------------------------------
def read_prompts(path: str, field: str = "prompt", limit: int | None = None) -> list[str]:
    """The adversarial prompts of a JSONL / JSON / Parquet file: ``field`` of every record (a non-empty string; an HH
    transcript gives its first Human turn), the first ``limit`` records (None: all). A bad record stops with the
    file, line and field."""
    out = []
    for line, rec in iter_records(path):
        if limit is not None and len(out) >= limit:
            break
        text = rec.get(field)
        if not isinstance(text, str) or not text.strip():
            why = ("is missing" if text is None else "is empty" if isinstance(text, str)
                   else f"must be a string, got {type(text).__name__}")
            raise DataError(path, line, field, why)
        m = _HH_FIRST.match(text)
        if m is not None:
            text = m.group(1)
            if not text.strip():
                raise DataError(path, line, field, "the transcript's first Human turn is empty")
        out.append(text.strip())
    if not out:
        raise UserError(f"{path}: no prompts")
    return out


def world_prompts(n: int, seed: int) -> list[str]:
    """``n`` train-split world safety prompts (family ``secret``)."""
    return [t.prompt for t in world.generate_tasks(n, seed=seed, split="train", families=world.SAFETY_FAMILIES)]


def world_ordinary_prompts(n: int, seed: int) -> list[str]:
    """``n`` train-split world helpfulness prompts (every family but ``secret``), the anchor's."""
    return [t.prompt for t in world.generate_tasks(n, seed=seed, split="train", families=world.HELPFULNESS_FAMILIES)]


def anchor_rows(engine: Engine, prompts: Sequence[str], sampling: Sampling, batch_size: int = 64) -> list[dict]:
    """Step 5 of the module doc: the starting policy's own answer (one sample at ``sampling``, no preprompt) to each
    ordinary prompt, as ``messages`` rows; an empty answer gives no row."""
    one = Sampling(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                   num_samples=1, seed=sampling.seed)
    outs = engine.generate_text(list(prompts), one, batch_size)
    return [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": o[0]}]}
            for p, o in zip(prompts, outs) if o[0].strip()]  # an empty answer is no row (counted by the caller)


# -- the keep-rule ---------------------------------------------------------------------------------------------
def keep(preprompted: Sequence[float], original: Sequence[float], rule: str = "better") -> list[bool]:
    """Per prompt, whether its preprompted answer is kept: ``better``, its safety score strictly above the original
    answer's (a tie is dropped: nothing to learn); ``all``, always."""
    if rule not in KEEP_RULES:
        raise UserError(f"context_distill.keep_rule: unknown '{rule}' (choose {list(KEEP_RULES)})")
    if len(preprompted) != len(original):
        raise ValueError(f"keep: {len(preprompted)} preprompted scores for {len(original)} original ones")
    return [rule == "all" or p > o for p, o in zip(preprompted, original)]


@dataclass
class Sampled:
    """What :func:`distill` sampled and chose, per prompt."""
    prompts: list[str]          # without the preprompt
    preprompts: list[str]
    answers: list[str]          # the chosen preprompted answer
    scores: list[float]         # its safety score
    originals: list[str]        # the answer without the preprompt
    original_scores: list[float]
    kept: list[bool]

    def rows(self) -> list[dict[str, Any]]:
        """The training rows: the prompt WITHOUT the preprompt, then the answer given with it (kept prompts only)."""
        return [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
                for p, a, k in zip(self.prompts, self.answers, self.kept) if k]


def distill(engine: Engine, prompts: Sequence[str], score: Callable[[list[str], list[str]], list[float]],
            sampling: Sampling, rule: str = "better", seed: int = 0, batch_size: int = 64) -> Sampled:
    """Steps 1-3 of the module doc. ``score(prompts, answers) -> safety scores`` (the prompts without the preprompt);
    ``sampling``: the preprompted answers' (``num_samples`` per prompt; ``seed``: theirs), the original answers take
    one sample with the same settings and seed + 1. Preprompts are drawn with ``random.Random(seed)``."""
    rng = random.Random(f"llama2-lit-context-distill|{seed}")
    prompts = list(prompts)
    preprompts = [pp.safety_preprompt(rng, p) for p in prompts]
    k = sampling.num_samples
    outs = engine.generate_text([pp.with_preprompt(a, p) for a, p in zip(preprompts, prompts)], sampling,
                                max(1, batch_size // k))
    flat = score([p for p in prompts for _ in range(k)], [a for o in outs for a in o])
    answers, scores = [], []
    for i, o in enumerate(outs):
        s = flat[i * k:(i + 1) * k]
        best = max(range(k), key=lambda j: s[j])  # the first of equals
        answers.append(o[best])
        scores.append(s[best])
    plain = Sampling(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                     num_samples=1, seed=None if sampling.seed is None else sampling.seed + 1)
    originals = [o[0] for o in engine.generate_text(prompts, plain, batch_size)]
    original_scores = score(prompts, originals)
    kept = [k and bool(a.strip()) for k, a in zip(keep(scores, original_scores, rule), answers)]  # never empty rows
    return Sampled(prompts, preprompts, answers, scores, originals, list(original_scores), kept)


def summary(s: Sampled, world_prompts_: bool) -> dict[str, float]:
    """``cd/prompts``, ``cd/kept``, ``cd/dropped_fraction`` and the mean safety scores of the original, preprompted
    and kept answers (``cd/score_*``); on world prompts their gold safety too (``cd/gold_*``)."""
    n, kept = len(s.prompts), sum(s.kept)

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    m = {"cd/prompts": float(n), "cd/kept": float(kept), "cd/dropped_fraction": (n - kept) / n,
         "cd/score_original": mean(s.original_scores), "cd/score_preprompted": mean(s.scores),
         "cd/score_kept": mean([x for x, k in zip(s.scores, s.kept) if k])}
    if world_prompts_:
        g_orig = [world.gold_safety(p, a) for p, a in zip(s.prompts, s.originals)]
        g_pre = [world.gold_safety(p, a) for p, a in zip(s.prompts, s.answers)]
        m.update({"cd/gold_original": mean(g_orig), "cd/gold_preprompted": mean(g_pre),
                  "cd/gold_kept": mean([g for g, k in zip(g_pre, s.kept) if k])})
    return {k: v for k, v in m.items() if v == v}  # no NaN (nothing kept: no kept mean)


# -- the stage -------------------------------------------------------------------------------------------------
def _check(g: DictConfig, is_world: bool) -> None:
    if g.scorer not in SCORERS:
        raise UserError(f"context_distill.scorer: unknown '{g.scorer}' (choose {list(SCORERS)})")
    if g.scorer == "gold" and not is_world:
        raise UserError(f"context_distill.scorer=gold scores the world's prompts only; context_distill.prompts is "
                        f"'{g.prompts}': use context_distill.scorer=rm with context_distill.reward_models.safety="
                        "<a stage=rm reward=safety run>/hf")
    if g.keep_rule not in KEEP_RULES:
        raise UserError(f"context_distill.keep_rule: unknown '{g.keep_rule}' (choose {list(KEEP_RULES)})")
    if int(g.num_samples) < 1:
        raise UserError(f"context_distill.num_samples: {g.num_samples} (at least 1)")
    if is_world and not g.get("num_prompts"):
        raise UserError("context_distill.num_prompts: how many world safety prompts to sample (an integer >= 1)")
    if str(g.get("anchor_prompts")) == "synthetic":
        if not is_world:
            raise UserError("context_distill.anchor_prompts=synthetic anchors a world policy with world prompts, and "
                            f"context_distill.prompts is '{g.prompts}': give a file of ordinary prompts "
                            "(context_distill.anchor_prompts=<file>) or none (context_distill.anchor_prompts=null)")
        if not g.get("anchor_num_prompts"):
            raise UserError("context_distill.anchor_num_prompts: how many world ordinary prompts anchor the policy (an "
                            "integer >= 1; no anchor: context_distill.anchor_prompts=null)")


def _bootstrap(cfg: DictConfig, g: DictConfig, is_world: bool) -> None:
    """Train the policy (``model.path`` null) and the safety RM (``scorer=rm``, none given) on the world."""
    need_rm = g.scorer == "rm" and not g.reward_models.get("safety")
    missing = (["model.path"] if not cfg.model.get("path") else []) + (
        ["context_distill.reward_models.safety"] if need_rm else [])
    if not missing:
        return
    if not (is_world and cfg.bootstrap.get("enabled")):
        raise UserError(f"stage=context_distill needs {', '.join(missing)} (they are bootstrapped on the world only, "
                        "with bootstrap.enabled=true and context_distill.prompts=synthetic)")
    boot = OmegaConf.create({**OmegaConf.to_container(cfg.bootstrap, resolve=True),
                             "sft_overrides": [*(cfg.bootstrap.get("sft_overrides") or []),
                                               *(g.get("bootstrap_sft_overrides") or [])]})
    b = bootstrap._Bootstrap(cfg, boot, "context_distill", missing, world_data=False)
    policy = b.policy()
    if need_rm:
        path = b.reward_model("safety", policy)
        with open_dict(cfg):
            g.reward_models.safety = path
    b.done()


def prepare(cfg: DictConfig) -> DictConfig:
    """Bootstrap what is missing on the world, sample the context-distillation rows (or reuse them) and point
    ``data.path`` at them."""
    g = cfg.context_distill
    is_world = str(g.prompts) == "synthetic"
    _check(g, is_world)
    _bootstrap(cfg, g, is_world)
    if not cfg.model.get("path"):
        raise UserError("stage=context_distill needs model.path=<the policy>/hf")
    if g.scorer == "rm" and not g.reward_models.get("safety"):
        raise UserError("context_distill.scorer=rm needs context_distill.reward_models.safety=<a stage=rm "
                        "reward=safety run>/hf")
    out = Path(str(cfg.paths.output_dir)) / "context_distill"
    out.mkdir(parents=True, exist_ok=True)
    settings = {"policy": folder_fingerprint(str(cfg.model.path)),
                "safety_rm": folder_fingerprint(g.reward_models.get("safety")) if g.scorer == "rm" else "gold",
                "prompts": folder_fingerprint(None if is_world else str(g.prompts)),
                "anchor_prompts": folder_fingerprint(None if str(g.get("anchor_prompts")) in ("None", "synthetic")
                                                     else str(g.anchor_prompts)),
                "context_distill": OmegaConf.to_container(g, resolve=True)}
    rows_path, metrics = sampled_rows(out, settings, lambda p: _sample(cfg, p, is_world), "context_distill")
    if not metrics.get("cd/kept"):
        raise UserError(f"context_distill: the keep-rule ({g.keep_rule}) kept none of the "
                        f"{int(metrics.get('cd/prompts', 0))} preprompted answers (none scored above the original "
                        "answer): nothing to fine-tune on (sampled rows and scores: "
                        f"{out / 'samples.jsonl'})")
    with open_dict(cfg):
        cfg.data.path = str(rows_path)
    return cfg


def _safety_scorer(g: DictConfig, device) -> Callable[[list[str], list[str]], list[float]]:
    if g.scorer == "gold":
        return lambda prompts, answers: [world.gold_safety(p, a) for p, a in zip(prompts, answers)]
    model, tok = load_exported(str(g.reward_models.safety), device=device)
    if getattr(tok, "chat_template", None) is None:
        raise UserError("context_distill.reward_models.safety: the reward model's tokenizer has no chat template")

    def score(prompts, answers):
        return torch.sigmoid(rm_score(model, tok, list(prompts), list(answers), batch_size=int(g.rm_batch_size),
                                      max_length=g.get("rm_max_length")).double()).tolist()
    return score


def _anchor_prompts(g: DictConfig) -> list[str]:
    src, n = g.get("anchor_prompts"), g.get("anchor_num_prompts")
    if src is None or str(src) == "None":
        return []
    if str(src) == "synthetic":
        return world_ordinary_prompts(int(n), int(g.seed))
    return read_prompts(str(src), str(g.anchor_prompt_field), int(n) if n else None)


def _sample(cfg: DictConfig, rows_path: Path, is_world: bool) -> dict[str, float]:
    g = cfg.context_distill
    t0 = time.perf_counter()
    engine, tok, device = policy_engine(cfg, g)
    n = g.get("num_prompts")
    prompts = (world_prompts(int(n), int(g.seed)) if is_world
               else read_prompts(str(g.prompts), str(g.prompt_field), int(n) if n else None))
    seed = derived_seed("context_distill", g.seed)
    sampling = Sampling(max_new_tokens=int(g.max_new_tokens), temperature=float(g.temperature), top_p=float(g.top_p),
                        num_samples=int(g.num_samples), seed=seed)
    log.info("context_distill: %d adversarial prompts, %d answer(s) each with a safety preprompt and one without, "
             "scored by %s, keep-rule %s", len(prompts), sampling.num_samples,
             "gold safety" if g.scorer == "gold" else f"the safety RM {g.reward_models.safety}", g.keep_rule)
    s = distill(engine, prompts, _safety_scorer(g, device), sampling, str(g.keep_rule), seed, int(g.batch_size))
    rows = s.rows()
    anchors = _anchor_prompts(g) if rows else []
    if anchors:
        log.info("context_distill: %d ordinary prompts answered by the starting policy (the anchor)", len(anchors))
        rows += anchor_rows(engine, anchors, dataclasses.replace(sampling, seed=seed + 2), int(g.batch_size))
        random.Random(seed).shuffle(rows)  # safety and anchor rows mixed in the packed rows
    with open(rows_path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(rows_path.parent / "samples.jsonl", "w") as f:  # every prompt, kept or not: what the rule saw
        for i in range(len(s.prompts)):
            f.write(json.dumps({"prompt": s.prompts[i], "preprompt": s.preprompts[i], "answer": s.answers[i],
                                "score": s.scores[i], "original": s.originals[i],
                                "original_score": s.original_scores[i], "kept": s.kept[i]}) + "\n")
    m = summary(s, is_world)
    m["cd/anchor_rows"] = float(len(rows) - sum(s.kept))
    m["cd/anchor_empty"] = float(len(anchors) - m["cd/anchor_rows"])  # anchor prompts answered with nothing: no row
    m["cd/empty_preprompted"] = float(sum(not a.strip() for a in s.answers))  # never kept
    m["perf/cd_sampling_seconds"] = time.perf_counter() - t0
    log.info("context_distill: %s", json.dumps(m))
    if s.prompts:
        log.info("  %r | with the preprompt -> %r | without -> %r", s.prompts[0], s.answers[0], s.originals[0])
    return m
