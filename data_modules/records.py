"""Record formats → chat messages or plain text, and chat messages → token ids with a label mask.

Formats (``data.format``):
- ``alpaca``: ``instruction``, optional ``input``, ``output``
- ``prompt_response``: ``prompt``, ``response`` (field names configurable)
- ``messages``: ``messages``: a list of ``{"role", "content"}``; loss on every assistant turn
- ``text``: ``text``: plain text for pretraining (loss on every token)
"""
from __future__ import annotations

from typing import Any

from llama2_lit.errors import DataError
from llama2_lit.core.losses import IGNORE_INDEX

FORMATS = ("alpaca", "prompt_response", "messages", "text")
_ROLES = ("system", "user", "assistant")


def _field(rec: dict, name: str, path, line, *, allow_empty: bool = False) -> str:
    if name not in rec or rec[name] is None:
        raise DataError(path, line, name, "is missing")
    val = rec[name]
    if not isinstance(val, str):
        raise DataError(path, line, name, f"must be a string, got {type(val).__name__}")
    if not allow_empty and not val.strip():
        raise DataError(path, line, name, "is empty")
    return val


def to_messages(rec: dict, fmt: str, path=None, line=None, prompt_field: str = "prompt",
                response_field: str = "response") -> list[dict]:
    """Turn one record into chat messages (the last one an assistant answer)."""
    if fmt == "alpaca":
        instruction = _field(rec, "instruction", path, line)
        extra = _field(rec, "input", path, line, allow_empty=True) if rec.get("input") is not None else ""
        output = _field(rec, "output", path, line)
        user = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if fmt == "prompt_response":
        return [
            {"role": "user", "content": _field(rec, prompt_field, path, line)},
            {"role": "assistant", "content": _field(rec, response_field, path, line)},
        ]
    if fmt == "messages":
        msgs = rec.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise DataError(path, line, "messages", "must be a non-empty list of {role, content}")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in _ROLES:
                raise DataError(path, line, f"messages[{i}].role", f"must be one of {list(_ROLES)}")
            content = m.get("content")
            if not isinstance(content, str) or not content.strip():
                raise DataError(path, line, f"messages[{i}].content", "is missing or empty")
            out.append({"role": m["role"], "content": content})
        if out[-1]["role"] != "assistant":
            raise DataError(path, line, "messages", "must end with an assistant turn")
        return out
    raise DataError(path, line, None, f"unknown format '{fmt}' (choose {list(FORMATS)})")


def tokenize_chat(messages: list[dict], tokenizer, where: str = "", last_only: bool = False
                  ) -> tuple[list[int], list[int]]:
    """Render ``messages`` with the tokenizer's chat template and mask every non-assistant token.

    Returns ``(input_ids, labels)`` where ``labels`` equals ``input_ids`` on assistant answers
    (including the end-of-turn tokens the template puts after them) and ``IGNORE_INDEX`` on the
    rest (system, user, template markup, the separator). The template is rendered once per
    assistant turn: tokens between the rendering with a generation prompt and the rendering
    with the answer are the answer's. A template whose renderings are not prefixes of one
    another cannot be masked this way and is refused.

    ``last_only``: the loss on the last assistant turn only, every earlier token masked, answers included (Ghost
    Attention's rows, Llama 2 §3.3: "set the loss to 0 for all the tokens from the previous turns").
    """
    ids: list[int] = []
    labels: list[int] = []
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or (last_only and i != last):
            continue
        prompt_ids = render(tokenizer, messages[:i], add_generation_prompt=True) if i else []
        full_ids = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if prompt_ids[: len(ids)] != ids or full_ids[: len(prompt_ids)] != prompt_ids:
            raise DataError(where or None, None, "chat_template",
                            "renderings are not prefix-stable, so prompt tokens cannot be masked")
        labels += [IGNORE_INDEX] * (len(prompt_ids) - len(ids))
        answer = full_ids[len(prompt_ids):]
        labels += answer
        ids = full_ids
    return ids, labels


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """Token ids of ``messages`` rendered with the tokenizer's chat template (the template writes BOS itself)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_text(text: str, tokenizer) -> tuple[list[int], list[int]]:
    """Plain text for pretraining: BOS + text + EOS, loss on every token."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    ids = ids + [tokenizer.eos_token_id]
    return ids, list(ids)


def text_of(rec: dict[str, Any], field: str, path=None, line=None) -> str:
    return _field(rec, field, path, line)
