"""stage=collect: human-preference data collection (Llama 2 §3.2.1). Not gradient training: a runner.

    python -m llama2_lit stage=collect model.path=<latest policy>/hf [collect.annotator=simulated|none]

1. For every prompt (``data=rs_prompts``: world prompts, or ``data.path=<file with prompt / is_safety>``), one
   response from each of two sources (``collect.sources``): the paper samples "from two different model
   variants, and varying the temperature hyper-parameter"; a source is a model (null: the policy ``model.path``)
   and a temperature. Generation runs through the engine (``llama2_lit.generation.engine``), in chunks of
   ``collect.batch_size`` prompts, each draw seeded by (``collect.seed``, try, source, chunk).
2. A pair whose responses are identical or empty carries no preference: both are drawn again, up to
   ``collect.max_tries`` draws in all, then the prompt is counted as ``unpaired`` and left out.
3. ``annotations.jsonl``: one row per pair, the sides shown in a random order (seeded by the prompt) so that
   position does not reveal the source, with ``choice`` / ``rating`` / ``safety_label`` empty for annotators
   (schema: ``data_modules/annotations.py``).
4. ``collect.annotator=simulated`` (world prompts only): the simulated annotator fills them from the gold scores
   (``annotated.jsonl``), which is then ingested exactly as a human-annotated file would be
   (``python -m data_modules.annotations ingest``) into ``pairs.jsonl`` for ``stage=rm data=pairs
   data.path=<run>/pairs.jsonl``. Ties (equal gold scores) are left unannotated and counted with
   ``collect.ties=drop`` (no preference to learn); ``keep`` labels them negligibly_better with a random choice.
5. ``metrics.json`` (counts, rating and safety-label histograms, mean gold scores of each source), ``collect.json``
   (a summary: files, sources, counts, the next command), ``perf.json`` (generation time).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from data_modules.annotations import SIMULATED_OUTCOMES, ingest, new_row, simulate_row, write_jsonl
from data_modules.preferences import RATINGS
from data_modules.synthetic_pairs import draw_pairs
from llama2_lit.errors import UserError
from llama2_lit.generation.engine import Engine, Sampling
from llama2_lit.models.loading import load_causal_lm
from llama2_lit.models.tokenizers import folder_tokenizer
from llama2_lit.stages.common import derived_seed, load_policy, setup_prompt_run
from llama2_lit.world import oracle as world

log = logging.getLogger(__name__)
ANNOTATORS = ("simulated", "none")
TIES = ("drop", "keep")
_SOURCE_KEYS = {"name", "model", "temperature"}


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one response of each pair comes from: a model (None: the policy, ``model.path``) at a temperature."""

    name: str
    model: str | None
    temperature: float


def parse_sources(raw: Any) -> list[Source]:
    """``collect.sources`` as two :class:`Source` (names default to ``<policy|model folder>@T<temperature>``)."""
    if raw is None or isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence) or len(raw) != 2:
        raise UserError(f"collect.sources must list two sources ({{model, temperature, name}}), got {raw!r}")
    out = []
    for i, s in enumerate(raw):
        if not isinstance(s, Mapping):
            raise UserError(f"collect.sources[{i}] must be a mapping {{model, temperature, name}}, got {s!r}")
        unknown = set(s) - _SOURCE_KEYS
        if unknown:
            raise UserError(f"collect.sources[{i}]: unknown key(s) {sorted(unknown)} (expected {sorted(_SOURCE_KEYS)})")
        t = s.get("temperature")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0:
            raise UserError(f"collect.sources[{i}].temperature must be a number >= 0 (0 = greedy), got {t!r}")
        model = s.get("model")
        if model is not None and (not isinstance(model, str) or not model.strip()):
            raise UserError(f"collect.sources[{i}].model must be null (the policy) or a model folder, got {model!r}")
        if model is not None and not Path(model).expanduser().exists():
            raise UserError(f"collect.sources[{i}].model: '{model}' does not exist (a causal LM folder, e.g. a "
                            f"stage=sft run's hf/; null: the policy model.path)")
        name = s.get("name") or f"{'policy' if model is None else Path(model).name}@T{float(t):g}"
        out.append(Source(str(name), model, float(t)))
    if (out[0].model, out[0].temperature) == (out[1].model, out[1].temperature):
        raise UserError("collect.sources: the two sources are the same model at the same temperature; the paper "
                        "draws the two responses from different model variants and/or temperatures")
    if out[0].name == out[1].name:
        raise UserError(f"collect.sources: both sources are named '{out[0].name}': give them distinct names")
    return out


def collect_pairs(prompts: Sequence, sample: Callable[[Sequence, int], list[tuple[str, str]]], *, max_tries: int,
                  seed: int, sources: Sequence[Source]) -> tuple[list[dict], dict[str, Any]]:
    """Annotation rows for ``prompts`` (objects with ``id``, ``text``, ``is_safety``) and counts.

    ``sample(prompts, attempt) -> [(response of source 0, response of source 1)]``. Prompts whose two responses
    are identical or empty are drawn again (both sources), at most ``max_tries`` draws in all, then ``unpaired``.
    Sides: ``random.Random(f"collect-sides|{seed}|{prompt id}")`` decides whether source 0 is shown as ``a``.
    Also returns ``first``: the first draw of every prompt (for the sources' gold means).
    """
    got: dict[int, tuple[str, str]] = {}
    draws = draw_pairs(prompts, sample, lambda i, a, b: got.__setitem__(i, (a, b)), max_tries=max_tries)
    rows = []
    for i in sorted(got):
        p, (r0, r1) = prompts[i], got[i]
        if random.Random(f"collect-sides|{seed}|{p.id}").random() < 0.5:
            rows.append(new_row(p.text, p.is_safety, r0, r1, sources[0].name, sources[1].name))
        else:
            rows.append(new_row(p.text, p.is_safety, r1, r0, sources[1].name, sources[0].name))
    stats = {"prompts": len(prompts), "pairs": len(rows), "unpaired": len(draws.unpaired),
             "unpaired_safety": sum(bool(prompts[i].is_safety) for i in draws.unpaired),
             "resampled_prompts": len(draws.resampled), "draws_identical": draws.identical,
             "draws_empty": draws.empty, "first": draws.first}
    return rows, stats


def policy_pair_sampler(policy: str, tokenizer, *, temperatures: Sequence[float], top_p: float = 1.0,
                        max_new_tokens: int = 24, batch_size: int = 64):
    """``sample(prompts, rng) -> [(a, b)]`` over the causal LM folder ``policy`` (float32, SDPA; its own tokenizer if
    it saved one, else ``tokenizer``): two answers per prompt, each at a temperature drawn by ``rng`` from
    ``temperatures`` (0 = greedy), generated per temperature in chunks of ``batch_size`` prompts, each chunk seeded
    from the global torch RNG. What ``data=synthetic_pairs`` injects as ``data.synthetic.policy_sampler``."""
    tok = folder_tokenizer(policy, tokenizer)
    model = load_causal_lm({"path": policy, "dtype": "float32", "attn_implementation": "sdpa"}, tok).eval()
    engine = Engine(model, tok)
    temperatures = list(temperatures)

    def sample(prompts: Sequence[str], rng: random.Random) -> list[tuple[str, str]]:
        temps = [(rng.choice(temperatures), rng.choice(temperatures)) for _ in prompts]
        out: list[list[str]] = [["", ""] for _ in prompts]
        for t in sorted(set(float(x) for x in temperatures)):
            reqs = [(i, s) for i in range(len(prompts)) for s in (0, 1) if float(temps[i][s]) == t]
            if not reqs:
                continue
            sampling = Sampling(max_new_tokens=max_new_tokens, temperature=t, top_p=top_p if t > 0 else 1.0)
            for (i, s), g in zip(reqs, engine.generate_text([prompts[i] for i, _ in reqs], sampling, batch_size,
                                                            desc=f"sampling pairs at T={t:g}")):
                out[i][s] = g[0]
        return [(a, b) for a, b in out]

    return sample


# ------------------------------------------------------------------------------------------------ the run


def run(cfg: DictConfig) -> dict[str, float]:
    """Sample pairs, write the annotation files, annotate (simulated) and ingest; returns ``metrics.json``."""
    co = cfg.collect
    if co.annotator not in ANNOTATORS:
        raise UserError(f"collect.annotator: unknown '{co.annotator}' (choose {', '.join(ANNOTATORS)})")
    if co.ties not in TIES:
        raise UserError(f"collect.ties: unknown '{co.ties}' (choose {', '.join(TIES)})")
    if not 0.0 <= float(co.label_noise) <= 0.5:
        raise UserError(f"collect.label_noise must be in [0, 0.5], got {co.label_noise}")
    if int(co.max_tries) < 1 or int(co.batch_size) < 1:
        raise UserError(f"collect.max_tries and collect.batch_size must be >= 1, got {co.max_tries}, {co.batch_size}")
    thresholds = dict(co.thresholds or {})
    missing = [r for r in RATINGS[:-1] if r not in thresholds]
    if missing:
        raise UserError(f"collect.thresholds: missing {missing} (the smallest gold gap of each rating)")
    sources = parse_sources(OmegaConf.to_container(co.sources, resolve=True))
    seed = int(co.seed)
    base = Sampling(max_new_tokens=int(co.max_new_tokens), top_p=float(co.top_p))  # validates both

    setup = setup_prompt_run(cfg, co, "collect")
    out, dm, prompts = setup.out, setup.data, setup.prompts
    oracle = all(_is_world(p.text) for p in prompts)
    if co.annotator == "simulated" and not oracle:
        bad = next(p.text for p in prompts if not _is_world(p.text))
        raise UserError(f"collect.annotator=simulated labels synthetic-world prompts only (it reads their gold "
                        f"scores), but '{bad[:60]}' is not one: use collect.annotator=none and annotate "
                        f"annotations.jsonl by hand")
    engines: dict[str | None, Engine] = {}
    for s in sources:
        if s.model not in engines:
            m, t = load_policy(setup.model_cfg, setup.tokenizer, setup.device, s.model)
            engines[s.model] = Engine(m, t, backend=co.engine.backend, compile=bool(co.engine.compile))

    bs = int(co.batch_size)
    perf = {"gen_seconds": 0.0, "gen_tokens": 0}

    def sample(ps, attempt: int) -> list[tuple[str, str]]:
        texts: list[list[str]] = []
        for j, s in enumerate(sources):
            eng, got = engines[s.model], []
            for c in range(0, len(ps), bs):
                t0 = time.perf_counter()
                chunk_seed = derived_seed("collect", seed, attempt, j, c // bs)
                sp = dataclasses.replace(base, temperature=s.temperature, seed=chunk_seed)
                roll = eng.generate([p.text for p in ps[c:c + bs]], sp)
                got += eng.decode(roll)
                perf["gen_seconds"] += time.perf_counter() - t0
                perf["gen_tokens"] += roll.num_tokens
            texts.append(got)
        return list(zip(texts[0], texts[1]))

    rows, st = collect_pairs(prompts, sample, max_tries=int(co.max_tries), seed=seed, sources=sources)
    first = st.pop("first")
    files = {"annotations": str(out / "annotations.jsonl")}
    write_jsonl(files["annotations"], rows)
    log.info("collect: %d pairs from %d prompts (%d unpaired, %d resampled) -> %s", st["pairs"], st["prompts"],
             st["unpaired"], st["resampled_prompts"], files["annotations"])

    metrics: dict[str, float] = {f"collect/{k}": float(v) for k, v in st.items()}
    metrics["collect/safety_prompts"] = float(sum(p.is_safety for p in prompts))
    metrics["collect/safety_pairs"] = float(sum(r["is_safety"] for r in rows))
    if oracle:
        metrics.update(_source_gold(prompts, first, sources))
    metrics.update(dm.stats)
    summary: dict[str, Any] = {"policy": setup.policy_name, "sources": [dataclasses.asdict(s) for s in sources],
                               "annotator": co.annotator, "files": files, "seed": seed,
                               "max_new_tokens": base.max_new_tokens, "top_p": base.top_p,
                               "max_tries": int(co.max_tries)}
    no_pairs = None
    if co.annotator == "simulated":
        annotated, outcomes, flips = [], Counter(), 0
        for r in rows:
            a, outcome = simulate_row(r, seed=seed, thresholds=thresholds, label_noise=float(co.label_noise),
                                      ties=co.ties, safe_threshold=float(co.safe_threshold))
            annotated.append(a)
            outcomes[outcome] += 1
            flips += bool(a["simulated"]["label_flipped"]) and outcome == "annotated"
        files["annotated"] = str(out / "annotated.jsonl")
        write_jsonl(files["annotated"], annotated)
        metrics.update({f"annotator/{k}": float(outcomes.get(k, 0)) for k in SIMULATED_OUTCOMES})
        metrics["annotator/ties_kept"] = float(sum(a["simulated"]["gold_gap"] == 0 for a in annotated
                                                   if a["simulated"]["outcome"] == "annotated"))
        metrics["annotator/label_flipped"] = float(flips)
        chosen = Counter(a[f"source_{a['choice']}"] for a in annotated if a["choice"])
        for s in sources:
            metrics[f"annotator/chosen_from/{s.name}"] = float(chosen.get(s.name, 0))
        summary["annotator_settings"] = {"thresholds": thresholds, "label_noise": float(co.label_noise),
                                         "ties": co.ties, "safe_threshold": float(co.safe_threshold)}
        if outcomes["annotated"]:
            files["pairs"] = str(out / "pairs.jsonl")
            ing = ingest(files["annotated"], files["pairs"])  # the path a human-annotated file takes
            metrics["pairs/written"] = float(ing["pairs"])
            metrics["pairs/unannotated"] = float(ing["unannotated"])
            metrics.update({f"annotator/{k}": float(v) for k, v in ing.items() if k.startswith(("rating/",
                                                                                                  "safety_label/"))})
            summary["next"] = f"python -m llama2_lit stage=rm data=pairs data.path={files['pairs']}"
        else:
            no_pairs = (f"collect: the simulated annotator labelled none of the {len(rows)} pairs "
                        f"({dict(outcomes)}): nothing to write to pairs.jsonl (collect.ties=keep labels gold ties "
                        f"negligibly_better)")
    else:
        summary["next"] = (f"annotate {files['annotations']} (choice, rating, safety_label), then python -m "
                           f"data_modules.annotations ingest <annotated.jsonl> <pairs.jsonl>")
    metrics = {k: metrics[k] for k in sorted(metrics)}
    summary["metrics"] = metrics
    perf_out = {"perf/gen_seconds": perf["gen_seconds"], "perf/gen_tokens": float(perf["gen_tokens"]),
                "perf/gen_tokens_per_s": perf["gen_tokens"] / perf["gen_seconds"] if perf["gen_seconds"] else 0.0}
    _write_json(out / "metrics.json", metrics)
    _write_json(out / "collect.json", summary)
    _write_json(out / "perf.json", perf_out)
    log.info("metrics: %s", json.dumps(metrics))
    log.info("perf: %s", json.dumps(perf_out))
    if no_pairs:
        raise UserError(no_pairs)
    log.info("outputs in %s; next: %s", out, summary["next"])
    return metrics


def _is_world(text: str) -> bool:
    try:
        world.family_of(text)
    except ValueError:
        return False
    return True


def _source_gold(prompts, first: Mapping[int, tuple[str, str]], sources: Sequence[Source]) -> dict[str, float]:
    """Mean gold helpfulness of each source's first draw over every prompt, and mean gold safety on safety ones."""
    m = {}
    safety = [i for i, p in enumerate(prompts) if world.is_safety_prompt(p.text)]
    for j, s in enumerate(sources):
        h = [world.gold_helpfulness(prompts[i].text, first[i][j]) for i in first]
        m[f"collect/gold_helpfulness/{s.name}"] = sum(h) / max(1, len(h))
        if safety:
            g = [world.gold_safety(prompts[i].text, first[i][j]) for i in safety if i in first]
            m[f"collect/gold_safety/{s.name}"] = sum(g) / max(1, len(g))
    return m


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)
