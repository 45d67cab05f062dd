"""sdpa_packed: packed rows attended one document at a time give sdpa's numbers (logits and gradients)."""
import pytest
import torch

from data_modules.packing import pack
from data_modules.sft import collate_rows
from llama2_lit.core.losses import masked_lm_loss
from llama2_lit.models import packed_attention
from llama2_lit.models.packed_attention import PackedRows, documents, packed_sdpa_mask


def test_documents_group_equal_lengths_by_hand():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 3]])  # docs: row 0 = 3, 2, 1 tokens; row 1 = 2, 4
    d = documents(pos)
    # longest first, ties in token order: row1's 4 (tokens 8-11), row0's 3 (0-2), row0's 2 (3-4), row1's 2 (6-7), 1 (5)
    assert d.order.tolist() == [8, 9, 10, 11, 0, 1, 2, 3, 4, 6, 7, 5]
    assert d.groups == [(4, 1), (3, 1), (2, 2), (1, 1)] and d.count == 5
    assert d.order[d.inverse].tolist() == list(range(12))


def test_documents_split_where_positions_do_not_step_by_one():
    d = documents(torch.tensor([[5, 6, 7, 2, 3, 9]]))  # as transformers splits: 5-7 | 2-3 | 9
    assert d.groups == [(3, 1), (2, 1), (1, 1)]


def test_mask_function_marks_only_packed_batches():
    common = dict(batch_size=2, q_length=8, kv_length=8, q_offset=0, kv_offset=0)
    assert isinstance(packed_sdpa_mask(**common, allow_is_causal_skip=False), PackedRows)  # what packing looks like
    assert packed_sdpa_mask(**common, allow_is_causal_skip=True) is None  # plain causal: sdpa's is_causal skip
    padded = packed_sdpa_mask(**common, attention_mask=torch.ones(2, 8, dtype=torch.bool).tril(1),
                              allow_is_causal_skip=False)
    assert isinstance(padded, torch.Tensor) and padded.shape == (2, 1, 8, 8)
    cached = packed_sdpa_mask(batch_size=1, q_length=1, kv_length=9, q_offset=8, kv_offset=0,
                              allow_is_causal_skip=False)
    assert isinstance(cached, torch.Tensor)


def _model(tok, attn):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg)


def _packed_batch(tok):
    from data_modules.records import tokenize_chat

    convs = [("Reverse the word: lemon", "nomel"), ("What is 12 + 30?", "42"),
             ("Repeat the word dog 2 times.", "dog dog"), ("Sort the digits: 3 1 2", "1 2 3"),
             ("Uppercase the word: cat", "CAT"), ("What is 1 + 1?", "2"), ("The PIN is 4821. What is the PIN?", "4821")]
    examples = [tokenize_chat([{"role": "user", "content": p}, {"role": "assistant", "content": a}], tok)
                for p, a in convs]
    rows, _ = pack(examples, seq_len=40, pad_id=tok.pad_token_id, packing="isolated")
    batch = collate_rows(rows, tok.pad_token_id)
    assert len(rows) >= 3 and (batch["input_ids"] == tok.pad_token_id).any()  # several rows, some padding
    return batch


@pytest.mark.parametrize("train", [False, True])
def test_packed_logits_and_gradients_equal_sdpa(tok, train, monkeypatch):
    batch = _packed_batch(tok)
    out = {}
    for attn in ("sdpa", packed_attention.NAME):
        model = _model(tok, attn).train(train)
        if attn != "sdpa":  # the packed batch must take the per-document path, not fall back to a dense mask
            monkeypatch.setattr(packed_attention, "sdpa_attention_forward", None)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        masked_lm_loss(logits, batch["labels"]).backward()
        out[attn] = (logits.detach(), {n: p.grad for n, p in model.named_parameters()})
    (ref, ref_grads), (got, got_grads) = out["sdpa"], out[packed_attention.NAME]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    for name, g in ref_grads.items():
        torch.testing.assert_close(got_grads[name], g, atol=1e-6, rtol=1e-4, msg=name)


def test_unpacked_batches_take_sdpa_unchanged(tok):
    ref, got = _model(tok, "sdpa").eval(), _model(tok, packed_attention.NAME).eval()
    ids = torch.randint(5, len(tok), (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0  # left padding, as for generation
    with torch.no_grad():
        for kwargs in ({"input_ids": ids}, {"input_ids": ids, "attention_mask": mask}):
            assert torch.equal(got(**kwargs, use_cache=False).logits, ref(**kwargs, use_cache=False).logits)
        gen = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        assert torch.equal(got.generate(ids, **gen), ref.generate(ids, **gen))


def test_load_causal_lm_runs_sdpa_as_sdpa_packed(tok):
    from llama2_lit.models.loading import load_causal_lm

    model = load_causal_lm({"config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                       "num_attention_heads": 4, "num_key_value_heads": 4}}, tok)
    assert model.config._attn_implementation == packed_attention.NAME
    eager = load_causal_lm({"attn_implementation": "eager", "config": {"hidden_size": 32, "intermediate_size": 64,
                                                                        "num_hidden_layers": 1}}, tok)
    assert eager.config._attn_implementation == "eager"
