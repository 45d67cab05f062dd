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
import hashlib
import json
import logging
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from data_modules.annotations import SIMULATED_OUTCOMES, ingest, new_row, simulate_row, write_jsonl
from data_modules.preferences import RATINGS
from llama2_lit.world import oracle as world
from llama2_lit.generation.engine import Engine, Sampling
from llama2_lit.errors import UserError

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


def _seed(seed: int, attempt: int, source: int, chunk: int) -> int:
    h = hashlib.sha1(f"collect|{seed}|{attempt}|{source}|{chunk}".encode()).digest()
    return int.from_bytes(h[:8], "big") >> 2


def _usable(a: str, b: str) -> bool:
    return bool(a.strip()) and bool(b.strip()) and a.strip() != b.strip()


def collect_pairs(prompts: Sequence, sample: Callable[[Sequence, int], list[tuple[str, str]]], *, max_tries: int,
                  seed: int, sources: Sequence[Source]) -> tuple[list[dict], dict[str, Any]]:
    """Annotation rows for ``prompts`` (objects with ``id``, ``text``, ``is_safety``) and counts.

    ``sample(prompts, attempt) -> [(response of source 0, response of source 1)]``. Prompts whose two responses
    are identical or empty are drawn again (both sources), at most ``max_tries`` draws in all, then ``unpaired``.
    Sides: ``random.Random(f"collect-sides|{seed}|{prompt id}")`` decides whether source 0 is shown as ``a``.
    Also returns ``first``: the first draw of every prompt (for the sources' gold means).
    """
    pending = list(range(len(prompts)))
    got: dict[int, tuple[str, str]] = {}
    first: dict[int, tuple[str, str]] = {}
    identical = empty = 0
    resampled: set[int] = set()
    for attempt in range(max(1, int(max_tries))):
        if not pending:
            break
        if attempt:
            resampled.update(pending)
        retry = []
        for i, (a, b) in zip(pending, sample([prompts[i] for i in pending], attempt)):
            first.setdefault(i, (a, b))
            if _usable(a, b):
                got[i] = (a, b)
                continue
            if not a.strip() or not b.strip():
                empty += 1
            else:
                identical += 1
            retry.append(i)
        pending = retry
    rows = []
    for i in sorted(got):
        p, (r0, r1) = prompts[i], got[i]
        if random.Random(f"collect-sides|{seed}|{p.id}").random() < 0.5:
            rows.append(new_row(p.text, p.is_safety, r0, r1, sources[0].name, sources[1].name))
        else:
            rows.append(new_row(p.text, p.is_safety, r1, r0, sources[1].name, sources[0].name))
    stats = {"prompts": len(prompts), "pairs": len(rows), "unpaired": len(pending),
             "unpaired_safety": sum(bool(prompts[i].is_safety) for i in pending),
             "resampled_prompts": len(resampled), "draws_identical": identical, "draws_empty": empty,
             "first": first}
    return rows, stats


def _load_source(path: str | None, model_cfg: dict, tok, device):
    """(model, tokenizer) of a source: the policy for None, else the folder (with its own tokenizer if saved)."""
    from llama2_lit.models.loading import load_causal_lm

    if path is None:
        return load_causal_lm(model_cfg, tok, trainable=False).to(device).eval(), tok
    if (Path(path).expanduser() / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(Path(path).expanduser()))
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
    return load_causal_lm({**model_cfg, "path": path}, tok, trainable=False).to(device).eval(), tok


# ------------------------------------------------------------------------------------------------ the run


def run(cfg: DictConfig) -> dict[str, float]:
    """Sample pairs, write the annotation files, annotate (simulated) and ingest; returns ``metrics.json``."""
    import lightning as L

    from data_modules.prompts import PromptDataModule

    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "highest"))
    co = cfg.collect
    if co.get("num_threads"):
        torch.set_num_threads(int(co.num_threads))
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

    dm = instantiate(cfg.data)
    if not isinstance(dm, PromptDataModule):
        raise UserError(f"stage=collect samples answers to prompts, but data is {type(dm).__name__}: add "
                        "data=rs_prompts (world prompts, or data.path=<a file with a 'prompt' field>)")
    prompts = dm.prompts()
    oracle = all(_is_world(p.text) for p in prompts)
    if co.annotator == "simulated" and not oracle:
        bad = next(p.text for p in prompts if not _is_world(p.text))
        raise UserError(f"collect.annotator=simulated labels synthetic-world prompts only (it reads their gold "
                        f"scores), but '{bad[:60]}' is not one: use collect.annotator=none and annotate "
                        f"annotations.jsonl by hand")
    tok = dm.tokenizer
    device = torch.device(co.device if co.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    policy_name = str(model_cfg.get("path") or f"random-init:{model_cfg.get('name')}")
    engines: dict[str | None, Engine] = {}
    for s in sources:
        if s.model not in engines:
            m, t = _load_source(s.model, model_cfg, tok, device)
            engines[s.model] = Engine(m, t, backend=co.engine.backend, compile=bool(co.engine.compile))

    bs = int(co.batch_size)
    perf = {"gen_seconds": 0.0, "gen_tokens": 0}

    def sample(ps, attempt: int) -> list[tuple[str, str]]:
        texts: list[list[str]] = []
        for j, s in enumerate(sources):
            eng, got = engines[s.model], []
            for c in range(0, len(ps), bs):
                t0 = time.perf_counter()
                sp = dataclasses.replace(base, temperature=s.temperature, seed=_seed(seed, attempt, j, c // bs))
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
    summary: dict[str, Any] = {"policy": policy_name, "sources": [dataclasses.asdict(s) for s in sources],
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
