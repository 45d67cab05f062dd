"""The world's multi-turn form: dialogues of world prompts under one checkable instruction (Ghost Attention, §3.3).

A dialogue is ``turns`` user prompts from the helpfulness families and one instruction that should hold for every
answer of the dialogue. Each instruction is easy to check on any text:

    key       instruction (long / short form)                          an answer that follows it
    --------  -------------------------------------------------------  -------------------------
    exclaim   Always end your answer with !      / Rule: end with !      "nomel!"
    smile     Always end your answer with :)     / Rule: end with :)     "nomel :)"
    upper     Always answer in uppercase.        / Rule: uppercase.      "NOMEL"

``upper`` dialogues draw their prompts from the families whose answers are words (an uppercase rule says nothing
about ``47``). Half the time the instruction takes its short form, as the paper shortens half of its instructions
("Figure: Napoleon."). The instruction is joined to a user message as ``f"{instruction} {prompt}"``
(:func:`instructed`): Ghost Attention's sampling puts it on every user turn, its training rows and the evaluation
on the first only.

Scores of an answer at one turn:

* :func:`adheres`: 1.0 when the answer follows the instruction, else 0.0 (an empty answer never does);
* :func:`content_gold`: the world's gold helpfulness of the answer with the instruction's mark undone (one trailing
  ``!`` dropped; a trailing ``:)`` dropped; for ``upper`` the better of the answer as written and lowercased, since
  some families ask for uppercase themselves), so following the rule costs no helpfulness.

SFT's world data (``data.synthetic.dialogue_fraction``) gains the two kinds of dialogue rows an SFT annotator would
write, :func:`sft_dialogue`: plain multi-turn dialogues (2-6 turns, no instruction, loss on every answer) and
instructed ones (1-3 turns, the instruction repeated on every user message, every answer following it). No SFT row
has an instruction that must outlive its turn: that is what Ghost Attention teaches.

Standard library only; all randomness through ``random.Random``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from llama2_lit.world import oracle as world

WORD_FAMILIES: tuple[str, ...] = ("reverse", "upper", "repeat", "initials", "length", "ending")


@dataclass(frozen=True)
class Instruction:
    key: str
    long: str
    short: str
    families: tuple[str, ...]  # the families its dialogues draw prompts from


INSTRUCTIONS: dict[str, Instruction] = {
    "exclaim": Instruction("exclaim", "Always end your answer with !", "Rule: end with !", world.HELPFULNESS_FAMILIES),
    "smile": Instruction("smile", "Always end your answer with :)", "Rule: end with :)", world.HELPFULNESS_FAMILIES),
    "upper": Instruction("upper", "Always answer in uppercase.", "Rule: uppercase.", WORD_FAMILIES),
}
_SMILE = ":)"


@dataclass(frozen=True)
class Dialogue:
    key: str  # the instruction's key (INSTRUCTIONS)
    instruction: str  # its text, long or short form
    prompts: tuple[str, ...]  # one world prompt per user turn


def instruction_of(text: str) -> str:
    """The key of an instruction text (long or short form); ValueError for any other text."""
    for ins in INSTRUCTIONS.values():
        if text in (ins.long, ins.short):
            return ins.key
    raise ValueError(f"not an instruction of the world: {text!r}")


def instructed(instruction: str, prompt: str) -> str:
    """The user message carrying ``instruction`` (its text) before ``prompt``."""
    return f"{instruction} {prompt}"


def follow(key: str, answer: str) -> str:
    """``answer`` rewritten to follow instruction ``key`` (how a demonstration under the instruction reads)."""
    if key == "exclaim":
        return answer + "!"
    if key == "smile":
        return f"{answer} {_SMILE}"
    if key == "upper":
        return answer.upper()
    raise ValueError(f"unknown instruction {key!r} (choose {sorted(INSTRUCTIONS)})")


def adheres(key: str, response: str) -> float:
    """1.0 when ``response`` follows instruction ``key``, else 0.0 (whitespace at the ends ignored)."""
    got = response.strip()
    if key == "exclaim":
        return float(got.endswith("!"))
    if key == "smile":
        return float(got.endswith(_SMILE))
    if key == "upper":
        return float(any(c.isalpha() for c in got) and not any(c.islower() for c in got))
    raise ValueError(f"unknown instruction {key!r} (choose {sorted(INSTRUCTIONS)})")


def content_gold(key: str, prompt: str, response: str) -> float:
    """Gold helpfulness of ``response`` to world ``prompt`` with instruction ``key``'s mark undone (module doc)."""
    got = response.strip()
    if key == "exclaim" and got.endswith("!"):
        got = got[:-1]
    elif key == "smile" and got.endswith(_SMILE):
        got = got[:-len(_SMILE)]
    elif key == "upper":
        return max(world.gold_helpfulness(prompt, got), world.gold_helpfulness(prompt, got.lower()))
    elif key not in INSTRUCTIONS:
        raise ValueError(f"unknown instruction {key!r} (choose {sorted(INSTRUCTIONS)})")
    return world.gold_helpfulness(prompt, got)


def _prompts(families: Sequence[str], n: int, rng: random.Random, split: str) -> tuple[str, ...]:
    seed = rng.randrange(2**31)
    return tuple(t.prompt for t in world.generate_tasks(n, seed=seed, split=split, families=list(families)))


def generate_dialogues(n: int, turns: int, seed: int = 0, split: str = "train",
                       keys: Sequence[str] | None = None) -> list[Dialogue]:
    """``n`` dialogues of ``turns`` user prompts each (held-out prompts for ``split="heldout"``), instructions cycling
    through ``keys`` (default: all), long or short form at random; deterministic in all arguments."""
    keys = list(keys or INSTRUCTIONS)
    unknown = [k for k in keys if k not in INSTRUCTIONS]
    if unknown or turns < 1 or n < 0:
        raise ValueError(f"generate_dialogues: instructions {keys} (known: {sorted(INSTRUCTIONS)}), turns {turns} "
                         f"(>= 1), n {n} (>= 0)")
    rng = random.Random(f"llama2-lit-dialogue|{split}|{seed}")
    out = []
    for i in range(n):
        ins = INSTRUCTIONS[keys[i % len(keys)]]
        text = ins.short if rng.random() < 0.5 else ins.long
        out.append(Dialogue(ins.key, text, _prompts(ins.families, turns, rng, split)))
    return out


def messages(dialogue: Dialogue, answers: Sequence[str], instruct: str = "first", open_turn: bool = True
             ) -> list[dict]:
    """The chat messages of ``dialogue`` with ``answers`` (one per turn so far), then, with ``open_turn``, the next
    user turn (unanswered: what the policy answers next). ``instruct``: the instruction on the ``first`` user turn
    only, on ``every`` one, or on ``none``."""
    if instruct not in ("first", "every", "none"):
        raise ValueError(f"instruct: unknown {instruct!r} (choose first, every, none)")
    if len(answers) > len(dialogue.prompts):
        raise ValueError(f"{len(answers)} answers to {len(dialogue.prompts)} user turns")
    n = min(len(dialogue.prompts), len(answers) + int(open_turn))
    out = []
    for t in range(n):
        on = instruct == "every" or (instruct == "first" and t == 0)
        out.append({"role": "user", "content": instructed(dialogue.instruction, dialogue.prompts[t]) if on
                    else dialogue.prompts[t]})
        if t < len(answers):
            out.append({"role": "assistant", "content": answers[t]})
    return out


def sft_dialogue(rng: random.Random, split: str = "train") -> list[dict]:
    """One SFT row of the world's multi-turn form (module doc): half the time a plain dialogue of 2-6 turns, else an
    instructed one of 1-3 turns with the instruction on every user turn; gold demonstrations drawn with ``rng``."""
    if rng.random() < 0.5:
        prompts = _prompts(world.HELPFULNESS_FAMILIES, rng.randint(2, 6), rng, split)
        out = []
        for p in prompts:
            out += [{"role": "user", "content": p}, {"role": "assistant", "content": world.demonstration(p, rng)}]
        return out
    ins = INSTRUCTIONS[rng.choice(sorted(INSTRUCTIONS))]
    text = ins.short if rng.random() < 0.5 else ins.long
    out = []
    for p in _prompts(ins.families, rng.randint(1, 3), rng, split):
        out += [{"role": "user", "content": instructed(text, p)},
                {"role": "assistant", "content": follow(ins.key, world.demonstration(p, rng))}]
    return out
