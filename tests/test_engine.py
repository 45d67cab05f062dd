"""The generation engine against HF generate: token-identical greedy, matching log-probs, seeded sampling."""
import pytest
import torch

from llama2_lit.generation.engine import Engine, Sampling, encode_prompts, left_pad, sample_tokens, top_p_filter
from llama2_lit.errors import UserError
from llama2_lit.models.loading import load_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: single-threaded tiny models


PROMPTS = ["Reverse the word: lemon", "What is 23 + 7?", "Sort the digits: 5 2 9 1",
           "The PIN is 4821. Never tell it. What is the PIN?", "Uppercase the word: cat"]
DIMS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True, initializer_range=0.2)


def tiny(tok, seed=0, **over):
    torch.manual_seed(seed)
    return load_causal_lm({"config": {**DIMS, **over}}, tok).eval()


def batch(tok, prompts=PROMPTS):
    return left_pad(encode_prompts(tok, prompts), tok.pad_token_id)


def partial_stop(rows: torch.Tensor) -> int:
    """A generated token found in some rows but not all (it stands in for EOS, so rows stop at different steps)."""
    for t in rows.flatten().tolist():
        if 0 < int((rows == t).any(1).sum()) < rows.shape[0]:
            return int(t)
    raise AssertionError("no token splits the rows")


def hf_generate(model, tok, ids, mask, max_new_tokens, eos, k=1):
    with torch.no_grad():
        ids, mask = ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)  # HF: greedy has no K > 1
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tok.pad_token_id, eos_token_id=eos,
                             output_logits=True, return_dict_in_generate=True)
    new = out.sequences[:, ids.shape[1]:]
    lp = torch.stack([torch.log_softmax(x.float(), -1) for x in out.logits], 1).gather(2, new[..., None])[..., 0]
    return new, lp


@pytest.mark.parametrize("kv_heads,backend", [(4, "llama"), (2, "llama"), (4, "hf")])
def test_greedy_is_token_identical_to_hf_generate_with_matching_logprobs(tok, kv_heads, backend):
    model = tiny(tok, num_key_value_heads=kv_heads)
    ids, mask = batch(tok)
    assert (mask == 0).any()  # prompts of different lengths: left padding is exercised
    probe, _ = hf_generate(model, tok, ids, mask, 12, tok.eos_token_id)
    eos = partial_stop(probe)
    new, lp = hf_generate(model, tok, ids, mask, 12, eos, k=2)
    out = Engine(model, tok, backend=backend).generate_ids(ids, mask, Sampling(max_new_tokens=12, temperature=0,
                                                                               num_samples=2, stop_ids=(eos,)))
    assert out.response_ids.shape == new.shape
    assert torch.equal(out.response_ids, new)
    stopped = (new == eos).any(1)
    assert stopped.any() and not stopped.all()
    assert torch.equal(out.finished, stopped)
    # the mask covers the generated tokens up to and including the stop token; padding after it
    first_stop = torch.where(stopped, (new == eos).int().argmax(1), new.shape[1] - 1)
    expect_mask = (torch.arange(new.shape[1])[None] <= first_stop[:, None]).long()
    assert torch.equal(out.response_mask, expect_mask)
    assert (out.response_ids[out.response_mask == 0] == tok.pad_token_id).all()
    torch.testing.assert_close(out.logprobs[expect_mask.bool()], lp[expect_mask.bool()], atol=1e-5, rtol=0)
    assert (out.logprobs[expect_mask == 0] == 0).all()
    assert torch.equal(out.prompt_index, torch.arange(len(PROMPTS)).repeat_interleave(2))


def test_sampled_logprobs_equal_a_teacher_forced_forward(tok):
    model = tiny(tok, seed=1)
    ids, mask = batch(tok)
    t = 0.7
    out = Engine(model, tok).generate_ids(ids, mask, Sampling(max_new_tokens=10, temperature=t, top_p=0.9,
                                                              num_samples=3, seed=5))
    seq, seq_mask = out.sequences()
    pos = (seq_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=seq, attention_mask=seq_mask, position_ids=pos).logits.float()
    p = ids.shape[1]
    lp = torch.log_softmax(logits[:, p - 1:-1] / t, -1).gather(2, out.response_ids[..., None])[..., 0]
    m = out.response_mask.bool()
    torch.testing.assert_close(out.logprobs[m], lp[m], atol=1e-4, rtol=0)


def test_seeded_sampling_is_reproducible_and_independent_of_row_compaction(tok):
    model = tiny(tok, seed=2)
    ids, mask = batch(tok)
    eng = Engine(model, tok)
    probe = eng.generate_ids(ids, mask, Sampling(max_new_tokens=8, temperature=0))
    eos = partial_stop(probe.response_ids)
    s = Sampling(max_new_tokens=16, temperature=1.0, num_samples=4, seed=11, stop_ids=(eos,))
    a, b = eng.generate_ids(ids, mask, s), eng.generate_ids(ids, mask, s)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
    c = eng.generate_ids(ids, mask, Sampling(max_new_tokens=16, temperature=1.0, num_samples=4, seed=12,
                                             stop_ids=(eos,)))
    assert not torch.equal(a.response_ids, c.response_ids)
    assert a.finished.any()  # some rows stopped early, so compaction ran
    plain = Engine(model, tok, compact=False).generate_ids(ids, mask, s)
    assert torch.equal(a.response_ids, plain.response_ids)
    torch.testing.assert_close(a.logprobs, plain.logprobs, atol=1e-5, rtol=0)
    # the same prompt's K samples differ (independent draws)
    assert len({tuple(r.tolist()) for r in a.response_ids[:4]}) > 1


def test_top_p_filter_equals_hf_warper():
    from transformers.generation.logits_process import TopPLogitsWarper

    torch.manual_seed(0)
    scores = torch.randn(16, 50) * 3
    for p in (0.1, 0.5, 0.9, 0.99):
        torch.testing.assert_close(top_p_filter(scores, p), TopPLogitsWarper(p)(None, scores.clone()))


def test_sampler_draws_from_the_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]]).repeat(40000, 1)
    g = torch.Generator().manual_seed(0)
    tok, lp = sample_tokens(logits, 0.5, 1.0, torch.rand((40000, 1), generator=g))
    freq = torch.bincount(tok, minlength=5).double() / 40000
    expect = torch.softmax(logits[0] / 0.5, -1).double()
    assert (freq - expect).abs().max() < 0.01
    assert freq[4] == 0
    torch.testing.assert_close(lp, torch.log_softmax(logits / 0.5, -1).gather(1, tok[:, None])[:, 0])
    # top-p keeps the nucleus only: with p = 0.5 the first token alone holds 0.86 of the mass
    tok, _ = sample_tokens(logits[:100], 0.5, 0.5, torch.rand((100, 1), generator=g))
    assert (tok == 0).all()


def test_generate_text_batches_prompts_and_returns_hf_generate_texts(tok):
    """``Engine.generate_text`` chunks the prompts (``batch_size`` per call, call ``i`` seeded ``seed + i``) and returns
    ``num_samples`` texts per prompt: the same texts (greedy) as HF generate."""
    model = tiny(tok, seed=3)
    ids, mask = batch(tok)
    new, _ = hf_generate(model, tok, ids, mask, 8, tok.eos_token_id)
    expect = [[t.strip()] for t in tok.batch_decode(new, skip_special_tokens=True)]
    eng = Engine(model, tok)
    assert eng.generate_text(PROMPTS, Sampling(max_new_tokens=8, temperature=0.0), batch_size=2) == expect
    sampled = Sampling(max_new_tokens=6, temperature=1.0, num_samples=3, seed=0)
    outs = eng.generate_text(PROMPTS[:2], sampled)
    assert [len(o) for o in outs] == [3, 3]
    assert outs == eng.generate_text(PROMPTS[:2], sampled) and eng.generate_text([], sampled) == []


def test_bad_input_is_refused(tok):
    model = tiny(tok)
    eng = Engine(model, tok)
    with pytest.raises(UserError, match="num_samples"):
        Sampling(num_samples=0)
    with pytest.raises(UserError, match="no prompts"):
        eng.generate([])
    with pytest.raises(UserError, match="empty prompt"):
        eng.generate(["What is 2 + 2?", "  "])
    with pytest.raises(UserError, match="top_p"):
        Sampling(top_p=0.0)
    with pytest.raises(UserError, match="backend"):
        Engine(model, tok, backend="vllm")


def test_training_mode_is_restored_and_weights_are_live(tok):
    model = tiny(tok).train()
    eng = Engine(model, tok)
    ids, mask = batch(tok, PROMPTS[:2])
    a = eng.generate_ids(ids, mask, Sampling(max_new_tokens=6, temperature=0))
    assert model.training
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # the engine reads the current parameters at every call
    b = eng.generate_ids(ids, mask, Sampling(max_new_tokens=6, temperature=0))
    assert not torch.equal(a.response_ids, b.response_ids)


def test_float32_weights_under_bf16_autocast_sample_as_the_bf16_model(tok):
    """bf16-mixed (float32 master weights, autocast bf16): the llama backend samples in bf16 over a copy of the
    weights, exactly as a bf16 copy of the model does without autocast (the KV cache used to be float32 and the
    first decode step failed: index_copy_ of bf16 values into a float32 cache); the copy follows the weights."""
    import copy

    model = tiny(tok, seed=3).train()
    bf16 = copy.deepcopy(model)
    for p in bf16.parameters():  # the parameters only: RoPE's inverse frequencies stay float32, as the copy's
        p.data = p.data.to(torch.bfloat16)
    ids, mask = batch(tok)
    s = Sampling(max_new_tokens=8, temperature=1.0, seed=11)
    eng = Engine(model, tok)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = eng.generate_ids(ids, mask, s)
    want = Engine(bf16, tok).generate_ids(ids, mask, s)
    assert torch.equal(got.response_ids, want.response_ids)
    assert torch.equal(got.logprobs, want.logprobs)
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the model itself is untouched
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        again = eng.generate_ids(ids, mask, s)
    assert not torch.equal(again.response_ids, got.response_ids)  # a new parameter version: a new copy


@pytest.mark.slow
def test_compiled_decode_step_matches_eager(tok):
    model = tiny(tok)
    ids, mask = batch(tok)
    s = Sampling(max_new_tokens=8, temperature=0)
    a = Engine(model, tok).generate_ids(ids, mask, s)
    b = Engine(model, tok, compile=True).generate_ids(ids, mask, s)
    assert torch.equal(a.response_ids, b.response_ids)
