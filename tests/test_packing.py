import pytest
import torch

from data_modules.packing import _best_fit_decreasing, _closest_subset, _fill_and_close, pack
from data_modules.records import tokenize_chat, tokenize_text
from data_modules.sft import collate_rows
from llama2_lit.core.losses import IGNORE_INDEX

M = IGNORE_INDEX


def ex(n_prompt, n_answer, start=10):
    ids = list(range(start, start + n_prompt + n_answer))
    return ids, [M] * n_prompt + ids[n_prompt:]


def test_isolated_rows_positions_and_labels_by_hand():
    a, b, c = ex(2, 2, 10), ex(1, 2, 20), ex(3, 3, 30)  # lengths 4, 3, 6
    rows, stats = pack([a, b, c], seq_len=8, pad_id=0, packing="isolated")
    # fill-and-close: a (4) would leave less than the longest example (6), so the row is closed by the subset
    # of {4, 3, 6} summing closest to 8: a + b = 7; c opens the next row. (Best-fit decreasing also needs 2.)
    assert [r.input_ids for r in rows] == [[10, 11, 12, 13, 20, 21, 22, 0], [30, 31, 32, 33, 34, 35, 0, 0]]
    assert [r.position_ids for r in rows] == [[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5, 0, 1]]
    assert [r.labels for r in rows] == [[M, M, 12, 13, M, 21, 22, M], [M, M, M, 33, 34, 35, M, M]]
    assert (stats.rows, stats.tokens, stats.capacity) == (2, 13, 16)
    assert stats.efficiency == 13 / 16


def test_fill_and_close_fills_rows_that_best_fit_decreasing_leaves_short():
    lengths = [3, 3, 3, 3, 4, 4]  # 20 tokens: 2 rows of 10 at best
    # BFD: 4+4 (2 left, no example fits), 3+3+3, 3 -> 3 rows
    assert _best_fit_decreasing(lengths, 10) == [[4, 5], [0, 1, 2], [3]]
    # fill-and-close: 3+3 in order, then the 4 left closes exactly; twice -> 2 full rows, lengths mixed
    assert _fill_and_close(lengths, 10) == [[0, 1, 4], [2, 3, 5]]
    rows, stats = pack([ex(1, n - 1, 10 * k) for k, n in enumerate(lengths)], seq_len=10, pad_id=0)
    assert stats.rows == 2 and stats.efficiency == 1.0
    assert [r.position_ids for r in rows] == [[0, 1, 2, 0, 1, 2, 0, 1, 2, 3]] * 2


def test_closest_subset_is_exact_when_possible_and_prefers_long():
    assert _closest_subset({31: 5, 17: 3, 11: 2}, 45) == [(17, 2), (11, 1)]  # 17+17+11 = 45 exactly
    assert _closest_subset({31: 5, 17: 3}, 62) == [(31, 2)]          # 31+31 exact; 17s alone reach only 51
    assert _closest_subset({20: 2}, 30) == [(20, 1)]                 # nothing exact: the largest total below
    assert _closest_subset({40: 1}, 30) == []


# Length histogram of the default run's 20,000 training examples (stage=sft, model=tiny, synthetic world).
DEFAULT_LENGTHS = {11: 190, 12: 993, 13: 1517, 14: 1512, 15: 1603, 16: 1844, 17: 1759, 18: 102, 19: 1188, 20: 302,
                   21: 84, 22: 2756, 23: 1067, 24: 88, 26: 71, 27: 902, 28: 22, 30: 2662, 31: 1338}


def test_default_data_packs_into_the_fewest_possible_rows():
    import math
    import random

    lengths = [n for n, c in DEFAULT_LENGTHS.items() for _ in range(c)]
    random.Random(0).shuffle(lengths)
    assert sum(lengths) == 405998 and math.ceil(405998 / 256) == 1586
    assert len(_best_fit_decreasing(lengths, 256)) == 1602  # efficiency 0.98997: one example length per row
    bins = _fill_and_close(lengths, 256)
    assert len(bins) == 1586  # the lower bound: efficiency 405998 / (1586 * 256) = 0.99996
    assert sorted(k for b in bins for k in b) == list(range(len(lengths)))
    assert all(sum(lengths[k] for k in b) <= 256 for b in bins)
    assert sum(len({lengths[k] for k in b}) > 2 for b in bins) > 0.9 * len(bins)  # rows mix lengths
    assert _fill_and_close(lengths, 256) == bins  # deterministic


def test_isolated_keeps_best_fit_decreasing_where_it_packs_tighter():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(10, 250) for _ in range(400)]  # long examples: BFD wins here
    bfd, fc = len(_best_fit_decreasing(lengths, 256)), len(_fill_and_close(lengths, 256))
    assert bfd < fc
    _, stats = pack([ex(1, n - 1) for n in lengths], seq_len=256, pad_id=0)
    assert stats.rows == bfd


def test_isolated_masks_the_first_label_of_every_example_for_pretraining():
    rows, _ = pack([([5, 6, 7], [5, 6, 7]), ([8, 9], [8, 9])], seq_len=5, pad_id=0, packing="isolated")
    assert rows[0].labels == [M, 6, 7, M, 9]  # 8 would be predicted from 7: across the boundary


def test_concat_streams_and_cuts_rows():
    rows, stats = pack([ex(1, 2, 10), ex(1, 2, 20), ex(1, 1, 30)], seq_len=4, pad_id=0, packing="concat")
    assert [r.input_ids for r in rows] == [[10, 11, 12, 20], [21, 22, 30, 31]]
    assert [r.labels for r in rows] == [[M, 11, 12, M], [21, 22, M, 31]]
    assert rows[0].position_ids == [0, 1, 2, 3]
    assert stats.efficiency == 1.0


def test_overlong_truncate_drop_split_are_counted():
    long, short = ex(2, 8, 10), ex(1, 1, 50)
    _, s = pack([long, short], seq_len=6, pad_id=0, packing="isolated", overlong="truncate")
    assert (s.examples, s.truncated, s.dropped) == (2, 1, 0)
    rows, s = pack([long, short], seq_len=6, pad_id=0, packing="isolated", overlong="drop")
    assert (s.truncated, s.dropped, len(rows)) == (0, 1, 1)
    rows, s = pack([long], seq_len=6, pad_id=0, packing="concat", overlong="split")
    assert len(rows) == 2 and s.truncated == 0
    # a prompt that fills seq_len leaves no answer: dropped, counted
    _, s = pack([ex(7, 2)], seq_len=6, pad_id=0, packing="isolated", overlong="truncate")
    assert (s.truncated, s.dropped) == (1, 1)
    with pytest.raises(ValueError, match="split"):
        pack([long], seq_len=6, pad_id=0, packing="isolated", overlong="split")


def test_packed_batch_labels_exactly_the_answers_plus_eos(tok):
    convs = [("Reverse the word: lemon", "nomel"), ("What is 2 + 3?", "5"), ("Sort the digits: 3 1 2", "1 2 3")]
    examples = [tokenize_chat([{"role": "user", "content": p}, {"role": "assistant", "content": a}], tok)
                for p, a in convs]
    rows, _ = pack(examples, seq_len=64, pad_id=tok.pad_token_id, packing="isolated")
    assert len(rows) == 1
    batch = collate_rows(rows, tok.pad_token_id)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    # token by token: every labelled token is an answer token or EOS, in order, and nothing else is
    labelled = [int(t) for t, l in zip(ids, labels) if l != M]
    assert tok.decode(labelled) == "nomel</s>5</s>1 2 3</s>"
    assert all(int(l) == int(t) for t, l in zip(ids, labels) if l != M)
    assert labelled.count(tok.eos_token_id) == 3
    # the separator (<|assistant|>) and every prompt token carry no label
    sep = tok.convert_tokens_to_ids("<|assistant|>")
    assert all(l == M for t, l in zip(ids.tolist(), labels.tolist()) if t in (sep, tok.bos_token_id))
    assert "attention_mask" not in batch and batch["position_ids"].shape == ids.unsqueeze(0).shape


def test_multi_turn_labels_every_assistant_turn(tok):
    msgs = [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "2"},
            {"role": "user", "content": "Uppercase the word: cat"}, {"role": "assistant", "content": "CAT"}]
    ids, labels = tokenize_chat(msgs, tok)
    assert tok.decode([t for t, l in zip(ids, labels) if l != M]) == "2</s>CAT</s>"
    assert tok.decode(ids, skip_special_tokens=False).startswith("<s><|user|>What is 1 + 1?<|assistant|>2</s>")


def test_text_has_bos_eos_and_every_label(tok):
    ids, labels = tokenize_text("hello", tok)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and labels == ids


@pytest.mark.parametrize("attn", ["sdpa", "sdpa_packed"])
def test_packed_isolated_logits_equal_separate_logits(tok, attn):
    from transformers import LlamaConfig, LlamaForCausalLM

    import llama2_lit.models.packed_attention  # noqa: F401  (registers sdpa_packed)

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id)
    cfg._attn_implementation = attn
    model = LlamaForCausalLM(cfg).eval()
    examples = [tokenize_chat([{"role": "user", "content": p}, {"role": "assistant", "content": a}], tok)
                for p, a in [("Reverse the word: lemon", "nomel"), ("What is 12 + 30?", "42"),
                             ("Repeat the word dog 2 times.", "dog dog")]]
    rows, _ = pack(examples, seq_len=64, pad_id=tok.pad_token_id, packing="isolated")
    assert len(rows) == 1
    batch = collate_rows(rows, tok.pad_token_id)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for ids, _ in examples:
            alone = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[start:start + len(ids)], alone, atol=1e-5, rtol=0)
            start += len(ids)
        # concat rows are NOT isolated: the second example sees the first
        cat_rows, _ = pack(examples, seq_len=64, pad_id=tok.pad_token_id, packing="concat")
        cat = collate_rows(cat_rows, tok.pad_token_id)
        cat_logits = model(input_ids=cat["input_ids"], position_ids=cat["position_ids"], use_cache=False).logits[0]
        n0 = len(examples[0][0])
        assert (cat_logits[n0:n0 + 3] - packed[n0:n0 + 3]).abs().max() > 1e-3


def test_none_packing_pads_to_longest_with_attention_mask():
    rows, stats = pack([ex(1, 2), ex(2, 3)], seq_len=16, pad_id=0, packing="none")
    batch = collate_rows(rows, 0)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 0, 0], [10, 11, 12, 13, 14]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"][0].tolist() == [M, 11, 12, M, M]
    assert stats.efficiency == 1.0
