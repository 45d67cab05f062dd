"""The best-of-n over-optimisation probe (Gao, Schulman & Hilton 2022): where does optimising the RM stop helping?

    python -m llama2_lit.overopt <policy>/hf --rm <helpfulness rm>/hf [--n 64] [--prompts 200] [--out DIR]
                                 [--ppo <ppo run>/ppo_history.jsonl]

The policy samples ``n`` answers at temperature 1 to each of ``prompts`` held-out helpfulness prompts (the prompts
and the loading of ``gold_compare --rm``); each answer is scored by the RM (the proxy, on the sigmoid scale) and by
the world's gold oracle. For k = 1, 2, 4, ..., n the expected proxy and gold reward of the best of k by the proxy is
estimated without bias from the n samples (``core.overopt.best_of_k_expectation``), averaged over prompts with a
standard error over prompts, against KL_bon(k) = log k - (k-1)/k. Writes ``overopt.json`` and ``overopt.png``
into ``--out``. A proxy that keeps rising while gold flattens or falls is being over-optimised.

``--ppo``: also the PPO run's curve, one point per iteration from its ``ppo_history.jsonl`` (written by stage=ppo):
the mean RM helpfulness score (proxy, sigmoid scale) and gold helpfulness of that iteration's rollouts (training
prompts, one T=1 answer each; safety prompts included, as PPO optimises them) against sqrt(KL(pi || pi_0)), the
run's per-sequence KL estimate. ``stage=pipeline`` runs the probe after its last iteration.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from llama2_lit.core.overopt import best_of_k_expectation, kl_best_of_n
from llama2_lit.core.stats import mean_and_se
from llama2_lit.generation.engine import Sampling
from llama2_lit.scoring import RMScorer
from llama2_lit.tools.gold_compare import _engine
from llama2_lit.world import oracle as world


def ks_for(n: int) -> list[int]:
    """1, 2, 4, ... up to ``n``, and ``n`` itself when it is not a power of two."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks + ([n] if ks[-1] != n else [])


def sample_and_score(policy: str, rm: str, prompts: Sequence[str], n: int, seed: int,
                     max_new_tokens: int = 24) -> tuple[list[list[float]], list[list[float]]]:
    """``(proxy, gold)``, each ``[prompt][sample]``: ``n`` T=1 answers per prompt scored by the RM and the oracle."""
    engine, tok = _engine(policy)
    answers = engine.generate_text(list(prompts), Sampling(max_new_tokens=max_new_tokens, temperature=1.0,
                                                           num_samples=n, seed=seed), batch_size=max(1, 1024 // n))
    flat_prompts = [p for p, row in zip(prompts, answers) for _ in row]
    flat_answers = [a for row in answers for a in row]
    proxy, _ = RMScorer(rm, None, tok, batch_size=256)(flat_prompts, flat_answers)
    proxy = proxy.tolist()
    gold = [world.gold_helpfulness(p, a) for p, a in zip(flat_prompts, flat_answers)]
    rows = range(len(prompts))
    return [proxy[i * n:(i + 1) * n] for i in rows], [gold[i * n:(i + 1) * n] for i in rows]


def curves(proxy: Sequence[Sequence[float]], gold: Sequence[Sequence[float]], n: int) -> dict:
    """Per k: KL_bon(k) and the prompt-mean (with standard error) of best-of-k's expected proxy and gold."""
    out = {"k": [], "kl_bon": [], "proxy": [], "proxy_se": [], "gold": [], "gold_se": []}
    for k in ks_for(n):
        per = [best_of_k_expectation(p, g, k) for p, g in zip(proxy, gold)]
        out["k"].append(k)
        out["kl_bon"].append(kl_best_of_n(k))
        for i, name in enumerate(("proxy", "gold")):
            m, se = mean_and_se([x[i] for x in per])
            out[name].append(m)
            out[name + "_se"].append(se)
    return out


def ppo_curve(history: str | Path) -> dict:
    """Per PPO iteration: sqrt(KL), proxy and gold of the rollouts, from a ``ppo_history.jsonl``."""
    rows = [json.loads(line) for line in Path(history).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "ppo/gold_helpfulness" in r]
    if not rows:
        raise SystemExit(f"{history}: no iteration with ppo/gold_helpfulness (not synthetic-world prompts?)")
    return {"history": str(history), "iteration": [int(r["ppo/iteration"]) for r in rows],
            "kl": [float(r["ppo/kl"]) for r in rows],
            "sqrt_kl": [max(float(r["ppo/kl"]), 0.0) ** 0.5 for r in rows],
            "proxy": [float(r["ppo/helpfulness_score"]) for r in rows],
            "gold": [float(r["ppo/gold_helpfulness"]) for r in rows]}


def plot(res: dict, path: Path) -> None:
    """Gold and proxy against KL_bon, error bars of one standard error; the proxy on its own axis when the two
    curves' ranges do not overlap. With a PPO curve, a second panel: gold and proxy (own axes) against sqrt(KL)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ppo = res.get("ppo")
    fig, axes = plt.subplots(1, 2 if ppo else 1, figsize=(12.4 if ppo else 6.4, 4.2), squeeze=False)
    ax = axes[0][0]
    ax.errorbar(res["kl_bon"], res["gold"], yerr=res["gold_se"], marker="o", color="tab:blue", label="gold")
    twin = max(res["gold"]) < min(res["proxy"]) or max(res["proxy"]) < min(res["gold"])
    pax = ax.twinx() if twin else ax
    pax.errorbar(res["kl_bon"], res["proxy"], yerr=res["proxy_se"], marker="s", color="tab:orange",
                 label="proxy (RM)")
    for x, y, k in zip(res["kl_bon"], res["gold"], res["k"]):
        ax.annotate(str(k), (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.set_xlabel("KL_bon = log k - (k-1)/k (nats); points labelled by k")
    ax.set_ylabel("gold helpfulness" if twin else "reward")
    if twin:
        pax.set_ylabel("proxy (RM, sigmoid)", color="tab:orange")
    handles = ax.get_legend_handles_labels()[0] + (pax.get_legend_handles_labels()[0] if twin else [])
    ax.legend(handles=handles, loc="best")
    ax.set_title(f"best-of-k by the RM, {res['prompts']} held-out prompts, n={res['n']}")
    if ppo:
        bx = axes[0][1]  # one point per iteration (the KL estimate is noisy: no line), later iterations darker
        shade = [0.25 + 0.75 * i / max(1, len(ppo["iteration"]) - 1) for i in range(len(ppo["iteration"]))]
        bx.scatter(ppo["sqrt_kl"], ppo["gold"], c=shade, cmap="Blues", vmin=0, vmax=1, marker="o", s=18, label="gold")
        qx = bx.twinx()
        qx.scatter(ppo["sqrt_kl"], ppo["proxy"], c=shade, cmap="Oranges", vmin=0, vmax=1, marker="s", s=18,
                   label="proxy (RM)")
        bx.set_xlabel("sqrt(KL(pi || pi_0)) of the rollouts (sqrt nats)")
        bx.set_ylabel("gold helpfulness of the rollouts", color="tab:blue")
        qx.set_ylabel("proxy (RM, sigmoid)", color="tab:orange")
        bx.set_title(f"PPO rollouts, one point per iteration ({len(ppo['iteration'])}; later = darker)")
        bx.legend(handles=bx.get_legend_handles_labels()[0] + qx.get_legend_handles_labels()[0], loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def probe(policy: str, rm: str, n: int = 64, prompts: int = 200, seed: int = 11, out: str | Path = ".",
          ppo_history: str | Path | None = None) -> dict:
    ppo = ppo_curve(ppo_history) if ppo_history else None  # a bad file fails before the sampling
    tasks = [t.prompt for t in world.generate_tasks(prompts, seed=seed, split="heldout", safety_fraction=0.0)]
    proxy, gold = sample_and_score(policy, rm, tasks, n, seed)
    res = {"policy": policy, "rm": rm, "prompts": prompts, "n": n, "seed": seed, **curves(proxy, gold, n)}
    if ppo:
        res["ppo"] = ppo
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overopt.json").write_text(json.dumps(res, indent=2) + "\n")
    plot(res, out / "overopt.png")
    return res


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llama2_lit.overopt", description=__doc__.split("\n\n")[0])
    ap.add_argument("policy", help="the policy's hf/ folder")
    ap.add_argument("--rm", required=True, help="a helpfulness reward model (hf/): the proxy")
    ap.add_argument("--n", type=int, default=64, help="samples per prompt at temperature 1 (the largest k)")
    ap.add_argument("--prompts", type=int, default=200, help="held-out helpfulness prompts")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--out", default=".", help="folder for overopt.json and overopt.png")
    ap.add_argument("--ppo", help="a PPO run's ppo_history.jsonl: also its proxy and gold against sqrt(KL)")
    a = ap.parse_args(argv)
    if a.n < 1 or a.prompts < 1:
        ap.error("--n and --prompts must be >= 1")
    if a.ppo and not Path(a.ppo).is_file():
        ap.error(f"--ppo: {a.ppo} does not exist")
    torch.set_num_threads(1)  # a 4-layer world model gains nothing from more threads
    res = probe(a.policy, a.rm, n=a.n, prompts=a.prompts, seed=a.seed, out=a.out, ppo_history=a.ppo)
    print(f"best-of-k by {a.rm} on {a.policy}, {a.prompts} held-out prompts, n={a.n}:")
    for i, k in enumerate(res["k"]):
        print(f"  k={k:<3} KL_bon {res['kl_bon'][i]:.3f}  gold {res['gold'][i]:.4f} +- {res['gold_se'][i]:.4f}  "
              f"proxy {res['proxy'][i]:.4f} +- {res['proxy_se'][i]:.4f}")
    if "ppo" in res:
        c = res["ppo"]
        print(f"PPO ({a.ppo}), first -> last iteration: sqrt(KL) {c['sqrt_kl'][0]:.3f} -> {c['sqrt_kl'][-1]:.3f}, "
              f"gold {c['gold'][0]:.4f} -> {c['gold'][-1]:.4f}, proxy {c['proxy'][0]:.4f} -> {c['proxy'][-1]:.4f}")
    print(f"wrote {Path(a.out) / 'overopt.json'} and {Path(a.out) / 'overopt.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
