"""Safety preprompts for context distillation (Llama 2 §4.2.4, Tables 39-40), on the world and on real prompts.

A preprompt is a templated sentence of three adjectives (the paper: "responsible", "respectful", "wise", ...)
followed by the answer template of the prompt's risk category:

    You are a wise, responsible and careful assistant. If you are asked for a PIN you were told to keep secret,
    answer: Sorry, I can't share that.

The world's risk categories are its secret kinds (``password``, ``PIN``, ``code``: the safety family ``secret``);
each has its own answer template, which names the kind and gives the refusal to write (``oracle.REFUSAL``). A prompt
that is not a world secret prompt (a real adversarial prompt read from a file, e.g. Anthropic HH harmless) gets the
generic template :data:`GENERIC_TEMPLATE`. The preprompt goes before the user message, on its own line
(:func:`with_preprompt`).

The tiny world model has no pretraining, so a preprompt means nothing to it unless its SFT data shows some:
:func:`sft_rows` are the world SFT rows ``data.synthetic.preprompt_fraction`` mixes in (``data_modules/sft.py``):
a safety preprompt before a world prompt, the gold demonstration as the answer. Half of them (:data:`SFT_SAFETY_SHARE`)
are secret prompts (answer: the refusal), half helpfulness prompts (answer: the gold one; the template is that of a
kind drawn at random, ``recall`` prompts that of their own kind), so that the preprompt is not a plain "refuse" cue:
the answer still depends on whether the prompt asks to keep the secret.

Standard library only; all randomness through ``random.Random``.
"""
from __future__ import annotations

import random
import re

from llama2_lit.world import oracle as world

ADJECTIVES: tuple[str, ...] = ("responsible", "respectful", "wise", "safe", "careful", "trustworthy")
RISK_TEMPLATES: dict[str, str] = {
    kind: f"If you are asked for a {kind} you were told to keep secret, answer: {world.REFUSAL}"
    for kind in world.SECRET_KINDS
}
GENERIC_TEMPLATE = f"If a request could cause harm or asks for something you should not share, answer: {world.REFUSAL}"
SFT_SAFETY_SHARE = 0.5  # share of the preprompted SFT rows that are secret prompts
_KIND = re.compile(r"The (password|PIN|code) is \d{4}\.")


def risk_of(prompt: str) -> str | None:
    """The risk category of a prompt: the secret kind of a world ``secret`` prompt; None for any other prompt (a
    world helpfulness prompt, or text not from the world)."""
    try:
        if not world.is_safety_prompt(prompt):
            return None
    except ValueError:
        return None
    return _KIND.match(prompt.strip()).group(1)


def safety_preprompt(rng: random.Random, prompt: str, kind: str | None = None) -> str:
    """``"You are a {a}, {b} and {c} assistant. "`` (three distinct adjectives drawn with ``rng``) and the answer
    template of ``kind`` (default: the prompt's risk, :func:`risk_of`; none: :data:`GENERIC_TEMPLATE`)."""
    a, b, c = rng.sample(ADJECTIVES, 3)
    kind = kind if kind is not None else risk_of(prompt)
    if kind is not None and kind not in RISK_TEMPLATES:
        raise ValueError(f"unknown risk category {kind!r}; expected one of {sorted(RISK_TEMPLATES)}")
    return f"You are a {a}, {b} and {c} assistant. " + (RISK_TEMPLATES[kind] if kind else GENERIC_TEMPLATE)


def with_preprompt(preprompt: str, prompt: str) -> str:
    """The user message with the preprompt before it, on its own line."""
    return f"{preprompt}\n{prompt}"


def sft_rows(n: int, seed: int, split: str = "train") -> list[list[dict[str, str]]]:
    """``n`` preprompted world SFT rows (``messages``) of ``split``, deterministic in the arguments: a safety
    preprompt, then a world prompt; the answer is the gold demonstration. ``round(n * SFT_SAFETY_SHARE)`` of them are
    secret prompts (preprompt of their kind); the others helpfulness prompts (``recall``: the template of its own
    kind; any other family: of a kind drawn at random). The prompts are the world's tasks of seed
    ``seed + 100003`` (a stream apart from the plain rows' seed ``seed``)."""
    rng = random.Random(f"llama2-lit-sft-preprompts|{split}|{seed}")
    rows = []
    for t in world.generate_tasks(n, seed=seed + 100003, split=split, safety_fraction=SFT_SAFETY_SHARE):
        kind = risk_of(t.prompt)
        if kind is None:
            m = _KIND.match(t.prompt)
            kind = m.group(1) if m else rng.choice(world.SECRET_KINDS)
        rows.append([{"role": "user", "content": with_preprompt(safety_preprompt(rng, t.prompt, kind), t.prompt)},
                     {"role": "assistant", "content": t.answer}])
    return rows
