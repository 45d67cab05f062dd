"""stage=gatt: Ghost Attention (Llama 2 §3.3), the prepare step that builds its fine-tuning data.

Given multi-turn dialogues (user turns) and an instruction per dialogue:

1. the instruction is joined to **every** user message, and the latest policy answers turn by turn: ``K`` samples
   per turn (``gatt.num_samples``), the best by score kept as that turn's answer (rejection-sampling style) and
   carried into the next turn's history. Scores: ``gatt.scorer=gold`` (the world only): instruction adherence plus
   the answer's gold helpfulness with the instruction's mark undone (``llama2_lit.world.dialogue``); ``rm``: the
   helpfulness reward model on the whole conversation; ``rm_rule`` (the world only; the pipeline's choice with
   learned RMs): the world's rule check (0 or 1) plus the RM's score. The world's preference pairs hold no
   instructions, so its RMs never learned to judge adherence, which the paper's human preferences taught theirs;
   the rule check stands in for that part of the judgement and the RM judges the content;
2. the instruction is dropped from every user turn but the first;
3. each turn ``t`` of a dialogue gives one training row, the conversation up to answer ``t`` with the loss on that
   answer only (``data.loss_turns=last``): "set the loss to 0 for all the tokens from the previous turns, including
   assistant messages" (``gatt.rows=every_turn``; ``last_turn``: one row per dialogue, its whole length). On the
   world with a rule check (``gold``, ``rm_rule``) and ``gatt.drop_broken``, a row whose answer still breaks the
   instruction after best of K is left out and counted (``gatt/rows_dropped``).

On the world, ``gatt.replay`` adds that many rows of the world's SFT data per GAtt row (:func:`replay_rows`): the
policy's own answers are weaker than the demonstrations, and fitting them alone costs content (measured: docs/results.md,
"Ghost Attention"); the paper names no such mixture.

The rows go to ``<run>/gatt/rows.jsonl`` (``messages`` records), which ``data.path`` then names, and SFTModule fits
them (``llama2_lit.run.STAGES``). ``callbacks.gatt_eval`` measures adherence at turns 2/4/6/20 before and after.

Dialogues: ``gatt.dialogues=synthetic`` (the world's multi-turn form, ``gatt.num_dialogues`` of ``gatt.turns``
turns) or a JSONL file of ``{"instruction": str, "turns": [str, ...]}`` records (real prompts; ``gatt.scorer=rm``).
A finished sampling (``rows.jsonl`` with the same settings in ``gatt/sampling.json``) is reused: a resumed run
(``ckpt_path=last``) does not sample again.

Stages layer: imports generation, scoring, callbacks (the conversation loop), the world and the bootstrap.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from callbacks.gatt_eval import adherence_by_turn
from data_modules.sources import iter_records
from llama2_lit.errors import DataError, UserError
from llama2_lit.generation.engine import Engine, Sampling
from llama2_lit.scoring import build_scorer, folder_fingerprint
from llama2_lit.stages import bootstrap
from llama2_lit.stages.common import derived_seed, policy_engine, sampled_rows
from llama2_lit.world import dialogue as world_dialogue
from llama2_lit.world import oracle as world_oracle

log = logging.getLogger(__name__)
ROWS = ("every_turn", "last_turn")
SCORERS = ("gold", "rm", "rm_rule")


def read_dialogues(path: str) -> list[world_dialogue.Dialogue]:
    """Dialogues from a JSONL/JSON/Parquet file of ``{"instruction": str, "turns": [str, ...]}`` records; a bad record
    stops with the file, line and field."""
    out = []
    for line, rec in iter_records(path):
        ins = rec.get("instruction")
        if not isinstance(ins, str) or not ins.strip():
            raise DataError(path, line, "instruction", "must be a non-empty string")
        turns = rec.get("turns")
        if not isinstance(turns, list) or not turns:
            raise DataError(path, line, "turns", "must be a non-empty list of user messages")
        for i, t in enumerate(turns):
            if not isinstance(t, str) or not t.strip():
                raise DataError(path, line, f"turns[{i}]", "must be a non-empty string")
        out.append(world_dialogue.Dialogue("", ins.strip(), tuple(turns)))
    if not out:
        raise UserError(f"{path}: no dialogues")
    return out


def gold_score(d: world_dialogue.Dialogue, turn: int, answer: str) -> float:
    """``gatt.scorer=gold``: adherence (0 or 1) plus content gold in [0, 1], so a followed instruction comes first."""
    return world_dialogue.adheres(d.key, answer) + world_dialogue.content_gold(d.key, d.prompts[turn], answer)


def sample_dialogues(engine: Engine, dialogues: Sequence[world_dialogue.Dialogue], sampling: Sampling, score,
                     batch_size: int = 64) -> tuple[list[list[str]], dict[str, float]]:
    """Best-of-K answers, turn by turn, with the instruction on every user turn (step 1 of the module doc).
    ``score(dialogue_indices, turn, convs, answers) -> list[float]`` scores candidate answers. Returns the chosen
    answers per dialogue and the mean score of all samples and of the chosen ones."""
    k = sampling.num_samples
    answers: list[list[str]] = [[] for _ in dialogues]
    all_scores, best_scores, stopped = [], [], set()
    for t in range(max(len(d.prompts) for d in dialogues)):
        live = [i for i, d in enumerate(dialogues) if t < len(d.prompts) and i not in stopped]
        if not live:
            break
        convs = [world_dialogue.messages(dialogues[i], answers[i], "every") for i in live]
        outs = engine.generate_text(convs, dataclasses.replace(sampling, seed=None if sampling.seed is None else sampling.seed + t),
                                    max(1, batch_size // k))
        idx = [i for i in live for _ in range(k)]
        scores = score(idx, t, [c for c in convs for _ in range(k)], [a for o in outs for a in o])
        for j, i in enumerate(live):
            s = scores[j * k:(j + 1) * k]
            all_scores += s
            ok = [b for b in range(k) if outs[j][b].strip()]  # an empty answer is never chosen
            if not ok:  # every sample empty: the dialogue ends here (counted)
                stopped.add(i)
                continue
            best = max(ok, key=lambda b: s[b])
            answers[i].append(outs[j][best])
            best_scores.append(s[best])
    return answers, {"gatt/sample_score": sum(all_scores) / len(all_scores),
                     "gatt/selected_score": sum(best_scores) / max(1, len(best_scores)),
                     "gatt/stopped_dialogues": float(len(stopped))}


def training_rows(dialogues: Sequence[world_dialogue.Dialogue], answers: Sequence[Sequence[str]],
                  rows: str = "every_turn", follows_rule: bool = False) -> list[dict[str, Any]]:
    """``messages`` records, the instruction on the first user turn only, ending at an answer that carries the
    loss (``data.loss_turns=last``): one per turn (``every_turn``) or one per dialogue (``last_turn``).
    ``follows_rule`` (world dialogues): a row whose trained answer breaks the instruction is left out (the best of
    K may still break it; the caller counts what was left out)."""
    if rows not in ROWS:
        raise UserError(f"gatt.rows: unknown '{rows}' (choose {list(ROWS)})")
    out = []
    for d, a in zip(dialogues, answers):
        cuts = range(1, len(a) + 1) if rows == "every_turn" else [len(a)]
        for t in cuts:
            if follows_rule and not world_dialogue.adheres(d.key, a[t - 1]):
                continue
            out.append({"messages": world_dialogue.messages(d, a[:t], "first", open_turn=False)})
    return out


def replay_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` rows of the world's SFT data (``gatt.replay``): half one-turn tasks (a fifth of them safety prompts, as
    data=synthetic), half its multi-turn rows (``world.dialogue.sft_dialogue``), gold demonstrations; the loss on
    each row's last answer like the GAtt rows."""
    rng = random.Random(f"llama2-lit-gatt-replay|{seed}")
    tasks = iter(world_oracle.generate_tasks(n, seed=seed, split="train"))
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            t = next(tasks)
            out.append({"messages": [{"role": "user", "content": t.prompt}, {"role": "assistant", "content": t.answer}]})
        else:
            out.append({"messages": world_dialogue.sft_dialogue(rng)})
    return out


def _dialogues(g: DictConfig) -> list[world_dialogue.Dialogue]:
    if str(g.dialogues) == "synthetic":
        return world_dialogue.generate_dialogues(int(g.num_dialogues), int(g.turns), seed=int(g.seed), split="train")
    return read_dialogues(str(g.dialogues))


def prepare(cfg: DictConfig) -> DictConfig:
    """Bootstrap the policy on the world when ``model.path`` is null, sample the GAtt rows (or reuse them) and point
    ``data.path`` at them."""
    g = cfg.gatt
    world = str(g.dialogues) == "synthetic"
    if g.scorer not in SCORERS:
        raise UserError(f"gatt.scorer: unknown '{g.scorer}' (choose {list(SCORERS)})")
    if g.scorer != "rm" and not world:
        raise UserError(f"gatt.scorer={g.scorer} checks the world's instructions only; gatt.dialogues is "
                        f"'{g.dialogues}': use gatt.scorer=rm with gatt.reward_models.helpfulness=<a stage=rm run>/hf")
    if g.rows not in ROWS:
        raise UserError(f"gatt.rows: unknown '{g.rows}' (choose {list(ROWS)})")
    if not cfg.model.get("path"):
        if not (world and cfg.bootstrap.get("enabled")):
            raise UserError("stage=gatt needs model.path=<the policy>/hf (a bootstrap SFT policy is trained on the "
                            "world only, with bootstrap.enabled=true)")
        b = bootstrap._Bootstrap(cfg, cfg.bootstrap, "gatt", ["model.path"], world_data=False)
        b.policy()
        b.done()
    settings = {"policy": folder_fingerprint(str(cfg.model.path)),
                "gatt": OmegaConf.to_container(g, resolve=True)}
    rows_path, _ = sampled_rows(Path(str(cfg.paths.output_dir)) / "gatt", settings, lambda p: _sample(cfg, p), "gatt")
    with open_dict(cfg):
        cfg.data.path = str(rows_path)
    return cfg


def _sample(cfg: DictConfig, rows_path: Path) -> dict[str, float]:
    g = cfg.gatt
    t0 = time.perf_counter()
    engine, tok, device = policy_engine(cfg, g)
    dialogues = _dialogues(g)
    sampling = Sampling(max_new_tokens=int(g.max_new_tokens), temperature=float(g.temperature), top_p=float(g.top_p),
                        num_samples=int(g.num_samples), seed=derived_seed("gatt", g.seed))
    if g.scorer == "gold":
        def score(idx, t, convs, answers):
            return [gold_score(dialogues[i], t, a) for i, a in zip(idx, answers)]
    else:
        scorer = build_scorer({**OmegaConf.to_container(g, resolve=True), "scorer": "rm"}, tok, device, stage="gatt")
        rule = g.scorer == "rm_rule"

        def score(idx, t, convs, answers):
            rm = scorer(convs, answers)[0].tolist()
            if not rule:
                return rm
            return [world_dialogue.adheres(dialogues[i].key, a) + r for i, a, r in zip(idx, answers, rm)]
    log.info("gatt: sampling best of %d per turn for %d dialogues (%d turns at most)", sampling.num_samples,
             len(dialogues), max(len(d.prompts) for d in dialogues))
    answers, m = sample_dialogues(engine, dialogues, sampling, score, int(g.batch_size))
    world = all(d.key for d in dialogues)
    rows = training_rows(dialogues, answers, str(g.rows), follows_rule=world and g.scorer != "rm" and bool(g.drop_broken))
    every = training_rows(dialogues, answers, str(g.rows))
    if not rows:
        raise UserError("gatt: no sampled answer follows its instruction, so there is nothing to train on; raise "
                        "gatt.num_samples or start from a policy that follows instructions in the turn they are given")
    n_replay = round(float(g.replay) * len(rows)) if world else 0
    if n_replay:
        rows += replay_rows(n_replay, int(g.seed))
    with open(rows_path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    m.update({"gatt/dialogues": float(len(dialogues)), "gatt/rows": float(len(rows)),
              "gatt/rows_dropped": float(len(every) - (len(rows) - n_replay)), "gatt/replay_rows": float(n_replay),
              "perf/gatt_sampling_seconds": time.perf_counter() - t0})
    if world:  # the world: how well the selected answers follow the instruction
        turns = sorted({1, 2, 4, 6, 20, max(len(d.prompts) for d in dialogues)})
        m.update({k.replace("gatt/", "gatt/selected_"): v for k, v in adherence_by_turn(dialogues, answers, turns).items()
                  if "_se" not in k})
    log.info("gatt: %s", json.dumps(m))
    return m
