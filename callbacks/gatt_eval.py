"""GAttEvalCallback: does the policy keep a first-turn instruction? Adherence per turn on the world's dialogues
(Llama 2 §3.3, Table 30: turns 2, 4, 6 and 20), before and after training."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import lightning as L

from llama2_lit.core.stats import mean_and_se
from llama2_lit.generation.engine import Engine, Sampling
from llama2_lit.world import dialogue as world_dialogue
from llama2_lit.world import oracle as world

log = logging.getLogger(__name__)


def converse(engine: Engine, dialogues: Sequence[world_dialogue.Dialogue], sampling: Sampling, instruct: str,
             batch_size: int = 64, turns: int | None = None) -> list[list[str]]:
    """The policy's own answers, turn by turn (each turn's answer joins the history of the next), to every dialogue:
    ``answers[d][t]`` answers user turn ``t + 1``; ``instruct`` as in :func:`llama2_lit.world.dialogue.messages`.
    One answer per turn (``sampling.num_samples`` must be 1)."""
    if sampling.num_samples != 1:
        raise ValueError("converse: one answer per turn (num_samples=1)")
    n_turns = turns or max(len(d.prompts) for d in dialogues)
    answers: list[list[str]] = [[] for _ in dialogues]
    for t in range(n_turns):
        live = [i for i, d in enumerate(dialogues) if t < len(d.prompts)]
        convs = [world_dialogue.messages(dialogues[i], answers[i], instruct) for i in live]
        outs = engine.generate_text(convs, sampling, batch_size)
        for i, o in zip(live, outs):
            answers[i].append(o[0])
    return answers


def adherence_by_turn(dialogues: Sequence[world_dialogue.Dialogue], answers: Sequence[Sequence[str]],
                      turns: Sequence[int]) -> dict[str, float]:
    """``gatt/adherence@turn<t>`` (with ``_se``) and ``gatt/content_gold@turn<t>`` over the dialogues that reach
    turn ``t`` (1-based)."""
    out: dict[str, float] = {}
    for t in turns:
        rows = [(d, a[t - 1]) for d, a in zip(dialogues, answers) if len(a) >= t]
        if not rows:
            continue
        adh, se = mean_and_se([world_dialogue.adheres(d.key, a) for d, a in rows])
        out[f"gatt/adherence@turn{t}"], out[f"gatt/adherence_se@turn{t}"] = adh, se
        out[f"gatt/content_gold@turn{t}"] = mean_and_se(
            [world_dialogue.content_gold(d.key, d.prompts[t - 1], a) for d, a in rows])[0]
    return out


class GAttEvalCallback(L.Callback):
    """Greedy multi-turn conversations with the instruction on the first user turn only, on ``dialogues`` held-out
    world dialogues of ``max(turns)`` turns: ``gatt/adherence@turn<t>`` after training and
    ``gatt/adherence_init@turn<t>`` before (the starting policy), plus ``gatt/content_gold@turn<t>`` (the answers'
    gold helpfulness with the instruction's mark undone), into ``final_metrics`` (``metrics.json``). Also greedy gold
    helpfulness on ``single_turn_prompts`` plain held-out one-turn prompts (``gatt/gold_helpfulness`` and ``_init``)
    with the paired difference after minus before (``gatt/gold_helpfulness_diff`` and its ``_se``): what following
    instructions cost ordinary answers.

    ``source``: the stage's dialogues; anything but ``synthetic`` (a file) has no checkable instruction, and the
    callback measures nothing. ``sampling_info``: stage=gatt's ``gatt/sampling.json``, whose ``metrics`` (the
    sampled rows' scores and adherence) join ``final_metrics`` when the file exists."""

    def __init__(self, source: str = "synthetic", turns: Sequence[int] = (2, 4, 6, 20), dialogues: int = 100,
                 max_new_tokens: int = 24, batch_size: int = 64, seed: int = 7, at_start: bool = True,
                 sampling_info: str | None = None, single_turn_prompts: int = 500):
        if not turns or min(int(t) for t in turns) < 1:
            raise ValueError(f"gatt eval turns: {list(turns)} (each >= 1)")
        self.source, self.turns = str(source), sorted(int(t) for t in turns)
        self.n, self.max_new_tokens, self.batch_size, self.seed = int(dialogues), max_new_tokens, batch_size, seed
        self.at_start, self.sampling_info = at_start, sampling_info
        self.single_turn_prompts = int(single_turn_prompts)
        self.final_metrics: dict[str, float] = {}
        self.single_turn_init: list[float] = []  # per-prompt gold before training, for the paired difference

    def dialogues(self) -> list[world_dialogue.Dialogue]:
        return world_dialogue.generate_dialogues(self.n, max(self.turns), seed=self.seed, split="heldout")

    def _evaluate(self, trainer, pl_module, suffix: str) -> None:
        if self.source != "synthetic" or not trainer.is_global_zero:
            return
        dialogues = self.dialogues()
        engine = Engine(pl_module.model, pl_module.tokenizer)
        answers = converse(engine, dialogues, Sampling(max_new_tokens=self.max_new_tokens, temperature=0.0),
                           "first", self.batch_size)
        m = adherence_by_turn(dialogues, answers, self.turns)
        if self.single_turn_prompts:  # does GAtt cost helpfulness on plain one-turn prompts? paired before / after
            prompts = [t.prompt for t in world.generate_tasks(self.single_turn_prompts, seed=self.seed, split="heldout",
                                                               safety_fraction=0.0)]
            greedy = Sampling(max_new_tokens=self.max_new_tokens, temperature=0.0)
            gold = [world.gold_helpfulness(p, o[0]) for p, o in zip(prompts, engine.generate_text(prompts, greedy,
                                                                                                   self.batch_size))]
            m["gatt/gold_helpfulness"], m["gatt/gold_helpfulness_se"] = mean_and_se(gold)
            if suffix:
                self.single_turn_init = gold
            elif len(self.single_turn_init) == len(gold):
                m["gatt/gold_helpfulness_diff"], m["gatt/gold_helpfulness_diff_se"] = mean_and_se(
                    [a - b for a, b in zip(gold, self.single_turn_init)])
        if suffix:
            m = {(k.replace("@", f"{suffix}@") if "@" in k else k + suffix): v for k, v in m.items()}
        self.final_metrics.update(m)
        if trainer.logger is not None:
            trainer.logger.log_metrics(m, step=trainer.global_step)
        log.info("gatt eval%s on %d held-out dialogues: %s", suffix, len(dialogues),
                 ", ".join(f"{k}={v:.3f}" for k, v in m.items() if "_se" not in k))
        d = dialogues[0]
        log.info("  %r | turn 2 %r -> %r", d.instruction, d.prompts[1] if len(d.prompts) > 1 else "",
                 answers[0][1] if len(answers[0]) > 1 else "")

    def state_dict(self) -> dict:
        return {"init": {k: v for k, v in self.final_metrics.items() if "_init" in k},
                "single_turn_init": list(self.single_turn_init)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.final_metrics.update(state_dict.get("init") or {})
        self.single_turn_init = list(state_dict.get("single_turn_init") or [])

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.at_start and not any("_init@" in k for k in self.final_metrics):
            self._evaluate(trainer, pl_module, "_init")

    def on_train_end(self, trainer, pl_module) -> None:
        if self.sampling_info and Path(self.sampling_info).is_file():
            info = json.loads(Path(self.sampling_info).read_text())
            self.final_metrics.update({k: float(v) for k, v in (info.get("metrics") or {}).items()})
        self._evaluate(trainer, pl_module, "")
