"""Talk to a causal LM through its own chat template and the project's generation engine.

    python -m llama2_lit.chat <hf folder>                                 # interactive: one user turn per line
    python -m llama2_lit.chat <hf folder> --system "Answer in one line."  # a system prompt as the first message
    python -m llama2_lit.chat <hf folder> --prompt "What is 2 + 3?"       # one answer on stdout, for scripts
    python -m llama2_lit.chat <hf folder> --temperature 0 --max-new-tokens 64 --seed 0
    printf 'What is 2 + 3?\\nAnd times 4?\\n' | python -m llama2_lit.chat <hf folder>   # turns from a pipe

``<hf folder>``: a saved causal LM with its tokenizer: the ``hf/`` folder of a run (``stage=sft``, RS, PPO, DPO),
SmolLM2-Instruct, any Llama-architecture ``save_pretrained`` folder. Weights load through safetensors only and remote
code is never trusted (``llama2_lit.models.loading``); a hub id is read from the local Hugging Face cache only, never
downloaded. A tokenizer without a chat template gets the Llama 2 one (``llama2_lit.models.chat_templates``).

Interactive mode reads user turns from stdin (a ``> `` prompt when stdin is a terminal) and keeps the conversation:
every answer is generated from the whole history rendered by the chat template. ``/reset`` forgets the conversation
(the system prompt stays); an empty line, ``/exit`` or end of input (Ctrl-D) ends; Ctrl-C ends cleanly, exit code 0,
also in the middle of an answer.

Sampling defaults are those of Meta's reference ``generation.py``: temperature 0.6, top-p 0.9 (temperature 0 is
greedy); ``--max-new-tokens`` 512 (half the context for a model with less than 1,024). With ``--seed S`` the i-th
answer of a conversation (from 0, counted again after ``/reset``) is sampled with seed ``S + i``, so a ``--prompt``
call is reproducible.

When the conversation no longer fits the model's context (``max_position_embeddings`` minus ``--max-new-tokens``),
the oldest turns are dropped (the system prompt is kept) and stderr says so.

stdout carries the answers and nothing else (one per turn, each ending with a newline); logs, the ``> `` prompt and
errors go to stderr. Bad input (a folder that is missing or holds no causal LM, a template without a system role
for ``--system``, temperature < 0, top-p outside (0, 1]) is one line ``error: ...`` and exit code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from llama2_lit.errors import UserError
from llama2_lit.generation.engine import Engine, Sampling
from llama2_lit.generation.sampling import encode_prompts
from llama2_lit.models.chat_templates import ensure_chat_template
from llama2_lit.models.loading import load_pretrained, model_folder, one_line

if sys.stdin is not None and sys.stdin.isatty():  # line editing and history for input() at a terminal
    try:
        import readline  # noqa: F401
    except ImportError:  # not on every platform
        pass

# Meta's reference generation.py (llama/generation.py: chat_completion's defaults)
DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_P = 0.9
DEFAULT_MAX_NEW_TOKENS = 512

WHAT = "hf folder"  # how errors name the positional argument
COMMANDS = {"/reset": "forget the conversation (the system prompt stays)", "/exit": "end (so do an empty line, Ctrl-D)"}
_SYSTEM_PROBE = "llama2-lit system probe 5f3e"
# Below this many parameters a model gains nothing from intra-op threads, and on a busy machine two threads make
# small ops far slower (OpenMP waits): such models decode single-threaded.
_ONE_THREAD_BELOW = 20_000_000

Log = Callable[[str], object]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ loading


def load_chat_model(path: str, device: str | torch.device | None = None, log: Log = _stderr):
    """``(model, tokenizer)`` of the causal LM folder ``path``, the model in eval mode on ``device`` (default: CUDA
    when available, else CPU; float32 on CPU, the checkpoint's own dtype on GPU). A missing folder, one without a
    ``config.json``, or one holding another kind of model (a reward model) is a :class:`UserError`."""
    src = model_folder(path, WHAT)
    hub = {} if Path(src).exists() else {"local_files_only": True}  # a hub id: from the local cache, no download
    try:
        config = AutoConfig.from_pretrained(src, trust_remote_code=False, **hub)
    except (OSError, ValueError) as e:
        if hub:
            raise UserError(f"{WHAT}: '{path}' does not exist (no such folder, nor a hub id in the local Hugging Face "
                            "cache: this command downloads nothing)") from None
        raise UserError(f"{WHAT}: could not read a model config from '{path}': {one_line(e)}") from None
    archs = list(getattr(config, "architectures", None) or [])
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise UserError(f"{WHAT}: '{path}' holds a {archs[0]}, not a causal LM (give a policy's hf/ folder, such as "
                        "a stage=sft run's)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=False, **hub)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{WHAT}: could not load a tokenizer from '{path}': {one_line(e)}") from None
    ensure_chat_template(tokenizer)  # the folder's own template; the Llama 2 one where it has none
    tokenizer.padding_side = "left"
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float32 if device.type == "cpu" else "auto"  # bf16 matmuls on CPU: slow and imprecise
    t0 = time.perf_counter()
    model = load_pretrained(AutoModelForCausalLM, src, "a causal LM", what=WHAT, dtype=dtype, **hub)
    model = model.to(device).eval()
    model.config.use_cache = True  # an exported training model says False; generation wants the cache
    n = sum(p.numel() for p in model.parameters())
    if device.type == "cpu" and n < _ONE_THREAD_BELOW:
        torch.set_num_threads(1)
    log(f"chat: {path}: {type(model).__name__}, {n / 1e6:.1f}M parameters, {device.type} "
        f"({time.perf_counter() - t0:.1f}s)")
    return model, tokenizer


def context_length(config) -> int | None:
    """The model's context in tokens (``max_position_embeddings``; GPT-2's ``n_positions``), or None if unknown."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        n = getattr(config, key, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def prompt_budget(config, max_new_tokens: int) -> int | None:
    """The most prompt tokens that leave room for ``max_new_tokens`` in the context (None: no known limit)."""
    n = context_length(config)
    if n is None:
        return None
    if max_new_tokens >= n:
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt: the model's context is {n} "
                        "tokens (max_position_embeddings)")
    return n - max_new_tokens


def system_role_problem(tokenizer) -> str:
    """'' when the chat template renders a leading system message, else what goes wrong."""
    msgs = [{"role": "system", "content": _SYSTEM_PROBE}, {"role": "user", "content": "Hello."}]
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - a template's raise_exception (jinja's TemplateError) or a broken template
        return f"it refuses one: {one_line(e)}"
    return "" if _SYSTEM_PROBE in str(text) else "it drops the system message"


def require_system_role(tokenizer, path: str = "") -> None:
    """A :class:`UserError` unless the tokenizer's chat template has a system role."""
    why = system_role_problem(tokenizer)
    if why:
        where = f" of '{path}'" if path else ""
        raise UserError(f"--system: the chat template{where} has no system role ({why}); drop --system or give a "
                        "model whose template takes a system message")


def chat_sampling(temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P,
                  max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, seed: int | None = None) -> Sampling:
    """The :class:`Sampling` of one answer; bad values are a :class:`UserError` naming the flag."""
    if not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if not (0.0 < top_p <= 1.0):  # NaN fails too
        raise UserError(f"--top-p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    return Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)


# ------------------------------------------------------------------------------------------- conversation


class Conversation:
    """One chat: an optional system prompt, then alternating user / assistant messages, answered by ``engine``.

    ``budget``: the most prompt tokens (see :func:`prompt_budget`); past it the oldest turns are dropped (the system
    prompt stays) and ``log`` says so. None: no limit.
    """

    def __init__(self, engine: Engine, sampling: Sampling, system: str | None = None, budget: int | None = None,
                 log: Log = _stderr):
        self.engine, self.sampling, self.system, self.budget, self.log = engine, sampling, system, budget, log
        self.history: list[dict] = []  # user, assistant, user, assistant, ...
        self.turn = 0  # answers since the start or the last reset: answer i is sampled with seed + i

    def messages(self, user: str | None = None) -> list[dict]:
        """The conversation as chat messages, with ``user`` as the next (open) turn."""
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        tail = [{"role": "user", "content": user}] if user is not None else []
        return head + self.history + tail

    def reset(self) -> None:
        self.history, self.turn = [], 0

    def _length(self, messages: list[dict]) -> int:
        return len(encode_prompts(self.engine.tokenizer, [messages])[0])

    def fit(self, user: str) -> list[dict]:
        """The messages to answer ``user`` with, after dropping the oldest turns that do not fit the budget."""
        msgs = self.messages(user)
        if self.budget is None:
            return msgs
        n, dropped = self._length(msgs), 0
        while n > self.budget and self.history:
            self.history = self.history[2:]  # the oldest user turn and its answer
            dropped += 1
            msgs = self.messages(user)
            n = self._length(msgs)
        if dropped:
            self.log(f"chat: the conversation outgrew the context: dropped the {dropped} oldest turn(s) to fit "
                     f"{self.budget} prompt tokens (max_position_embeddings minus --max-new-tokens)"
                     + ("; the system prompt stays" if self.system is not None else ""))
        if n > self.budget:
            what = "with the system prompt " if self.system is not None else ""
            raise UserError(f"the message is {n} tokens {what}as a prompt, past the {self.budget} the context holds "
                            "(max_position_embeddings minus --max-new-tokens): shorten it or lower --max-new-tokens")
        return msgs

    def reply(self, user: str) -> str:
        """The answer to the user turn ``user``; both join the history."""
        if not user.strip():
            raise UserError("empty message")
        msgs = self.fit(user)
        seed = None if self.sampling.seed is None else self.sampling.seed + self.turn
        rollout = self.engine.generate([msgs], dataclasses.replace(self.sampling, seed=seed))
        answer = self.engine.decode(rollout)[0]
        if not bool(rollout.finished[0]):
            self.log(f"chat: the answer was cut at --max-new-tokens {self.sampling.max_new_tokens}")
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        self.turn += 1
        return answer


def chat_loop(model, tokenizer, lines: Iterable[str], write: Callable[[str], object], *, system: str | None = None,
              sampling: Sampling | None = None, engine: Engine | None = None, log: Log = _stderr) -> int:
    """Answer the user turns in ``lines`` one by one, keeping the history; each answer goes to ``write`` followed by a
    newline. An empty line, ``/exit`` or the end of ``lines`` ends; ``/reset`` clears the history; KeyboardInterrupt
    (Ctrl-C, while reading or generating) ends cleanly. A turn that fails with a :class:`UserError` (a message too
    long for the context) is reported on ``log`` and skipped. Returns the exit code, 0.

    ``engine``: default ``Engine(model, tokenizer)``; ``sampling``: default Meta's (:func:`chat_sampling`).
    """
    sampling = sampling or chat_sampling()
    engine = engine or Engine(model, tokenizer)
    conv = Conversation(engine, sampling, system, prompt_budget(model.config, sampling.max_new_tokens), log)
    try:
        for line in lines:
            text = line.rstrip("\r\n")
            cmd = text.strip()
            if not cmd or cmd == "/exit":
                break
            if cmd == "/reset":
                conv.reset()
                log("chat: conversation cleared" + (" (the system prompt stays)" if system is not None else ""))
                continue
            if cmd.startswith("/") and " " not in cmd:
                log(f"chat: unknown command {cmd} (" + "; ".join(f"{k}: {v}" for k, v in COMMANDS.items()) + ")")
                continue
            try:
                answer = conv.reply(text)
            except UserError as e:
                log(f"error: {e}")
                continue
            write(answer + "\n")
    except KeyboardInterrupt:
        log("")  # end the line the prompt or a half-read turn left open
    return 0


def terminal_lines(prompt: str = "> ") -> Iterator[str]:
    """User turns typed at a terminal, each after ``prompt`` (on stdout when it is the terminal too, else on stderr,
    so a redirected stdout holds answers only); ends at EOF (Ctrl-D)."""
    while True:
        try:
            if sys.stdout.isatty():
                yield input(prompt)
            else:
                sys.stderr.write(prompt)
                sys.stderr.flush()
                yield input()
        except EOFError:
            _stderr("")
            return


# ----------------------------------------------------------------------------------------------- the CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message; the project's convention is one line
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m llama2_lit.chat", description=__doc__.split("\n\n")[0],
                 formatter_class=argparse.RawDescriptionHelpFormatter,
                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("folder", help="a causal LM folder with its tokenizer (a run's hf/, SmolLM2-Instruct, ...)")
    ap.add_argument("--system", help="a system prompt, the first message of the conversation")
    ap.add_argument("--prompt", help="answer this one user message on stdout and exit (no interaction)")
    ap.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                    help=f"sampling temperature, 0 = greedy (default {DEFAULT_TEMPERATURE}, as Meta's generation.py)")
    ap.add_argument("--top-p", type=float, default=DEFAULT_TOP_P,
                    help=f"nucleus sampling threshold in (0, 1] (default {DEFAULT_TOP_P}, as Meta's generation.py)")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help=f"the longest answer in tokens (default {DEFAULT_MAX_NEW_TOKENS}, or half the context of a "
                         "model whose context is shorter than twice that)")
    ap.add_argument("--seed", type=int, default=None, help="answer i of a conversation is sampled with seed + i")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    return ap


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
        hf_logging.disable_progress_bar()  # no "Loading weights" bar between the prompts
        sampling = chat_sampling(args.temperature, args.top_p, DEFAULT_MAX_NEW_TOKENS if args.max_new_tokens is None
                                 else args.max_new_tokens, args.seed)
        for flag, value in (("--prompt", args.prompt), ("--system", args.system)):
            if value is not None and not value.strip():
                raise UserError(f"{flag} is empty")
        model, tokenizer = load_chat_model(args.folder, args.device)
        if args.system is not None:
            require_system_role(tokenizer, args.folder)
        n = context_length(model.config)
        if args.max_new_tokens is None and n is not None and sampling.max_new_tokens > n // 2:
            sampling = dataclasses.replace(sampling, max_new_tokens=max(1, n // 2))  # room for the prompt too
        engine = Engine(model, tokenizer)
        budget = prompt_budget(model.config, sampling.max_new_tokens)
        _stderr(f"chat: temperature {sampling.temperature}, top-p {sampling.top_p}, up to {sampling.max_new_tokens} "
                f"new tokens, seed {sampling.seed}, context {n} tokens, "
                f"{engine.backend} backend")
        if args.prompt is not None:
            _write(Conversation(engine, sampling, args.system, budget).reply(args.prompt) + "\n")
            return 0
        interactive = sys.stdin.isatty()
        if interactive:
            _stderr("chat: " + "; ".join(f"{k} to {v}" for k, v in COMMANDS.items()) + "; Ctrl-C ends at any time")
        lines = terminal_lines() if interactive else sys.stdin
        return chat_loop(model, tokenizer, lines, _write, system=args.system, sampling=sampling, engine=engine)
    except UserError as e:
        _stderr(f"error: {one_line(e)}")
        return 2
    except KeyboardInterrupt:  # Ctrl-C while loading or answering --prompt
        _stderr("")
        return 0


if __name__ == "__main__":
    sys.exit(main())
