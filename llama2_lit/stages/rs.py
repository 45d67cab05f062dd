"""stage=rs: rejection sampling (Llama 2 §3.2.3). Not gradient training, so not a LightningModule: a runner.

    python -m llama2_lit stage=rs data=rs_prompts model.path=<policy>/hf \\
        rs.reward_models.helpfulness=<rm run>/hf rs.reward_models.safety=<rm run>/hf

1. K samples per prompt from the policy (``llama2_lit.generation.engine``), in chunks of ``stage.batch_size`` prompts;
2. each scored by the reward models through the safety-gated reward
   ``R_c = R_s if IS_SAFETY(p) or R_s < 0.15 else R_h`` (scores on the sigmoid scale);
3. each chunk appended to the persistent sample bag (``rs.bag_dir``; atomic per chunk, resumable);
4. Fig. 7: mean over prompts of the max and the median reward among N = 1..K samples of this run
   (``rs_max_median.png``, ``rs_curves.json``, TensorBoard; ``rs/reward_max@N``, ``rs/reward_median@N`` for
   N in {1, K} in ``metrics.json``);
5. the best sample per prompt over ``rs.selection`` (``all_iterations``: every iteration up to ``rs.iteration``;
   ``previous_iteration``: this iteration only) written to ``selected.parquet`` for ``stage=rs_distill``.

``rs.scorer=gold`` scores with the synthetic world's gold functions instead of reward models: a stand-in
for experiments without trained RMs, labelled as such in ``selected.json``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from llama2_lit.errors import UserError
from llama2_lit.generation.engine import Engine, Sampling
from llama2_lit.models.tokenizers import tokenizer_fingerprint
from llama2_lit.scoring import GoldScorer, RMScorer, build_scorer, gated  # noqa: F401 (RMScorer: re-exported)
from llama2_lit.scoring import folder_fingerprint as _folder_fingerprint
from llama2_lit.stages.common import derived_seed, load_policy, setup_prompt_run
from llama2_lit.stages.rs_bag import (Bag, best_of_n_curves, max_median_figure, reward_table, select_best,
                                      selection_iterations)
from llama2_lit.world import oracle as world

log = logging.getLogger(__name__)
RESCORE = ("auto", "always", "never")


# ------------------------------------------------------------------------------------------------ the run


def run(cfg: DictConfig) -> dict[str, float]:
    """Sample, score, bag, plot and select (see the module docstring); returns the metrics of ``metrics.json``."""
    rs = cfg.rs
    it = int(rs.iteration)
    if it < 1:
        raise UserError(f"rs.iteration must be >= 1, got {it}")
    if rs.rescore not in RESCORE:
        raise UserError(f"rs.rescore: unknown '{rs.rescore}' (choose {list(RESCORE)})")
    selection_iterations([], it, rs.selection)  # validates rs.selection before any work
    sampling = Sampling(max_new_tokens=int(rs.max_new_tokens), temperature=float(rs.temperature),
                        top_p=float(rs.top_p), num_samples=int(rs.num_samples))
    k = sampling.num_samples

    setup = setup_prompt_run(cfg, rs, "rs")
    out, dm, prompts, tok = setup.out, setup.data, setup.prompts, setup.tokenizer
    model_cfg, policy_name = setup.model_cfg, setup.policy_name
    policy, _ = load_policy(model_cfg, tok, setup.device)  # model.dtype
    tok_fp = tokenizer_fingerprint(tok)
    scorer = build_scorer(rs, tok, setup.device)
    if isinstance(scorer, GoldScorer):
        log.warning("rs.scorer=gold: scoring with the world's gold functions, a stand-in for reward models")

    chunk_size = int(cfg.stage.batch_size)
    chunks = [prompts[i:i + chunk_size] for i in range(0, len(prompts), chunk_size)]
    settings = {"policy": _folder_fingerprint(model_cfg.get("path")), "model": model_cfg.get("config") or {},
                "tokenizer": tok_fp, "prompts": hashlib.sha1("".join(p.id for p in prompts).encode()).hexdigest(),
                "num_prompts": len(prompts), "num_samples": k, "temperature": sampling.temperature,
                "top_p": sampling.top_p, "max_new_tokens": sampling.max_new_tokens, "seed": int(rs.seed),
                "chunk_prompts": chunk_size, "scorer": scorer.fingerprint,
                "safety_threshold": float(rs.safety_threshold)}
    bag = Bag(rs.bag_dir)
    set_dir, done = bag.open_set(it, settings, len(chunks))
    if done:
        log.info("resuming %s: %d of %d chunks already in the bag", set_dir, len(done), len(chunks))
    engine = Engine(policy, tok, backend=rs.engine.backend, compile=bool(rs.engine.compile))
    perf = _sample_into_bag(bag, set_dir, done, chunks, engine, sampling, scorer, rs, it,
                            {"policy": policy_name, "tokenizer": tok_fp}, oracle=dm.oracle)
    bag.complete_set(set_dir)

    metrics: dict[str, float] = {"rs/iteration": float(it), "rs/num_samples": float(k),
                                 "rs/temperature": sampling.temperature, "rs/prompts": float(len(prompts))}
    metrics.update(dm.stats)
    metrics.update(_curves(cfg, bag.load(set_dirs=[set_dir]).to_dict(), k, sampling.temperature, it, scorer, out,
                           oracle=dm.oracle))
    sel_metrics, summary = _select(bag, it, rs, scorer, out)
    metrics.update(sel_metrics)
    summary.update(scorer=scorer.description, scorer_fingerprint=scorer.fingerprint, policy=policy_name,
                   tokenizer=tok_fp, sample_set=str(set_dir))
    (out / "selected.json").write_text(json.dumps(summary, indent=2) + "\n")

    metrics = {key: metrics[key] for key in sorted(metrics)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "perf.json").write_text(json.dumps(perf, indent=2, sort_keys=True) + "\n")
    log.info("metrics: %s", json.dumps(metrics))
    log.info("perf: %s", json.dumps(perf))
    log.info("outputs in %s", out)
    return metrics


def _sample_into_bag(bag: Bag, set_dir: Path, done: set[int], chunks, engine: Engine, sampling: Sampling, scorer,
                     rs: DictConfig, it: int, meta: dict[str, str], oracle: bool) -> dict[str, float]:
    """Sample, score and write every chunk not yet in the bag (one Parquet file per chunk); returns perf."""
    k = sampling.num_samples
    t_gen = t_score = 0.0
    n_tokens = 0
    for c, chunk in enumerate(chunks):
        if c in done:
            continue
        seed = derived_seed("rs", int(rs.seed), it, c)  # by chunk index: a resumed set equals an uninterrupted one
        t0 = time.perf_counter()
        roll = engine.generate([p.text for p in chunk], dataclasses.replace(sampling, seed=seed))
        texts = engine.decode(roll)
        t_gen += time.perf_counter() - t0
        n_tokens += roll.num_tokens
        rows_p = [chunk[int(i)] for i in roll.prompt_index]
        t0 = time.perf_counter()
        helpful, safety = scorer([p.text for p in rows_p], texts)
        reward = gated(helpful, safety, torch.tensor([p.is_safety for p in rows_p]), float(rs.safety_threshold))
        t_score += time.perf_counter() - t0
        lp = roll.logprobs.sum(1).double().cpu()
        n_tok = roll.response_mask.sum(1).cpu()
        rows = [{
            "prompt_id": p.id, "prompt": p.text, "is_safety": p.is_safety, "sample_index": n % k, "response": text,
            "num_tokens": int(n_tok[n]), "finished": bool(roll.finished[n]), "logprob": float(lp[n]),
            "iteration": it, "policy": meta["policy"], "tokenizer": meta["tokenizer"],
            "temperature": sampling.temperature, "top_p": sampling.top_p, "seed": seed, "scorer": scorer.fingerprint,
            "score_helpful": float(helpful[n]), "score_safety": float(safety[n]), "reward": float(reward[n]),
            "gold_helpfulness": world.gold_helpfulness(p.text, text) if oracle else math.nan,
            "gold_safety": world.gold_safety(p.text, text) if oracle else math.nan,
        } for n, (p, text) in enumerate(zip(rows_p, texts))]
        bag.write_chunk(set_dir, c, rows)
        log.info("iteration %d chunk %d/%d: %d samples, mean reward %.4f", it, c + 1, len(chunks), len(rows),
                 float(reward.mean()))
    return {"perf/gen_seconds": t_gen, "perf/score_seconds": t_score, "perf/gen_tokens": float(n_tokens),
            "perf/gen_tokens_per_s": n_tokens / t_gen if t_gen else 0.0}


def _curves(cfg: DictConfig, current: dict[str, list], k: int, temperature: float, it: int, scorer, out: Path,
            oracle: bool) -> dict[str, float]:
    """Fig. 7 on this run's samples: rs_curves.json, rs_max_median.png, TensorBoard; the metrics for N in {1, K}."""
    table = reward_table(current["prompt_id"], current["sample_index"], current["reward"])
    mx, md = best_of_n_curves(table)
    metrics = {}
    for n in sorted({1, k}):
        metrics[f"rs/reward_max@{n}"] = float(mx[n - 1])
        metrics[f"rs/reward_median@{n}"] = float(md[n - 1])
    curves = {"N": list(range(1, k + 1)), "max": mx.tolist(), "median": md.tolist(), "temperature": temperature,
              "iteration": it, "scorer": scorer.fingerprint}
    if oracle:  # the true quality of the samples the reward picks (argmax: ties to the first sample)
        gold = reward_table(current["prompt_id"], current["sample_index"], current["gold_helpfulness"])
        metrics["rs/gold_helpfulness_mean"] = float(gold.mean())
        metrics[f"rs/gold_helpfulness_best_of@{k}"] = float(gold.gather(1, table.argmax(1, keepdim=True)).mean())
        gmx, gmd = best_of_n_curves(gold)
        curves.update(gold_helpfulness_max=gmx.tolist(), gold_helpfulness_median=gmd.tolist())
    (out / "rs_curves.json").write_text(json.dumps(curves, indent=2) + "\n")
    fig = max_median_figure({f"T={temperature:g}": (mx.tolist(), md.tolist())},
                            title=f"RS iteration {it}: reward among N samples\n({_scorer_label(scorer)})")
    fig.savefig(out / "rs_max_median.png", dpi=120)
    _log_tensorboard(cfg, mx, md, fig)
    return metrics


def _scorer_label(scorer) -> str:
    return "gold oracle stand-in" if isinstance(scorer, GoldScorer) else "reward models"


def _select(bag: Bag, it: int, rs: DictConfig, scorer, out: Path) -> tuple[dict[str, float], dict[str, Any]]:
    """Best sample per prompt over the selected iterations -> ``selected.parquet``; metrics and a summary."""
    import pyarrow.parquet as pq

    its = selection_iterations(bag.iterations(), it, rs.selection)
    pool = bag.load(its)
    cols = pool.select_columns(["prompt_id", "prompt", "is_safety", "response", "iteration", "sample_index",
                                "scorer", "reward", "score_helpful"]).to_dict()
    reward, helpful = list(cols["reward"]), list(cols["score_helpful"])
    stale = [i for i, s in enumerate(cols["scorer"]) if s != scorer.fingerprint]
    rescored = 0
    if stale and rs.rescore != "never":
        # samples scored by another scorer (an earlier iteration's RMs): rescore them so rewards compare
        h, s = scorer([cols["prompt"][i] for i in stale], [cols["response"][i] for i in stale])
        r = gated(h, s, torch.tensor([cols["is_safety"][i] for i in stale]), float(rs.safety_threshold))
        for j, i in enumerate(stale):
            reward[i], helpful[i] = float(r[j]), float(h[j])
        rescored = len(stale)
    elif stale:
        log.warning("%d samples in the pool were scored by another scorer; rs.rescore=never keeps their rewards",
                    len(stale))
    keep = [i for i, t in enumerate(cols["response"]) if t.strip()]  # an empty answer cannot be fine-tuned on
    empty = len(reward) - len(keep)
    best = select_best([cols["prompt_id"][i] for i in keep], [reward[i] for i in keep],
                       [cols["iteration"][i] for i in keep], [cols["sample_index"][i] for i in keep],
                       tiebreak=[helpful[i] for i in keep])
    rows = [keep[j] for j in best]
    chosen = pool.select(rows).flatten_indices()
    if rescored:
        chosen = chosen.remove_columns(["reward", "score_helpful"]).add_column(
            "reward", [reward[i] for i in rows]).add_column("score_helpful", [helpful[i] for i in rows])
    tmp = out / ".selected.parquet.tmp"
    pq.write_table(chosen.data.table, tmp)
    tmp.replace(out / "selected.parquet")
    chosen_cols = chosen.select_columns(["iteration", "reward", "gold_helpfulness"]).to_dict()
    counts: dict[int, int] = {}
    for i in chosen_cols["iteration"]:
        counts[i] = counts.get(i, 0) + 1
    pool_counts: dict[int, int] = {}
    for i in (cols["iteration"][j] for j in keep):
        pool_counts[i] = pool_counts.get(i, 0) + 1
    m = {"rs/selected": float(len(rows)), "rs/pool_samples": float(len(keep)), "rs/pool_iterations": float(len(its)),
         "rs/pool_empty_dropped": float(empty), "rs/rescored": float(rescored),
         "rs/selected_reward_mean": sum(chosen_cols["reward"]) / max(1, len(rows))}
    for i in its:
        m[f"rs/selected_from_iteration_{i}"] = float(counts.get(i, 0))
        m[f"rs/pool_from_iteration_{i}"] = float(pool_counts.get(i, 0))
    gold = [g for g in chosen_cols["gold_helpfulness"] if not math.isnan(g)]
    if gold and len(gold) == len(rows):
        m["rs/selected_gold_helpfulness_mean"] = sum(gold) / len(gold)
    log.info("selection=%s over iterations %s: %d prompts, best samples per iteration %s", rs.selection, its,
             len(rows), counts)
    summary = {"selection": rs.selection, "iteration": it, "iterations": its, "selected": len(rows),
               "selected_per_iteration": {str(k): v for k, v in sorted(counts.items())},
               "pool_per_iteration": {str(k): v for k, v in sorted(pool_counts.items())},
               "rescored": rescored, "empty_dropped": empty}
    return m, summary


def _log_tensorboard(cfg: DictConfig, mx: torch.Tensor, md: torch.Tensor, fig) -> None:
    for node in (cfg.get("logger") or {}).values():
        if node is None:
            continue
        logger = instantiate(node)
        for n in range(1, len(mx) + 1):
            logger.log_metrics({"rs/reward_max": float(mx[n - 1]), "rs/reward_median": float(md[n - 1])}, step=n)
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_figure"):
            experiment.add_figure("rs/max_median", fig, global_step=0, close=False)
        logger.finalize("success")


def temperature_sweep_figure(sweep_dir: str | Path) -> Path:
    """Fig. 8 from a ``-m rs.temperature=...`` sweep: every run's max/median curve on one plot.

    Reads ``<sweep_dir>/*/rs_curves.json``, writes ``<sweep_dir>/rs_temperature_sweep.png`` and prints
    max@1 / max@K / median@K per temperature.
    """
    sweep_dir = Path(sweep_dir)
    runs = sorted((json.loads(p.read_text()) for p in sweep_dir.glob("*/rs_curves.json")),
                  key=lambda c: c["temperature"])
    if not runs:
        raise UserError(f"{sweep_dir}: no */rs_curves.json (run a stage=rs sweep into it first)")
    curves = {f"T={c['temperature']:g}": (c["max"], c["median"]) for c in runs}
    fig = max_median_figure(curves, title="Reward among N samples per temperature (Fig. 8)")
    out = sweep_dir / "rs_temperature_sweep.png"
    fig.savefig(out, dpi=120)
    k = len(runs[0]["N"])
    print(f"{'T':>5s} {'max@1':>8s} {'max@' + str(k):>8s} {'median@' + str(k):>10s}")
    for c in runs:
        print(f"{c['temperature']:5g} {c['max'][0]:8.4f} {c['max'][-1]:8.4f} {c['median'][-1]:10.4f}")
    return out


if __name__ == "__main__":  # python -m llama2_lit.stages.rs fig8 outputs/multirun/<rs temperature sweep>
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "fig8":
        sys.exit("usage: python -m llama2_lit.stages.rs fig8 <sweep dir>")
    print(f"wrote {temperature_sweep_figure(sys.argv[2])}")
