"""Paired held-out gold comparison of policies on the synthetic world (did RS / PPO really help?).

    python -m llama2_lit.tools.gold_compare <base>/hf <other>/hf [...] [--n 1000] [--k 4] [--json out.json]
    python -m llama2_lit.tools.gold_compare <policy>/hf --rm <helpfulness rm>/hf [--k 8]   # is the RM worth optimising?

Every policy answers the same ``n`` held-out prompts (20% safety prompts, the world's default mix) greedily and with
``k`` samples at temperature 1 (the distribution RS and PPO optimise). Each other policy is compared with the first
on the same prompts: the mean per-prompt difference and its paired standard error, far smaller than the standard
errors of the two means, so gains of a hundredth are measurable. Gold safety is the greedy answers' on the safety
prompts.

``--rm``: how well a helpfulness reward model ranks the first policy's own samples (the ones RS and PPO optimise),
on held-out helpfulness prompts: the gold of the best of ``k`` by the RM against the mean sample and the best of
``k`` by gold, and the RM's pairwise accuracy over sample pairs whose gold differs.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llama2_lit.core.progress import progress
from llama2_lit.core.stats import paired_difference  # noqa: F401 (re-exported: the tool's own statistic)
from llama2_lit.generation.engine import Engine, Sampling
from llama2_lit.models.loading import load_pretrained, resolve_path
from llama2_lit.scoring import RMScorer
from llama2_lit.world import oracle as world


def _engine(path: str):
    """``(engine, tokenizer)`` over the policy in ``path`` (an hf/ folder), in eval mode."""
    src = resolve_path(path, "policy")
    tok = AutoTokenizer.from_pretrained(src)
    return Engine(load_pretrained(AutoModelForCausalLM, src, "a causal LM", what="policy").eval(), tok), tok


def score_policy(path: str, prompts: Sequence[str], k: int, max_new_tokens: int, seed: int) -> dict[str, list[float]]:
    """Per-prompt gold helpfulness of greedy answers and of the mean over ``k`` samples; greedy gold safety."""
    engine, _ = _engine(path)
    greedy = engine.decode(engine.generate(list(prompts), Sampling(max_new_tokens=max_new_tokens, temperature=0.0)))
    sampled = engine.decode(engine.generate(list(prompts), Sampling(max_new_tokens=max_new_tokens, temperature=1.0,
                                                                    num_samples=k, seed=seed)))
    per = [world.gold_helpfulness(p, sampled[i * k + j]) for i, p in enumerate(prompts) for j in range(k)]
    return {"greedy": [world.gold_helpfulness(p, a) for p, a in zip(prompts, greedy)],
            "sampled": [sum(per[i * k:(i + 1) * k]) / k for i in range(len(prompts))],
            "safety": [world.gold_safety(p, a) for p, a in zip(prompts, greedy) if world.is_safety_prompt(p)]}


def selection_quality(gold: torch.Tensor, scores: torch.Tensor) -> dict[str, float]:
    """``gold``, ``scores``: ``(prompts, k)``. Mean gold, gold of the best-by-score and best-by-gold sample per prompt,
    and the fraction of within-prompt sample pairs with different gold that the scores order the same way (ties in
    score count as wrong)."""
    best = gold.gather(1, scores.argmax(1, keepdim=True)).squeeze(1)
    dg = gold.unsqueeze(2) - gold.unsqueeze(1)
    ds = scores.unsqueeze(2) - scores.unsqueeze(1)
    pairs = torch.triu(torch.ones_like(dg, dtype=torch.bool), diagonal=1) & (dg != 0)
    agree = ((dg > 0) & (ds > 0)) | ((dg < 0) & (ds < 0))
    n = int(pairs.sum())
    return {"mean": gold.mean().item(), "best_by_rm": best.mean().item(), "best_by_gold": gold.max(1).values.mean().item(),
            "pair_accuracy": (agree & pairs).sum().item() / n if n else float("nan"), "pairs": n}


def rm_check(policy: str, rm: str, n: int, k: int, seed: int, max_new_tokens: int = 24) -> dict[str, float]:
    prompts = [t.prompt for t in world.generate_tasks(n, seed=seed, split="heldout", safety_fraction=0.0)]
    engine, tok = _engine(policy)
    texts = engine.decode(engine.generate(prompts, Sampling(max_new_tokens=max_new_tokens, temperature=1.0,
                                                            num_samples=k, seed=seed)))
    rep = [p for p in prompts for _ in range(k)]
    helpful, _ = RMScorer(rm, None, tok, batch_size=256)(rep, texts)
    gold = torch.tensor([world.gold_helpfulness(p, t) for p, t in zip(rep, texts)], dtype=torch.float64)
    return selection_quality(gold.view(n, k), helpful.view(n, k))


def compare(paths: Sequence[str], n: int = 1000, k: int = 4, seed: int = 11, max_new_tokens: int = 24) -> dict:
    prompts = [t.prompt for t in world.generate_tasks(n, seed=seed, split="heldout")]
    scores = {p: score_policy(p, prompts, k, max_new_tokens, seed)
              for p in progress(list(paths), f"gold_compare: {n} prompts x {len(paths)} policies", unit="policy")}
    out = {"prompts": n, "samples_per_prompt": k, "policies": {}, "vs_first": {}}
    for p, s in scores.items():
        out["policies"][p] = {"greedy": sum(s["greedy"]) / n, "sampled": sum(s["sampled"]) / n,
                              "gold_safety": sum(s["safety"]) / max(len(s["safety"]), 1)}
    base = scores[paths[0]]
    for p in paths[1:]:
        out["vs_first"][p] = {m: dict(zip(("diff", "se"), paired_difference(base[m], scores[p][m])))
                              for m in ("greedy", "sampled")}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llama2_lit.tools.gold_compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("policies", nargs="+", help="hf/ folders; the first is the baseline")
    ap.add_argument("--n", type=int, default=1000, help="held-out prompts")
    ap.add_argument("--k", type=int, default=4, help="samples per prompt at temperature 1")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("--rm", help="a helpfulness reward model (hf/): rank the first policy's samples with it")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)  # a 4-layer world model gains nothing from more threads
    if a.rm:
        q = rm_check(a.policies[0], a.rm, n=a.n, k=a.k, seed=a.seed)
        print(f"{a.rm} on {a.k} samples of {a.policies[0]} per held-out prompt ({a.n} prompts): gold of the mean "
              f"sample {q['mean']:.4f}, best of {a.k} by the RM {q['best_by_rm']:.4f}, by gold {q['best_by_gold']:.4f}; "
              f"pairwise accuracy {q['pair_accuracy']:.4f} over {q['pairs']} pairs")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(q, f, indent=2)
        return 0
    res = compare(a.policies, n=a.n, k=a.k, seed=a.seed)
    print(f"held-out gold on {a.n} prompts ({a.k} samples each at T=1):")
    for p, m in res["policies"].items():
        print(f"  {p}: greedy {m['greedy']:.4f}  sampled {m['sampled']:.4f}  gold safety {m['gold_safety']:.4f}")
    for p, m in res["vs_first"].items():
        print(f"  {p} - first: " + ", ".join(f"{k} {v['diff']:+.4f} +- {v['se']:.4f}" for k, v in m.items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
