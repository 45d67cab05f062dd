"""stage=rs: rejection sampling (Llama 2 §3.2.3). Not gradient training, so not a LightningModule: a runner.

    python -m llama2_lit stage=rs data=rs_prompts model.path=<policy>/hf \\
        rs.reward_models.helpfulness=<rm run>/hf rs.reward_models.safety=<rm run>/hf
    python -m llama2_lit stage=rs rs.temperature_sweep.candidates=[0.8,1.0,1.2,1.4]   (T picked per run, Fig. 8)

0. with ``rs.temperature_sweep.candidates`` set, the temperature is picked first (``rs.temperature`` is ignored):
   see :func:`_temperature_sweep` and "Temperature sweep" below;
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

Temperature sweep (Llama 2 Fig. 8: "the optimal temperature is not constant during the iterative model updates"):
with ``rs.temperature_sweep.candidates=[...]``, before sampling, each candidate temperature samples
``rs.temperature_sweep.num_samples`` (default ``rs.num_samples``) answers to each of ``rs.temperature_sweep.prompts``
held-out prompts with the same engine and scorer; the candidate with the highest mean max@K is used for the run
(ties: the lowest temperature; :func:`llama2_lit.stages.rs_bag.pick_temperature`). Every candidate uses the same
sampling seeds (common random numbers: the candidates differ by temperature only). The sweep's samples are not
bagged. ``<run dir>/temperature_sweep.json`` keeps the curves and the choice (a rerun into the same run directory
with the same settings reuses it), ``rs_temperature_sweep.png`` draws them, and ``metrics.json`` has
``rs/temperature_sweep/{max,median}@K/T=<t>``, ``rs/temperature_sweep/prompts`` and ``rs/temperature_sweep/seconds``
(the sweep's sampling and scoring time when it ran; a reused sweep reports the recorded time). The sweep prompts
(:func:`sweep_prompts`) are

* on the synthetic world: prompts of the world's held-out split (RS samples the train split), seeded by ``rs.seed``
  and ``rs.iteration`` (a fresh draw per iteration), deduplicated (so possibly a few fewer than asked);
* from a prompt file: a seeded subset of ``data.val_path``'s prompts when it is set, else (a limitation, said in the
  log) a seeded subset of ``data.path``'s prompts, i.e. of the prompts RS then samples from: not held out, so the
  choice can fit those prompts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig

from data_modules.annotations import prompt_id
from data_modules.prompts import Prompt, PromptDataModule
from llama2_lit.core.progress import progress
from llama2_lit.errors import UserError
from llama2_lit.generation.engine import Engine, Sampling
from llama2_lit.models.tokenizers import tokenizer_fingerprint
from llama2_lit.scoring import GoldScorer, RMScorer, build_scorer, gated  # noqa: F401 (RMScorer: re-exported)
from llama2_lit.scoring import folder_fingerprint as _folder_fingerprint
from llama2_lit.stages.loggers import instantiate_loggers
from llama2_lit.stages.common import derived_seed, load_policy, setup_prompt_run
from llama2_lit.stages.rs_bag import (Bag, _atomic_write_text, best_of_n_curves, max_median_figure, pick_temperature,
                                      reward_table, select_best, selection_iterations, settings_key)
from llama2_lit.world import oracle as world

log = logging.getLogger(__name__)
RESCORE = ("auto", "always", "never")
SWEEP_FILE = "temperature_sweep.json"


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
    sweep = sweep_options(rs)  # validates rs.temperature_sweep before any work
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
    engine = Engine(policy, tok, backend=rs.engine.backend, compile=bool(rs.engine.compile))
    sweep_metrics: dict[str, float] = {}
    if sweep is not None:
        log.info("rs.temperature_sweep.candidates=%s: rs.temperature=%g is ignored, the sweep picks the temperature",
                 sweep["candidates"], sampling.temperature)
        info = _temperature_sweep(out, sweep, dm, engine, sampling, scorer, rs, it, chunk_size,
                                  {"policy": _folder_fingerprint(model_cfg.get("path")),
                                   "model": model_cfg.get("config") or {}, "tokenizer": tok_fp})
        sampling = dataclasses.replace(sampling, temperature=float(info["chosen_temperature"]))
        sweep_metrics = _sweep_metrics(info)
        fig = _sweep_figure(info, it, scorer)
        fig.savefig(out / "rs_temperature_sweep.png", dpi=120)
        import matplotlib.pyplot as plt

        plt.close(fig)
        log.info("temperature sweep: sampling at T=%g", sampling.temperature)
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
    perf = _sample_into_bag(bag, set_dir, done, chunks, engine, sampling, scorer, rs, it,
                            {"policy": policy_name, "tokenizer": tok_fp}, oracle=dm.oracle)
    bag.complete_set(set_dir)

    metrics: dict[str, float] = {"rs/iteration": float(it), "rs/num_samples": float(k),
                                 "rs/temperature": sampling.temperature, "rs/prompts": float(len(prompts))}
    metrics.update(dm.stats)
    metrics.update(sweep_metrics)
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
    todo = [(c, chunk) for c, chunk in enumerate(chunks) if c not in done]
    for c, chunk in progress(todo, f"rs iteration {it}: {len(todo)} chunks of {len(chunks)}", unit="chunk"):
        seed = derived_seed("rs", int(rs.seed), it, c)  # by chunk index: a resumed set equals an uninterrupted one
        sc = _generate_scored(engine, chunk, dataclasses.replace(sampling, seed=seed), scorer,
                              float(rs.safety_threshold))
        roll, texts, rows_p, helpful, safety, reward = sc.roll, sc.texts, sc.prompts, sc.helpful, sc.safety, sc.reward
        t_gen += sc.gen_seconds
        t_score += sc.score_seconds
        n_tokens += roll.num_tokens
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


@dataclasses.dataclass
class _Scored:
    """One engine call's samples (rows ``prompts[i]``, prompt-major, K per prompt) and their scores."""

    roll: Any
    texts: list[str]
    prompts: list[Prompt]
    helpful: torch.Tensor
    safety: torch.Tensor
    reward: torch.Tensor      # safety-gated R_c
    gen_seconds: float
    score_seconds: float


def _generate_scored(engine: Engine, chunk: list[Prompt], sampling: Sampling, scorer, threshold: float) -> _Scored:
    """K samples per prompt of ``chunk`` (``sampling``, seed included), scored and gated."""
    t0 = time.perf_counter()
    roll = engine.generate([p.text for p in chunk], sampling)
    texts = engine.decode(roll)
    t_gen = time.perf_counter() - t0
    rows_p = [chunk[int(i)] for i in roll.prompt_index]
    t0 = time.perf_counter()
    helpful, safety = scorer([p.text for p in rows_p], texts)
    reward = gated(helpful, safety, torch.tensor([p.is_safety for p in rows_p]), threshold)
    return _Scored(roll, texts, rows_p, helpful, safety, reward, t_gen, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------ temperature sweep


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def sweep_options(rs: DictConfig) -> dict[str, Any] | None:
    """``rs.temperature_sweep`` validated: ``{"candidates": sorted temperatures, "prompts": n, "num_samples": K}``, or
    None when ``candidates`` is null (``rs.temperature`` is used as given)."""
    sw = rs.get("temperature_sweep")
    if sw is None or sw.get("candidates") is None:
        return None
    cands = sw.candidates
    key = "rs.temperature_sweep.candidates"
    if not isinstance(cands, (ListConfig, list, tuple)) or len(cands) == 0:
        raise UserError(f"{key} must be a non-empty list of temperatures > 0 (e.g. [0.8,1.0,1.2]), got {cands!r}")
    temps = []
    for c in cands:
        if not _is_number(c) or not math.isfinite(c) or c <= 0:
            raise UserError(f"{key}: {c!r} is not a temperature > 0 (a list of numbers, e.g. [0.8,1.0,1.2])")
        temps.append(float(c))
    if len(set(temps)) != len(temps):
        raise UserError(f"{key}: a temperature is listed twice in {temps}")
    n = sw.get("prompts")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise UserError(f"rs.temperature_sweep.prompts must be an integer >= 1, got {n!r}")
    k = sw.get("num_samples")
    if k is None:
        k = rs.num_samples
    elif not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise UserError(f"rs.temperature_sweep.num_samples must be an integer >= 1 or null (rs.num_samples), got {k!r}")
    return {"candidates": sorted(temps), "prompts": n, "num_samples": int(k)}


def sweep_prompts(dm: PromptDataModule, n: int, seed: int) -> tuple[list[Prompt], str]:
    """Up to ``n`` prompts for the temperature sweep and where they come from (for the log and the json).

    Synthetic world: ``n`` tasks of the world's held-out split (``generate_tasks(split="heldout", seed=seed)``, the
    data's safety fraction), deduplicated. A prompt file: a seeded subset (``random.Random(seed).sample``) of
    ``data.val_path``'s prompts when set, else of the file's own prompts, which RS then samples from (a limitation:
    they are not held out; logged as a warning).
    """
    if dm.oracle:
        if dm.split == "heldout":
            log.warning("data.split=heldout: the temperature sweep's held-out prompts come from the split RS samples")
        tasks = world.generate_tasks(n, seed=seed, split="heldout",
                                     safety_fraction=float(dm.synthetic["safety_fraction"]))
        unique = {prompt_id(t.prompt): Prompt(prompt_id(t.prompt), t.prompt, bool(t.is_safety)) for t in tasks}
        return list(unique.values()), f"synthetic world, held-out split (seed {seed})"
    if dm.val_path:
        pool = list({p.id: p for p in dm.val_prompts()}.values())
        source = f"data.val_path={dm.val_path}"
    else:
        pool = dm.prompts()
        source = f"data.path={dm.path} (not held out: RS samples the same prompts)"
        log.warning("temperature sweep: %d prompts drawn from data.path=%s itself, which RS then samples from (not "
                    "held out; set data.val_path=<held-out prompts> for a held-out sweep)", min(n, len(pool)), dm.path)
    picked = random.Random(seed).sample(pool, min(n, len(pool)))
    return picked, f"seeded subset of {source}"


def _temperature_sweep(out: Path, sweep: dict[str, Any], dm: PromptDataModule, engine: Engine, sampling: Sampling,
                       scorer, rs: DictConfig, it: int, chunk_size: int, policy: dict[str, Any]) -> dict[str, Any]:
    """Sample ``sweep["num_samples"]`` answers per sweep prompt at each candidate temperature, score them, pick the
    temperature by max@K; the content of ``<out>/temperature_sweep.json``, reused when its settings are this run's."""
    prompts, source = sweep_prompts(dm, sweep["prompts"], derived_seed("rs_temperature_sweep/prompts", int(rs.seed), it))
    k = sweep["num_samples"]
    settings = {**policy, "candidates": sweep["candidates"], "num_samples": k, "num_prompts": len(prompts),
                "prompts": hashlib.sha1("".join(p.id for p in prompts).encode()).hexdigest(), "prompt_source": source,
                "top_p": sampling.top_p, "max_new_tokens": sampling.max_new_tokens, "seed": int(rs.seed),
                "iteration": it, "chunk_prompts": chunk_size, "scorer": scorer.fingerprint,
                "safety_threshold": float(rs.safety_threshold)}
    key = settings_key(settings)
    path = out / SWEEP_FILE
    if path.is_file():
        try:
            info = json.loads(path.read_text())
        except json.JSONDecodeError:
            info = {}
        if info.get("key") == key:
            log.info("temperature sweep: reusing %s (T=%g chosen among %s)", path, info["chosen_temperature"],
                     info["candidates"])
            return info
        log.info("temperature sweep: %s was made with other settings: sampling the sweep again", path)
    log.info("temperature sweep: %d candidates x %d prompts (%s) x %d samples", len(sweep["candidates"]), len(prompts),
             source, k)
    chunks = [prompts[i:i + chunk_size] for i in range(0, len(prompts), chunk_size)]
    t0 = time.perf_counter()
    curves = []
    for temp in sweep["candidates"]:
        ids: list[str] = []
        idx: list[int] = []
        rewards: list[float] = []
        for c, chunk in enumerate(chunks):
            # the same seed for every candidate: the draws differ by temperature only
            seed = derived_seed("rs_temperature_sweep/sampling", int(rs.seed), it, c)
            sc = _generate_scored(engine, chunk, dataclasses.replace(sampling, temperature=temp, num_samples=k,
                                                                     seed=seed), scorer, float(rs.safety_threshold))
            ids += [p.id for p in sc.prompts]
            idx += [n % k for n in range(len(sc.prompts))]
            rewards += sc.reward.tolist()
        mx, md = best_of_n_curves(reward_table(ids, idx, rewards))
        curves.append({"temperature": temp, "max": mx.tolist(), "median": md.tolist()})
        log.info("temperature sweep: T=%g max@%d %.4f median@%d %.4f", temp, k, mx[-1], k, md[-1])
    chosen = pick_temperature({c["temperature"]: c["max"][-1] for c in curves})
    info = {"key": key, "settings": settings, "candidates": sweep["candidates"], "num_samples": k,
            "num_prompts": len(prompts), "prompt_source": source, "curves": curves, "chosen_temperature": chosen,
            "seconds": time.perf_counter() - t0}
    _atomic_write_text(path, json.dumps(info, indent=2) + "\n")
    log.info("temperature sweep: T=%g has the highest max@%d (%.1f s); written to %s", chosen, k, info["seconds"], path)
    return info


def _sweep_metrics(info: dict[str, Any]) -> dict[str, float]:
    k = int(info["num_samples"])
    m = {"rs/temperature_sweep/seconds": float(info["seconds"]),
         "rs/temperature_sweep/prompts": float(info["num_prompts"])}
    for c in info["curves"]:
        m[f"rs/temperature_sweep/max@{k}/T={c['temperature']:g}"] = float(c["max"][-1])
        m[f"rs/temperature_sweep/median@{k}/T={c['temperature']:g}"] = float(c["median"][-1])
    return m


def _sweep_figure(info: dict[str, Any], it: int, scorer):
    """Fig. 8 from the sweep: each candidate's max (solid) and median (dashed) reward among N = 1..K samples."""
    curves = {f"T={c['temperature']:g}" + (" (chosen)" if c["temperature"] == info["chosen_temperature"] else ""):
              (c["max"], c["median"]) for c in info["curves"]}
    return max_median_figure(curves, title=f"RS iteration {it}: temperature sweep on {info['num_prompts']} held-out "
                                           f"prompts (Fig. 8)\n({_scorer_label(scorer)})")


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
    for logger in instantiate_loggers(cfg):
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
