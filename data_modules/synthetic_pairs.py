"""Preference pairs from the synthetic world, labelled by a simulated annotator with gold scores.

For each world prompt, two responses are sampled, either from a policy checkpoint (a causal LM folder,
e.g. an SFT run's ``hf/``; each response at a temperature drawn from ``temperatures``, as the paper
varies temperature) or, with ``policy: perturb``, by :func:`llama2_lit.world.oracle.perturb` at two random noise
levels (no model: fast, for tests). The policy is sampled by ``policy_sampler``, a callable the config injects
(``llama2_lit.stages.collect.policy_pair_sampler``), so this data module imports no model code. The simulated
annotator (:func:`annotate`) then

* on helpfulness prompts compares ``world.gold_helpfulness``; on safety prompts ``world.gold_safety``
  (ties broken by helpfulness), so an unsafe response is never chosen over a safe one;
* chooses the gold-better response, rates the pair from the gold gap (``thresholds``: the smallest gap
  for ``significantly_better``, ``better``, ``slightly_better``; below that ``negligibly_better``);
  equal gold scores carry no preference and are dropped (``ties: drop``, counted), or kept as
  ``negligibly_better`` with a random choice (``ties: keep``, the paper's "unsure");
* flips the choice with probability ``label_noise`` (annotator error; the rating is kept);
* labels each safety pair with its safety bin (Table 29: ``preferred_safe_other_unsafe``, ``both_safe``,
  ``both_unsafe``; an answer is safe when its gold safety is 1, it leaks nothing), from the answers' gold safety; a
  pair whose label noise chose the unsafe answer over the safe one is in no bin (``safety_label`` null).

Identical or empty responses are drawn again up to ``max_tries`` draws in all (:func:`draw_pairs`, which
``stage=collect`` shares), then counted (``unpaired``) and left out. The pairs are
written as flat JSONL (``prompt``, ``chosen``, ``rejected``, ``rating``, ``is_safety``, ``safety_label`` plus the gold
scores for inspection) under a cache folder keyed by every setting and the policy's files, and copied
to ``<run_dir>/pairs/{train,val}.jsonl``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from data_modules.preferences import RATINGS, SAFETY_LABELS, safety_bin
from llama2_lit.world import oracle as world
from llama2_lit.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_THRESHOLDS = {"significantly_better": 0.5, "better": 0.25, "slightly_better": 0.15}
_VERSION = 3  # 3: safety_label on safety pairs
SAFE = 1.0  # an answer is safe when its gold safety is at least this (it leaks no part of the secret)


def rate(gap: float, thresholds: Mapping[str, float] = DEFAULT_THRESHOLDS) -> str:
    """The rating of a pair whose gold scores differ by ``gap`` >= 0 (thresholds: smallest gap per rating)."""
    for r in RATINGS[:-1]:
        if gap >= thresholds[r]:
            return r
    return "negligibly_better"


def annotate(prompt: str, a: str, b: str, rng: random.Random, *, thresholds: Mapping[str, float] = DEFAULT_THRESHOLDS,
             label_noise: float = 0.0, ties: str = "drop") -> dict | None:
    """The simulated annotator's record for responses ``a``, ``b`` to a world prompt, or None (identical
    or empty responses, or a tie with ``ties='drop'``). See the module docstring for the rules."""
    if a.strip() == b.strip() or not a.strip() or not b.strip():
        return None
    is_safety = world.is_safety_prompt(prompt)
    ha, hb = world.gold_helpfulness(prompt, a), world.gold_helpfulness(prompt, b)
    sa, sb = world.gold_safety(prompt, a), world.gold_safety(prompt, b)
    gap = (sa - sb) if is_safety and sa != sb else (ha - hb)
    if gap == 0:
        if ties == "drop":
            return None
        a_first = rng.random() < 0.5
    else:
        a_first = gap > 0
    chosen, rejected = (a, b) if a_first else (b, a)
    flipped = rng.random() < label_noise
    if flipped:
        chosen, rejected = rejected, chosen
    c_is_a = a_first != flipped
    sc, sr = (sa, sb) if c_is_a else (sb, sa)
    return {
        "prompt": prompt, "chosen": chosen, "rejected": rejected, "rating": rate(abs(gap), thresholds),
        "is_safety": is_safety, "source": "synthetic", "gold_gap": abs(gap), "label_flipped": flipped,
        "safety_label": safety_bin(sc >= SAFE, sr >= SAFE) if is_safety else None,
        "gold_helpfulness": [ha, hb] if c_is_a else [hb, ha], "gold_safety": [sa, sb] if c_is_a else [sb, sa],
    }


# ------------------------------------------------------------------------------------------ samplers


def sample_perturb(tasks: Sequence[world.Task], rng: random.Random) -> list[tuple[str, str]]:
    """Two answers per task from ``world.perturb`` at two noise levels drawn uniformly from [0, 1]."""
    return [(world.perturb(t, rng, rng.random()), world.perturb(t, rng, rng.random())) for t in tasks]


Pair = tuple[str, str]
# policy_sampler(policy folder, tokenizer, *, temperatures, top_p, max_new_tokens, batch_size) -> sample(prompts, rng)
PolicySampler = Callable[..., Callable[[Sequence[str], random.Random], list[Pair]]]


def usable(a: str, b: str) -> bool:
    """Whether two answers make a pair: both non-empty and different (ends stripped)."""
    return bool(a.strip()) and bool(b.strip()) and a.strip() != b.strip()


@dataclass
class Draws:
    """What :func:`draw_pairs` saw: every item's first draw, the items never paired and the draws that failed."""

    first: dict[int, Pair] = field(default_factory=dict)  # item index -> its first draw, in draw order
    unpaired: list[int] = field(default_factory=list)     # items still without a usable pair after the last draw
    resampled: set[int] = field(default_factory=set)      # items drawn more than once
    identical: int = 0                                    # draws whose two answers were the same
    empty: int = 0                                        # draws with an empty answer


def draw_pairs(items: Sequence, sample: Callable[[Sequence, int], list[Pair]], on_pair: Callable[[int, str, str], Any],
               *, max_tries: int) -> Draws:
    """Draw two answers for every item, and again for the items whose two answers are identical or empty, at most
    ``max_tries`` draws in all. ``sample(items, attempt) -> [(a, b)]``; ``on_pair(index, a, b)`` is called for every
    usable pair as soon as it is drawn (in item order within a draw)."""
    d = Draws()
    pending = list(range(len(items)))
    for attempt in range(max(1, int(max_tries))):
        if not pending:
            break
        if attempt:
            d.resampled.update(pending)
        retry = []
        for i, (a, b) in zip(pending, sample([items[i] for i in pending], attempt)):
            d.first.setdefault(i, (a, b))
            if usable(a, b):
                on_pair(i, a, b)
                continue
            if not a.strip() or not b.strip():
                d.empty += 1
            else:
                d.identical += 1
            retry.append(i)
        pending = retry
    d.unpaired = pending
    return d


def make_pairs(tasks: Sequence[world.Task], sampler, rng: random.Random, *, max_tries: int = 3,
               **annotator) -> tuple[list[dict], dict[str, float]]:
    """Annotated pair records for ``tasks``; ``sampler(tasks) -> [(a, b)]`` is called again for the tasks whose
    two answers are identical or empty, at most ``max_tries`` times in all."""
    records: dict[int, dict] = {}
    ties = 0

    def annotate_pair(i: int, a: str, b: str) -> None:
        nonlocal ties
        rec = annotate(tasks[i].prompt, a, b, rng, **annotator)
        if rec is None:  # a dropped tie
            ties += 1
            return
        ties += rec["gold_gap"] == 0
        records[i] = rec

    draws = draw_pairs(tasks, lambda ts, attempt: sampler(ts), annotate_pair, max_tries=max_tries)
    gold_sum = 0.0
    for i, (a, b) in draws.first.items():  # policy quality: the first two samples of every prompt
        gold_sum += world.gold_helpfulness(tasks[i].prompt, a) + world.gold_helpfulness(tasks[i].prompt, b)
    out = [records[i] for i in sorted(records)]
    stats = {
        "prompts": len(tasks), "pairs": len(out), "unpaired": len(draws.unpaired), "ties": ties,
        "label_flipped": sum(r["label_flipped"] for r in out), "safety_pairs": sum(r["is_safety"] for r in out),
        "sample_gold_helpfulness": gold_sum / max(1, 2 * len(draws.first)),
        "mean_gold_gap": sum(r["gold_gap"] for r in out) / max(1, len(out)),
    }
    for r in RATINGS:
        stats[f"rating/{r}"] = sum(x["rating"] == r for x in out)
    for b in SAFETY_LABELS:
        stats[f"safety_label/{b}"] = sum(x["safety_label"] == b for x in out)
    stats["safety_label/none"] = sum(x["is_safety"] and x["safety_label"] is None for x in out)
    return out, stats


# ---------------------------------------------------------------------------------------- the files


def _fingerprint(policy: str | None) -> list:
    if not policy or policy == "perturb":
        return ["perturb"]
    p = Path(policy)
    if not p.exists():
        raise UserError(f"data.synthetic.policy: '{policy}' does not exist (a causal LM folder, or 'perturb')")
    return [str(p.resolve())] + sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir()
                                       if f.is_file())


def build_synthetic_pairs(tokenizer=None, *, seed: int = 0, run_dir: str | None = None, cache_dir: str | None = None,
                          policy: str | None = "perturb", num_train: int = 4000, num_val: int = 400,
                          num_eval: int = 0, safety_fraction: float = 0.2,
                          temperatures: Sequence[float] = (0.7, 1.0, 1.3),
                          top_p: float = 1.0, max_new_tokens: int = 24, gen_batch_size: int = 64,
                          thresholds: Mapping[str, float] | None = None, label_noise: float = 0.0, ties: str = "drop",
                          max_tries: int = 3, perturb_fraction: float = 0.0, policy_sampler: PolicySampler | None = None,
                          **unknown: Any) -> tuple[dict[str, str], dict[str, float]]:
    """Write train (``split=train`` prompts, ``seed``) and val (held-out prompts, ``seed + 1``) pair files.

    ``policy``: a causal LM folder to sample from, or ``perturb`` / null (no model). ``perturb_fraction``: with a
    policy, the share of prompts whose two answers come from ``world.perturb`` instead (a second source of
    preference data covering the whole quality range, like the paper's open-source data next to Meta's). ``num_eval`` is
    accepted and unused (shared with the SFT world options). ``policy_sampler``: how to sample a policy (see
    :data:`PolicySampler`; the config injects ``llama2_lit.stages.collect.policy_pair_sampler``), needed with a
    policy only and not part of the cache key. Returns ``({"train": path, "val": path},
    stats)`` with stats flattened as ``data/synthetic/<split>/<key>``.
    """
    if unknown:
        raise UserError(f"data.synthetic: unknown option(s) {sorted(unknown)}")
    if ties not in ("keep", "drop"):
        raise UserError(f"data.synthetic.ties: unknown '{ties}' (choose keep, drop)")
    if not 0.0 <= perturb_fraction <= 1.0:
        raise UserError(f"data.synthetic.perturb_fraction must be in [0, 1], got {perturb_fraction}")
    if not 0.0 <= label_noise <= 0.5:
        raise UserError(f"data.synthetic.label_noise must be in [0, 0.5], got {label_noise}")
    thr = {**DEFAULT_THRESHOLDS, **dict(thresholds or {})}
    policy = None if policy in (None, "", "perturb") else str(policy)
    if policy is not None and policy_sampler is None:
        raise UserError("data.synthetic.policy_sampler: sampling pairs from a policy needs a sampler (conf/data/"
                        "synthetic_pairs.yaml injects llama2_lit.stages.collect.policy_pair_sampler)")
    settings = dict(v=_VERSION, seed=seed, policy=_fingerprint(policy), num_train=num_train, num_val=num_val,
                    safety_fraction=safety_fraction, temperatures=[float(t) for t in temperatures], top_p=top_p,
                    max_new_tokens=max_new_tokens, thresholds=thr, label_noise=label_noise, ties=ties,
                    max_tries=max_tries)
    if perturb_fraction and policy is not None:  # only when used: earlier caches keep their keys
        settings["perturb_fraction"] = float(perturb_fraction)
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache_dir) / "synthetic_pairs" / key if cache_dir else Path(run_dir or ".") / "pairs"
    files = {s: folder / f"{s}.jsonl" for s in ("train", "val")}
    stats_file = folder / "stats.json"
    if all(f.exists() for f in files.values()) and stats_file.exists():
        log.info("synthetic pairs: reusing %s", folder)
        stats = json.loads(stats_file.read_text())
    else:
        sample = None if policy is None else policy_sampler(
            policy, tokenizer, temperatures=settings["temperatures"], top_p=settings["top_p"],
            max_new_tokens=settings["max_new_tokens"], batch_size=gen_batch_size)
        stats = _generate(folder, files, settings, policy, sample, seed, thr)
        tmp = stats_file.with_suffix(f".{os.getpid()}.tmp")  # atomic: the ranks of one run each write it
        tmp.write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
        tmp.replace(stats_file)
    if run_dir and cache_dir:  # a copy next to the run, for inspection (atomic: another rank may be reading it)
        dest = Path(run_dir) / "pairs"
        dest.mkdir(parents=True, exist_ok=True)
        for s, f in files.items():
            tmp = dest / f".{f.name}.{os.getpid()}.tmp"
            shutil.copyfile(f, tmp)
            tmp.replace(dest / f.name)
        files = {s: dest / f.name for s, f in files.items()}
    return {s: str(f) for s, f in files.items()}, stats


def _generate(folder: Path, files, settings, policy: str | None, sample, seed, thr) -> dict[str, float]:
    """Write the train and val pair files; ``sample(prompts, rng) -> [(a, b)]`` samples the policy (None: perturb)."""
    folder.mkdir(parents=True, exist_ok=True)
    stats: dict[str, float] = {}
    splits = {"train": ("train", settings["num_train"], seed), "val": ("heldout", settings["num_val"], seed + 1)}
    for name, (split, n, s) in splits.items():
        tasks = world.generate_tasks(n, seed=s, split=split, safety_fraction=settings["safety_fraction"])
        rng = random.Random(f"synthetic-pairs|{name}|{s}")
        if sample is None:
            sampler = lambda ts: sample_perturb(ts, rng)  # noqa: E731
        else:
            frac = settings.get("perturb_fraction", 0.0)

            def sampler(ts):
                use = [frac > 0 and rng.random() < frac for _ in ts]
                out = [None] * len(ts)
                idx = [i for i, u in enumerate(use) if not u]
                if idx:
                    for i, pair in zip(idx, sample([ts[i].prompt for i in idx], rng)):
                        out[i] = pair
                for i in (i for i, u in enumerate(use) if u):
                    out[i] = (world.perturb(ts[i], rng, rng.random()), world.perturb(ts[i], rng, rng.random()))
                return out
        with torch.random.fork_rng():
            torch.manual_seed(s)
            records, st = make_pairs(tasks, sampler, rng, max_tries=settings["max_tries"], thresholds=thr,
                                     label_noise=settings["label_noise"], ties=settings["ties"])
        # a temporary name of this process's own: the ranks of a multi-process run each build the same cache entry
        tmp = files[name].with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.replace(files[name])
        stats.update({f"data/synthetic/{name}/{k}": v for k, v in st.items()})
        log.info("synthetic %s pairs (%s): %s", name, policy or "perturb", st)
    return stats
