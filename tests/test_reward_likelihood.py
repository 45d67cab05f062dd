"""reward.head=likelihood: a reward model that keeps its chat checkpoint's LM head and scores an answer by its mean
token log-prob. Hand-computed rewards against the checkpoint's own log-probs, padding invariance, the export round
trip through load_exported / score, and the configuration errors."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from data_modules.records import render
from llama2_lit.core.losses import ranking_loss
from llama2_lit.errors import UserError
from llama2_lit.models.loading import llama_config
from llama2_lit.models.reward import load_exported, load_reward_model, reward_head, rewards, score
from tests.test_reward import CHOSEN, PROMPTS, REJECTED, TINY, _batch


@pytest.fixture
def checkpoint(tok, tmp_path):
    """A random causal LM saved as a chat checkpoint, and the model itself."""
    torch.manual_seed(3)
    lm = LlamaForCausalLM(llama_config(tok, TINY["config"])).eval()
    lm.save_pretrained(tmp_path / "lm")
    return str(tmp_path / "lm"), lm


def _mean_answer_logprob(lm, ids: list[int], start: int) -> float:
    """By hand: log p(token t | tokens < t) for t = start .. end, averaged; one unpadded sequence."""
    with torch.no_grad():
        logp = torch.log_softmax(lm(torch.tensor([ids])).logits[0].double(), -1)
    return sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids))) / (len(ids) - start)


def test_the_reward_is_the_checkpoints_mean_answer_logprob(tok, checkpoint):
    from llama2_lit.modules.reward import RewardModule

    path, lm = checkpoint
    m = RewardModule({**TINY, "path": path}, tokenizer=tok, head="likelihood", contrast=0.0).eval()
    assert reward_head(m.model) == "likelihood" and type(m.model).__name__ == "LlamaForCausalLM"
    enc, batch = _batch(tok)
    assert len({len(p.chosen) for p in enc} | {len(p.rejected) for p in enc}) > 2  # real padding in play
    with torch.no_grad():
        chosen, rejected = m.pair_rewards(batch)
    want_c = [_mean_answer_logprob(lm, p.chosen, p.chosen_start) for p in enc]
    want_r = [_mean_answer_logprob(lm, p.rejected, p.rejected_start) for p in enc]
    torch.testing.assert_close(chosen.double(), torch.tensor(want_c, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(rejected.double(), torch.tensor(want_r, dtype=torch.float64), atol=1e-5, rtol=0)
    # the answer starts after the generation prompt: the template's end-of-turn token is part of it
    assert all(p.chosen[-1] == tok.eos_token_id and p.chosen_start < len(p.chosen) for p in enc)
    # the ranking loss reads these rewards like a scalar head's
    with torch.no_grad():
        loss, c, r = m._step(batch, "val")
    torch.testing.assert_close(loss, ranking_loss(c, r, batch["margin"]))


def test_contrast_subtracts_the_prompt_free_logprob(tok, checkpoint):
    from llama2_lit.modules.reward import RewardModule

    path, lm = checkpoint
    m = RewardModule({**TINY, "path": path}, tokenizer=tok, head="likelihood", contrast=0.5).eval()
    empty = render(tok, [{"role": "user", "content": ""}], add_generation_prompt=True)
    assert m.model.config.reward_prompt_free_ids == empty and empty[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    enc, batch = _batch(tok)
    with torch.no_grad():
        chosen, rejected = m.pair_rewards(batch)
    for got, side, start in ((chosen, "chosen", "chosen_start"), (rejected, "rejected", "rejected_start")):
        want = []
        for p in enc:
            ids, s = getattr(p, side), getattr(p, start)
            free = empty + ids[s:]  # the same answer tokens after an empty user turn
            want.append(_mean_answer_logprob(lm, ids, s) - 0.5 * _mean_answer_logprob(lm, free, len(empty)))
        torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-5, rtol=0)
    # a fixed answer whatever the question: its prompt-free likelihood is the same for every prompt, so the contrast
    # shifts its reward by one constant and keeps the ranking among prompts (a sanity check of the second forward)
    refusal = "Sorry, I can't share that."
    plain = RewardModule({**TINY, "path": path}, tokenizer=tok, head="likelihood", contrast=0.0).eval()
    a, b = score(m.model, tok, PROMPTS[:3], [refusal] * 3), score(plain.model, tok, PROMPTS[:3], [refusal] * 3)
    shift = b - a
    torch.testing.assert_close(shift, shift[:1].expand(3), atol=1e-5, rtol=0)


def test_training_moves_the_lm_head_and_the_ranking(tok, checkpoint):
    from llama2_lit.modules.reward import RewardModule

    path, lm = checkpoint
    m = RewardModule({**TINY, "path": path}, tokenizer=tok, head="likelihood")
    _, batch = _batch(tok)
    opt = torch.optim.SGD(m.model.parameters(), lr=0.5)
    with torch.no_grad():
        c0, r0 = m.pair_rewards(batch)
    for _ in range(3):
        loss, _, _ = m._step(batch, "val")
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        c1, r1 = m.pair_rewards(batch)
    assert ((c1 - r1) - (c0 - r0)).min() > 0  # every pair's gap grew
    assert not torch.equal(m.model.lm_head.weight, lm.lm_head.weight)


def test_export_round_trip_scores_identically(tok, checkpoint, tmp_path):
    from llama2_lit.modules.reward import RewardModule

    path, _ = checkpoint
    m = RewardModule({**TINY, "path": path}, tokenizer=tok, head="likelihood", contrast=0.5,
                     reward_name="helpfulness").eval()
    _, batch = _batch(tok)
    with torch.no_grad():
        chosen, rejected = m.pair_rewards(batch)
    m.export(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["reward_head"] == "likelihood"
    assert cfg["reward_contrast"] == 0.5 and cfg["reward_prompt_free_ids"] == m.model.config.reward_prompt_free_ids
    assert cfg["llama2_lit"] == {"reward": "helpfulness"}
    rm, tok2 = load_exported(tmp_path / "hf")
    assert reward_head(rm) == "likelihood"
    # rendered from text, scored in length-sorted right-padded batches of other sizes: the same rewards
    torch.testing.assert_close(score(rm, tok2, PROMPTS, CHOSEN, batch_size=3), chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(score(rm, tok2, PROMPTS, REJECTED, batch_size=2), rejected, atol=1e-5, rtol=0)
    torch.testing.assert_close(m.score(PROMPTS, CHOSEN), chosen, atol=1e-5, rtol=0)


def test_configuration_errors(tok, checkpoint, tmp_path):
    path, _ = checkpoint
    with pytest.raises(UserError, match="reward.head: unknown 'token'"):
        load_reward_model({**TINY, "path": path}, tok, head="token")
    rm = load_reward_model({**TINY, "path": path}, tok, head="likelihood")
    ids = torch.tensor([[1, 5, 6]])
    with pytest.raises(ValueError, match="needs the answer mask"):
        rewards(rm, ids, torch.ones_like(ids))
    # a folder whose config names an unknown head is refused with its path
    rm.config.reward_head = "token"
    rm.save_pretrained(tmp_path / "bad")
    tok.save_pretrained(tmp_path / "bad")
    with pytest.raises(UserError, match="reward_head 'token' is none of scalar, likelihood"):
        load_exported(tmp_path / "bad")


def test_stage_rm_trains_a_likelihood_head_end_to_end(make_cfg, tmp_path):
    from llama2_lit.run import run
    from tests.test_reward import RM

    metrics = run(make_cfg(*RM, "reward.head=likelihood"))
    assert metrics["trainer/steps"] == 3 and 0.0 <= metrics["val/accuracy"] <= 1.0
    rm, _ = load_exported(tmp_path / "hf")
    assert reward_head(rm) == "likelihood" and type(rm).__name__ == "LlamaForCausalLM"
