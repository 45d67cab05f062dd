"""Rejection sampling: the gated reward, best-of-K selection, the bag across iterations, Fig. 7's curves,
the stage=rs runner (resume after a crash, bad input) and rs_distill end to end on model=tiny."""
import itertools
import json
import math
import statistics

import pytest
import torch

from llama2_lit.errors import UserError
from llama2_lit.core.rl import safety_gated_reward
from llama2_lit.models.tokenizers import tokenizer_fingerprint
from llama2_lit.stages.rs_bag import (BAG_COLUMNS, Bag, best_of_n_curves, reward_table, select_best,
                                      selection_iterations)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: single-threaded tiny models


# ----------------------------------------------------------------------------------------- pure parts


def test_safety_gated_reward_hand_worked():
    r_s = torch.tensor([0.9, 0.1, 0.9, 0.149, 0.15])
    r_h = torch.tensor([0.3, 0.8, 0.7, 0.6, 0.6])
    is_safety = torch.tensor([True, False, False, False, False])
    # safety prompt -> R_s; R_s < 0.15 -> R_s; else R_h (0.15 itself is not below the threshold)
    assert safety_gated_reward(r_s, r_h, is_safety).tolist() == pytest.approx([0.9, 0.1, 0.7, 0.149, 0.6])
    assert safety_gated_reward(r_s, r_h, is_safety, threshold=0.95).tolist() == pytest.approx([0.9, 0.1, 0.9, 0.149,
                                                                                                0.15])
    with pytest.raises(ValueError, match=r"\(B,\)"):
        safety_gated_reward(r_s[:, None], r_h, is_safety)  # (B, 1) would broadcast into (B, B)
    with pytest.raises(ValueError, match="expected 5"):
        safety_gated_reward(r_s, r_h[:4], is_safety)


def test_select_best_on_a_hand_made_score_table():
    # prompt a: samples 0.2, 0.9, 0.5 -> row 1; prompt b: 0.4 (it 1) ties 0.4 (it 2) -> the later iteration (row 4)
    # prompt c: NaN never wins over a real score -> row 6
    ids = ["a", "a", "a", "b", "b", "c", "c"]
    rewards = [0.2, 0.9, 0.5, 0.4, 0.4, float("nan"), 0.0]
    iters = [1, 1, 1, 1, 2, 1, 1]
    idx = [0, 1, 2, 0, 0, 0, 1]
    assert select_best(ids, rewards, iters, idx) == [1, 4, 6]
    # equal reward within an iteration: the lower sample index
    assert select_best(["x", "x"], [0.5, 0.5], [1, 1], [1, 0]) == [1]
    # equal reward: the higher tie-break (helpfulness) score first, before the iteration
    assert select_best(["s", "s", "s"], [1.0, 1.0, 1.0], [1, 1, 2], [0, 1, 0], tiebreak=[0.0, 0.2, 0.1]) == [1]


def test_max_median_curve_on_known_numbers():
    mx, md = best_of_n_curves(torch.tensor([[3.0, 1.0, 2.0]]))
    assert mx.tolist() == pytest.approx([2.0, 8 / 3, 3.0])  # pairs {1,2},{1,3},{2,3}: maxima 2, 3, 3
    assert md.tolist() == pytest.approx([2.0, 2.0, 2.0])
    mx, md = best_of_n_curves(torch.tensor([[0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 1.0]]))
    assert mx.tolist() == pytest.approx([(1.5 + 1) / 2, (14 / 6 + 1) / 2, (2.75 + 1) / 2, (3 + 1) / 2])
    assert md[-1].item() == pytest.approx((1.5 + 1) / 2)
    # against brute force over every N-subset
    torch.manual_seed(0)
    table = torch.rand(3, 6)
    mx, md = best_of_n_curves(table)
    for n in range(1, 7):
        subsets = list(itertools.combinations(range(6), n))
        bmax = statistics.mean(statistics.mean(max(row[list(s)].tolist()) for s in subsets) for row in table)
        bmed = statistics.mean(statistics.mean(statistics.median(row[list(s)].tolist()) for s in subsets)
                               for row in table)
        assert mx[n - 1].item() == pytest.approx(bmax) and md[n - 1].item() == pytest.approx(bmed)


def test_reward_table_groups_by_prompt_and_sample():
    t = reward_table(["p", "q", "p", "q"], [0, 0, 1, 1], [1.0, 2.0, 3.0, 4.0])
    assert t.tolist() == [[1.0, 3.0], [2.0, 4.0]]
    with pytest.raises(ValueError):
        reward_table(["p", "q", "p"], [0, 0, 1], [1.0, 2.0, 3.0])


def test_tokenizer_fingerprint_tells_tokenizers_apart(tok, cache_dir):
    from llama2_lit.models.loading import load_tokenizer

    again = load_tokenizer(kind="world_bpe", vocab_size=512, cache_dir=cache_dir)
    other = load_tokenizer(kind="world_bpe", vocab_size=400, cache_dir=cache_dir)
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(again) != tokenizer_fingerprint(other)


# ------------------------------------------------------------------------------------------------ the bag


def _row(pid, it, k, reward, response="r"):
    row = {c: None for c in BAG_COLUMNS}
    row.update(prompt_id=pid, prompt=f"prompt {pid}", is_safety=False, sample_index=k, response=response,
               num_tokens=3, finished=True, logprob=-1.0, iteration=it, policy=f"policy{it}", tokenizer="t",
               temperature=1.0, top_p=1.0, seed=0, scorer="s", score_helpful=reward, score_safety=1.0, reward=reward,
               gold_helpfulness=math.nan, gold_safety=math.nan)
    return row


def _two_iteration_bag(root):
    bag = Bag(root)
    d1, _ = bag.open_set(1, {"run": 1}, 1)
    bag.write_chunk(d1, 0, [_row("A", 1, 0, 0.9), _row("A", 1, 1, 0.1), _row("B", 1, 0, 0.2), _row("B", 1, 1, 0.3)])
    d2, _ = bag.open_set(2, {"run": 2}, 1)
    bag.write_chunk(d2, 0, [_row("A", 2, 0, 0.5), _row("A", 2, 1, 0.4), _row("B", 2, 0, 0.8), _row("B", 2, 1, 0.1)])
    return bag


def test_all_iterations_versus_previous_iteration_on_a_two_iteration_bag(tmp_path):
    from omegaconf import OmegaConf

    from llama2_lit.stages.rs import _select

    bag = _two_iteration_bag(tmp_path / "bag")
    assert bag.iterations() == [1, 2]
    assert selection_iterations(bag.iterations(), 2, "all_iterations") == [1, 2]
    assert selection_iterations(bag.iterations(), 2, "previous_iteration") == [2]
    assert selection_iterations(bag.iterations(), 1, "all_iterations") == [1]

    class Scorer:
        fingerprint = "s"

    for selection, expect in (("all_iterations", {"A": (1, 0.9), "B": (2, 0.8)}),
                              ("previous_iteration", {"A": (2, 0.5), "B": (2, 0.8)})):
        out = tmp_path / selection
        out.mkdir()
        rs = OmegaConf.create({"selection": selection, "rescore": "auto", "safety_threshold": 0.15})
        m, summary = _select(bag, 2, rs, Scorer(), out)
        import datasets

        sel = datasets.Dataset.from_parquet(str(out / "selected.parquet"))
        got = {p: (i, r) for p, i, r in zip(sel["prompt_id"], sel["iteration"], sel["reward"])}
        assert got == expect, selection
    # the last (previous_iteration) metrics: both from iteration 2, pool of 4
    assert m["rs/selected_from_iteration_2"] == 2 and m["rs/pool_samples"] == 4


def test_samples_scored_by_older_reward_models_are_rescored(tmp_path):
    import datasets
    from omegaconf import OmegaConf

    from llama2_lit.stages.rs import _select

    bag = Bag(tmp_path / "bag")
    d1, _ = bag.open_set(1, {"run": 1}, 1)
    old = [_row("A", 1, 0, 0.99), _row("A", 1, 1, 0.98)]
    for r in old:
        r["scorer"] = "rm:old"  # iteration 1 was scored by other reward models
    bag.write_chunk(d1, 0, old)
    d2, _ = bag.open_set(2, {"run": 2}, 1)
    bag.write_chunk(d2, 0, [_row("A", 2, 0, 0.5)])

    class Scorer:  # today's reward models: iteration 1's answers are worse than they looked
        fingerprint = "s"

        def __call__(self, prompts, responses):
            return torch.full((len(prompts),), 0.1, dtype=torch.float64), torch.full((len(prompts),), 0.9,
                                                                                    dtype=torch.float64)

    rs = OmegaConf.create({"selection": "all_iterations", "rescore": "auto", "safety_threshold": 0.15})
    m, _ = _select(bag, 2, rs, Scorer(), tmp_path)
    assert m["rs/rescored"] == 2 and m["rs/selected_from_iteration_2"] == 1
    sel = datasets.Dataset.from_parquet(str(tmp_path / "selected.parquet"))
    assert sel["iteration"][:] == [2] and sel["reward"][:] == [0.5]
    m, _ = _select(bag, 2, OmegaConf.merge(rs, {"rescore": "never"}), Scorer(), tmp_path)
    assert m["rs/rescored"] == 0 and m["rs/selected_from_iteration_1"] == 1


def test_bag_refuses_incompatible_or_foreign_folders(tmp_path):
    Bag(tmp_path / "ok")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "bag.json").write_text(json.dumps({"format": "llama2-lit/rs-bag", "version": 0}))
    with pytest.raises(UserError, match="incompatible version"):
        Bag(tmp_path / "old")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(UserError, match="not a sample bag"):
        Bag(tmp_path / "junk")
    # a chunk with other columns (a future or past writer)
    import datasets

    bag = Bag(tmp_path / "cols")
    d, _ = bag.open_set(1, {"run": 1}, 1)
    datasets.Dataset.from_list([{"prompt_id": "a", "reward": 1.0}]).to_parquet(str(d / "chunk-00000.parquet"))
    with pytest.raises(UserError, match="incompatible version"):
        bag.load()


# ------------------------------------------------------------------------------------------ the stage

# data.seed=2: 10 prompts on which the random-init policy's samples of each iteration strictly win somewhere (it scores
# 0 on most prompts, and ties go to the later iteration), so that a second iteration selects from both
RS = ["stage=rs", "data=rs_prompts", "data.synthetic.num_train=10", "stage.batch_size=4", "rs.num_samples=3",
      "rs.max_new_tokens=6", "rs.scorer=gold", "+model.config.initializer_range=0.2", "data.seed=2"]


def _bag_rows(root):
    return sorted(tuple(r[c] for c in ("iteration", "prompt_id", "sample_index", "response", "reward"))
                  for r in Bag(root).load())


def test_rs_stage_writes_curves_bag_and_selection(make_cfg, tmp_path):
    from llama2_lit.stages.rs import run

    cfg = make_cfg(*RS, "logger=tensorboard", f"rs.bag_dir={tmp_path}/bag", out=tmp_path / "run")
    m = run(cfg)
    for key in ("rs/reward_max@1", "rs/reward_max@3", "rs/reward_median@1", "rs/reward_median@3"):
        assert key in m, key
    assert m["rs/reward_max@1"] == pytest.approx(m["rs/reward_median@1"])  # N = 1: both are the mean
    assert m["rs/reward_max@3"] >= m["rs/reward_median@3"]
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "metrics.json").read_text()) == pytest.approx(m)
    assert (run_dir / "rs_max_median.png").stat().st_size > 0
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents*"))
    curves = json.loads((run_dir / "rs_curves.json").read_text())
    assert curves["N"] == [1, 2, 3] and curves["max"][-1] == pytest.approx(m["rs/reward_max@3"])
    assert len(Bag(tmp_path / "bag").load()) == 30 == m["rs/pool_samples"] + m["rs/pool_empty_dropped"]
    summary = json.loads((run_dir / "selected.json").read_text())
    assert "gold oracle" in summary["scorer"]


def test_rs_resumes_after_a_crash_and_a_second_iteration_selects_from_both(make_cfg, tmp_path, monkeypatch):
    from llama2_lit.stages import rs as rs_stage

    ref = make_cfg(*RS, f"rs.bag_dir={tmp_path}/ref", out=tmp_path / "ref_run")
    rs_stage.run(ref)

    real, calls = rs_stage.GoldScorer.__call__, {"n": 0}

    def crash_on_second_chunk(self, prompts, responses):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed mid-generation")
        return real(self, prompts, responses)

    monkeypatch.setattr(rs_stage.GoldScorer, "__call__", crash_on_second_chunk)
    cfg = make_cfg(*RS, f"rs.bag_dir={tmp_path}/bag", out=tmp_path / "run1")
    with pytest.raises(RuntimeError, match="killed"):
        rs_stage.run(cfg)
    chunks = list((tmp_path / "bag").rglob("*.parquet"))
    assert len(chunks) == 1 and not list((tmp_path / "bag").rglob("*.tmp"))  # whole chunks only
    monkeypatch.setattr(rs_stage.GoldScorer, "__call__", real)
    rs_stage.run(cfg)  # resumes at the second chunk
    assert _bag_rows(tmp_path / "bag") == _bag_rows(tmp_path / "ref")  # as if never interrupted

    m2 = rs_stage.run(make_cfg(*RS, f"rs.bag_dir={tmp_path}/bag", "rs.iteration=2", out=tmp_path / "run2"))
    assert m2["rs/pool_from_iteration_1"] + m2["rs/pool_empty_dropped"] >= 27
    assert m2["rs/pool_iterations"] == 2
    assert m2["rs/selected_from_iteration_1"] + m2["rs/selected_from_iteration_2"] == m2["rs/selected"] == 10
    assert m2["rs/selected_from_iteration_1"] > 0 and m2["rs/selected_from_iteration_2"] > 0
    m3 = rs_stage.run(make_cfg(*RS, f"rs.bag_dir={tmp_path}/bag", "rs.iteration=2",
                               "rs.selection=previous_iteration", out=tmp_path / "run3"))
    assert m3["rs/selected_from_iteration_2"] == 10 and "rs/selected_from_iteration_1" not in m3


def test_rs_bad_input(make_cfg, tmp_path):
    from llama2_lit.stages.rs import run

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad = [(["data.path=" + str(empty)], "no prompts"),
           (["rs.num_samples=0"], "num_samples"),
           (["rs.scorer=rm"], "rs.reward_models.helpfulness"),
           (["rs.selection=best"], "rs.selection"),
           (["data=synthetic"], "data=rs_prompts")]
    for extra, msg in bad:
        with pytest.raises(UserError, match=msg):
            run(make_cfg(*RS, f"rs.bag_dir={tmp_path}/bag", *extra, out=tmp_path / "run"))


def test_reward_model_with_another_tokenizer_scores_through_text(tok, cache_dir, tmp_path):
    from llama2_lit.models.loading import load_tokenizer
    from llama2_lit.models.reward import export_reward_model, load_reward_model, score
    from llama2_lit.stages.rs import RMScorer

    rm_tok = load_tokenizer(kind="world_bpe", vocab_size=400, cache_dir=cache_dir)
    dims = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
            "num_key_value_heads": 4, "max_position_embeddings": 128}
    torch.manual_seed(0)
    export_reward_model(load_reward_model({"config": dims}, rm_tok), rm_tok, tmp_path / "rm")
    scorer = RMScorer(str(tmp_path / "rm"), None, tok)
    prompts, answers = ["What is 2 + 3?", "Reverse the word: cat"], ["5", "tac"]
    h, s = scorer(prompts, answers)
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    direct = torch.sigmoid(score(model, rm_tok, prompts, answers).double())
    torch.testing.assert_close(h, direct)
    assert torch.isnan(s).all()  # no safety RM: R_c is the helpfulness score


def test_repeated_samples_are_scored_once(tok, tmp_path, monkeypatch):
    from llama2_lit.models.reward import export_reward_model, load_reward_model
    from llama2_lit.stages.rs import RMScorer

    dims = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
            "num_key_value_heads": 4, "max_position_embeddings": 128}
    torch.manual_seed(0)
    export_reward_model(load_reward_model({"config": dims}, tok), tok, tmp_path / "h")
    export_reward_model(load_reward_model({"config": dims}, tok), tok, tmp_path / "s")
    scorer = RMScorer(str(tmp_path / "h"), str(tmp_path / "s"), tok)
    chat = [{"role": "user", "content": "What is 2 + 3?"}]
    prompts = ["What is 2 + 3?", "What is 2 + 3?", "Reverse the word: cat", "What is 2 + 3?", chat, chat]
    answers = ["5", "6", "tac", "5", "5", "5"]
    alone = [scorer([p], [a]) for p, a in zip(prompts, answers)]
    seen = []
    real = RMScorer._score
    monkeypatch.setattr(RMScorer, "_score", lambda self, name, ps, rs: seen.append((name, list(rs))) or real(
        self, name, ps, rs))
    h, s = scorer(prompts, answers)
    # 4 distinct (prompt, answer) pairs, in first-seen order; a chat prompt is its own key
    assert seen == [("helpfulness", ["5", "6", "tac", "5"]), ("safety", ["5", "6", "tac", "5"])]
    torch.testing.assert_close(h, torch.cat([a[0] for a in alone]))
    torch.testing.assert_close(s, torch.cat([a[1] for a in alone]))
    assert h[0] == h[3] and h[0] != h[1]


# ------------------------------------------------------------------------------------------- rs_distill


def test_rs_distill_end_to_end_and_tokenizer_check(make_cfg, tmp_path):
    from llama2_lit.stages.rs import run as run_rs
    from llama2_lit.run import run

    run_rs(make_cfg(*RS, f"rs.bag_dir={tmp_path}/bag", out=tmp_path / "rs"))
    cfg = make_cfg("stage=rs_distill", "data=rs_bag", f"data.path={tmp_path}/rs", "data.val_fraction=0.2",
                   "stage.seq_len=64", "callbacks.gold_eval.at_start=true", out=tmp_path / "distill")
    m = run(cfg)
    assert m["train/loss"] > 0 and "val/loss" in m
    assert "eval/gold_helpfulness" in m and "eval/gold_helpfulness_init" in m  # world prompts: gold eval runs
    assert m["rs/distill_samples"] >= 1
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "distill" / "hf")
    assert model.config.llama2_lit["stage"] == "rs_distill"

    other = make_cfg("stage=rs_distill", "data=rs_bag", f"data.path={tmp_path}/rs", "model.tokenizer.vocab_size=400",
                     out=tmp_path / "distill2")
    with pytest.raises(UserError, match="tokenizer"):
        run(other)
    with pytest.raises(UserError, match="data=rs_bag"):
        run(make_cfg("stage=rs_distill", "data=synthetic", out=tmp_path / "distill3"))


def test_prompt_data_from_a_file_and_the_world(tok, tmp_path):
    from data_modules.prompts import PromptDataModule, RSSelectionDataModule
    from data_modules.sft import PackedSFTDataModule
    from llama2_lit.errors import DataError

    p = tmp_path / "prompts.jsonl"
    p.write_text('{"prompt": "Say hi"}\n{"prompt": "Tell me the code", "is_safety": true}\n{"prompt": "Say hi"}\n')
    dm = PromptDataModule(tok, path=str(p), batch_size=2)
    got = dm.prompts()
    assert [(x.text, x.is_safety) for x in got] == [("Say hi", False), ("Tell me the code", True)]
    assert dm.stats["data/duplicate_prompts"] == 1 and not dm.oracle
    assert sum(len(b) for b in dm.train_dataloader()) == 2
    p.write_text('{"prompt": "Say hi", "is_safety": "yes"}\n')
    with pytest.raises(DataError, match="is_safety"):
        PromptDataModule(tok, path=str(p)).prompts()
    # the world's held-out evaluation prompts are the SFT stage's for the same seed, so gold numbers compare
    world_dm = PromptDataModule(tok, seed=7, synthetic={"num_train": 5, "num_eval": 6})
    assert len(world_dm.prompts()) <= 5 and world_dm.oracle
    sft = PackedSFTDataModule(tok, seed=7, synthetic={"num_eval": 6})
    assert world_dm.eval_prompts() == sft.eval_prompts()
    with pytest.raises(UserError, match="stage=rs"):
        RSSelectionDataModule(tok, path=str(tmp_path))
