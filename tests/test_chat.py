"""python -m llama2_lit.chat: --prompt prints exactly the Engine's answer (Meta's sampling defaults), the interactive
loop keeps the history (system prompt first, /reset, /exit, Ctrl-C), the context overflow drops the oldest turns,
and bad input is one line with exit code 2."""
import copy
import os
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from llama2_lit.chat import (DEFAULT_MAX_NEW_TOKENS, Conversation, chat_loop, chat_sampling, main, parser,
                             require_system_role, system_role_problem)
from llama2_lit.errors import UserError
from llama2_lit.generation.engine import Engine, Sampling
from llama2_lit.generation.sampling import encode_prompts
from llama2_lit.models.loading import load_causal_lm
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: single-threaded tiny models

DIMS = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "max_position_embeddings": 256}
QUESTION = "What is 2 + 3?"
SYSTEM = "Answer in one line."
SMOLLM2 = ROOT / "checkpoints" / "smollm2-135m-instruct"


def _save(model, tok, path):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tok):
    """A random-init tiny Llama policy with the world tokenizer, saved as an hf folder."""
    torch.manual_seed(0)
    return _save(load_causal_lm({"config": DIMS}, tok), tok, tmp_path_factory.mktemp("chat") / "policy")


@pytest.fixture(scope="module")
def policy(folder):
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


class Spy(Engine):
    """An Engine that records the chat prompts it is asked to answer."""

    def __init__(self, model, tokenizer, fail: BaseException | None = None):
        super().__init__(model, tokenizer)
        self.prompts, self.fail = [], fail

    def generate(self, prompts, sampling=Sampling()):
        self.prompts.append([dict(m) for m in prompts[0]])
        if self.fail is not None:
            raise self.fail
        return super().generate(prompts, sampling)


def _loop(model, tok, lines, engine=None, **kw):
    out, log = [], []
    engine = engine or Spy(model, tok)
    kw.setdefault("sampling", chat_sampling(max_new_tokens=8, seed=0))
    rc = chat_loop(model, tok, lines, out.append, engine=engine, log=log.append, **kw)
    return rc, out, log, engine


def test_defaults_are_meta_generation_py():
    a = parser().parse_args(["x"])
    assert (a.temperature, a.top_p, a.seed) == (0.6, 0.9, None) and a.max_new_tokens is None  # None: 512 below
    assert DEFAULT_MAX_NEW_TOKENS == 512
    s = chat_sampling()
    assert (s.temperature, s.top_p, s.max_new_tokens, s.num_samples) == (0.6, 0.9, 512, 1)


def test_prompt_prints_the_engines_answer_only(folder, policy):
    model, tok = policy
    want = Engine(model, tok).generate_text([QUESTION], Sampling(max_new_tokens=8, temperature=0.6, top_p=0.9,
                                                                 seed=0))[0][0]
    assert want  # a random model's 8 tokens: something to compare
    r = subprocess.run([sys.executable, "-m", "llama2_lit.chat", str(folder), "--prompt", QUESTION, "--seed", "0",
                        "--max-new-tokens", "8"], capture_output=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode("utf-8") == want + "\n"
    assert "Traceback" not in r.stderr.decode()


def test_prompt_in_process_with_system(folder, policy, capsys):
    model, tok = policy
    want = Engine(model, tok).generate_text([[{"role": "system", "content": SYSTEM},
                                              {"role": "user", "content": QUESTION}]],
                                            Sampling(max_new_tokens=8, temperature=0.6, top_p=0.9, seed=3))[0][0]
    assert main([str(folder), "--prompt", QUESTION, "--system", SYSTEM, "--seed", "3", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == want + "\n"


def test_two_turns_keep_history_and_reset_clears_it(policy):
    model, tok = policy
    rc, out, log, spy = _loop(model, tok, [QUESTION, "And 4 + 4?", "/reset", QUESTION], system=SYSTEM)
    assert rc == 0 and len(out) == 3 and all(o.endswith("\n") for o in out)
    first = out[0][:-1]
    sys_msg, q1 = {"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}
    assert spy.prompts[0] == [sys_msg, q1]
    assert spy.prompts[1] == [sys_msg, q1, {"role": "assistant", "content": first},
                              {"role": "user", "content": "And 4 + 4?"}]
    text = tok.apply_chat_template(spy.prompts[1], tokenize=False, add_generation_prompt=True)
    assert first and first in text and text.index(SYSTEM) < text.index(QUESTION) < text.index(first)
    assert spy.prompts[2] == [sys_msg, q1]  # /reset: the history is gone, the system prompt stays first
    assert out[2] == out[0]  # and the turn count restarts: the same seed, the same answer
    assert any("cleared" in m for m in log)


@pytest.mark.parametrize("end", ["", "/exit", "  "])
def test_empty_line_or_exit_ends(policy, end):
    model, tok = policy
    rc, out, _, spy = _loop(model, tok, [QUESTION, end, "never read"])
    assert rc == 0 and len(out) == 1 and len(spy.prompts) == 1


def test_unknown_command_is_not_sent(policy):
    model, tok = policy
    rc, out, log, spy = _loop(model, tok, ["/help", QUESTION])
    assert rc == 0 and len(out) == 1 and spy.prompts == [[{"role": "user", "content": QUESTION}]]
    assert any("unknown command /help" in m for m in log)


def test_ctrl_c_while_reading_ends_cleanly(policy):
    model, tok = policy

    def lines():
        yield QUESTION
        raise KeyboardInterrupt

    rc, out, _, _ = _loop(model, tok, lines())
    assert rc == 0 and len(out) == 1


def test_ctrl_c_while_generating_ends_cleanly(policy):
    model, tok = policy
    rc, out, _, spy = _loop(model, tok, [QUESTION, "never read"], engine=Spy(model, tok, fail=KeyboardInterrupt()))
    assert rc == 0 and out == [] and len(spy.prompts) == 1


def test_context_overflow_drops_the_oldest_turns_keeps_the_system_prompt(tok):
    torch.manual_seed(1)
    model = load_causal_lm({"config": {**DIMS, "max_position_embeddings": 64}}, tok)
    sampling = chat_sampling(max_new_tokens=8, seed=0)
    budget = 64 - 8
    turns = [f"What is {a} + {a + 1}?" for a in range(10, 20)]
    rc, out, log, spy = _loop(model, tok, turns, system="Be brief.", sampling=sampling)
    assert rc == 0 and len(out) == len(turns)
    assert max(len(ids) for ids in encode_prompts(tok, spy.prompts)) <= budget
    dropped = [m for m in log if "dropped" in m]
    assert dropped and "oldest turn" in dropped[0] and "system prompt stays" in dropped[0]
    assert all(p[0] == {"role": "system", "content": "Be brief."} for p in spy.prompts)
    last = spy.prompts[-1]
    assert last[-1] == {"role": "user", "content": turns[-1]}
    assert {"role": "user", "content": turns[0]} not in last  # the oldest turn went first
    assert len(last) < 2 * len(turns)
    # roles still alternate after the system prompt
    assert [m["role"] for m in last[1:]] == ["user", "assistant"] * ((len(last) - 2) // 2) + ["user"]


def test_a_message_longer_than_the_context_is_skipped_with_an_error(tok):
    torch.manual_seed(1)
    model = load_causal_lm({"config": {**DIMS, "max_position_embeddings": 64}}, tok)
    rc, out, log, spy = _loop(model, tok, ["word " * 100, QUESTION])
    assert rc == 0 and len(out) == 1 and len(spy.prompts) == 1
    assert any(m.startswith("error: the message is") and "context" in m for m in log)
    conv = Conversation(Engine(model, tok), chat_sampling(max_new_tokens=8), budget=56, log=log.append)
    with pytest.raises(UserError, match="past the 56"):
        conv.reply("word " * 100)


def test_system_role_is_checked(tok):
    assert system_role_problem(tok) == ""
    t = copy.deepcopy(tok)
    t.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                       "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    assert "System role not supported" in system_role_problem(t)
    with pytest.raises(UserError, match=r"--system: the chat template of 'x' has no system role"):
        require_system_role(t, "x")
    t.chat_template = "{% for m in messages %}{% if m['role'] != 'system' %}{{ m['content'] }}{% endif %}{% endfor %}"
    assert system_role_problem(t) == "it drops the system message"


@pytest.fixture(scope="module")
def bad_folders(tmp_path_factory, tok, folder):
    root = tmp_path_factory.mktemp("chat_bad")
    (root / "empty").mkdir()
    cfg = LlamaConfig(vocab_size=len(tok), **DIMS, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    _save(LlamaForSequenceClassification(cfg), tok, root / "rm")
    model = AutoModelForCausalLM.from_pretrained(folder)
    t = AutoTokenizer.from_pretrained(folder)
    t.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                       "supported') }}{% endif %}{{ m['content'] }}{% endfor %}")  # a template without a system role
    _save(model, t, root / "nosys")
    return root


@pytest.mark.parametrize("case,args,match", [
    ("missing", ["{root}/nope"], r"hf folder: '.*nope' does not exist"),
    ("no config", ["{root}/empty"], r"holds no config.json"),
    ("reward model", ["{root}/rm"], r"holds a LlamaForSequenceClassification, not a causal LM"),
    ("temperature", ["{folder}", "--temperature", "-0.1"], r"--temperature must be >= 0"),
    ("top-p 0", ["{folder}", "--top-p", "0"], r"--top-p must be in \(0, 1\], got 0.0"),
    ("top-p > 1", ["{folder}", "--top-p", "1.5"], r"--top-p must be in \(0, 1\], got 1.5"),
    ("not a number", ["{folder}", "--temperature", "warm"], r"argument --temperature: invalid float value"),
    ("no room", ["{folder}", "--max-new-tokens", "256"], r"--max-new-tokens 256 leaves no room"),
    ("no system role", ["{root}/nosys", "--system", "Be brief."], r"--system: the chat template .* no system role"),
    ("empty prompt", ["{folder}", "--prompt", " "], r"--prompt is empty"),
    ("no new tokens", ["{folder}", "--max-new-tokens", "0"], r"--max-new-tokens must be >= 1, got 0"),
])
def test_bad_input_is_one_line_and_exit_2(bad_folders, folder, capsys, case, args, match):
    argv = [a.format(root=bad_folders, folder=folder) for a in args]
    argv += [] if "--prompt" in argv else ["--prompt", "hi"]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors (still one line: chat._Parser)
        rc = e.code
    cap = capsys.readouterr()
    assert rc == 2 and cap.out == "", case
    err = [line for line in cap.err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and re.search(match, err[0]), cap.err
    assert "Traceback" not in cap.err


def test_bad_folder_through_the_cli_is_one_line_exit_2(tmp_path):
    """The in-process cases above, as a real process: exit code 2, one line on stderr, nothing on stdout."""
    r = subprocess.run([sys.executable, "-m", "llama2_lit.chat", str(tmp_path / "nope"), "--temperature", "0.5"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"error: hf folder: '{tmp_path / 'nope'}' does not exist\n"


@pytest.mark.slow
def test_chat_with_a_tiny_sft_run(make_cfg, tmp_path):
    from llama2_lit.run import run

    run(make_cfg("stage=sft", out=tmp_path / "sft"))
    lines = [QUESTION, "What is 10 + 11?", "/reset", QUESTION]
    r = subprocess.run([sys.executable, "-m", "llama2_lit.chat", str(tmp_path / "sft" / "hf"), "--seed", "0",
                        "--max-new-tokens", "16", "--system", SYSTEM], input="\n".join(lines) + "\n",
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    answers = r.stdout.split("\n")[:-1]
    assert len(answers) == 3 and answers[0] == answers[2]


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2.is_dir(), reason=f"{SMOLLM2} absent")
def test_smollm2_answers_a_prompt():
    r = subprocess.run([sys.executable, "-m", "llama2_lit.chat", str(SMOLLM2), "--prompt", QUESTION, "--system",
                        "You are a helpful assistant.", "--seed", "0", "--max-new-tokens", "16"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n") and r.stdout.strip()
