"""Per-rating reward-model accuracy (callbacks/rating_buckets.py)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from callbacks.rating_buckets import RatingBucketAccuracy, RatingBucketCallback, format_bucket_table

# Hand-made batch. Per bucket (r_c - r_r):
#   significantly_better: +1, -1      -> accuracy 1/2, gap 0.0,  count 2
#   better:               0 (tie), +1 -> accuracy 1/2, gap 0.5,  count 2  (a tie counts as wrong)
#   slightly_better:      +3          -> accuracy 1,   gap 3.0,  count 1
#   negligibly_better:    -0.5 (given as "unsure") -> accuracy 0, gap -0.5, count 1
#   unknown:              +1          -> accuracy 1,   gap 1.0,  count 1
#   overall: 4 correct of 7, gap (0 + 1 + 3 - 0.5 + 1) / 7 = 4.5 / 7
CHOSEN = torch.tensor([2.0, 1.0, 0.5, 0.0, 3.0, 1.0, -1.0])
REJECTED = torch.tensor([1.0, 2.0, 0.5, -1.0, 0.0, 1.5, -2.0])
RATINGS = ["significantly_better", "significantly_better", "better", "better", "slightly_better", "unsure", "unknown"]
EXPECTED = {
    "accuracy/significantly_better": 0.5, "reward_gap/significantly_better": 0.0, "count/significantly_better": 2,
    "accuracy/better": 0.5, "reward_gap/better": 0.5, "count/better": 2,
    "accuracy/slightly_better": 1.0, "reward_gap/slightly_better": 3.0, "count/slightly_better": 1,
    "accuracy/negligibly_better": 0.0, "reward_gap/negligibly_better": -0.5, "count/negligibly_better": 1,
    "accuracy/unknown": 1.0, "reward_gap/unknown": 1.0, "count/unknown": 1,
    "accuracy": 4 / 7, "reward_gap": 4.5 / 7, "count": 7,
}


def test_bucket_accuracy_hand_computed():
    m = RatingBucketAccuracy()
    m.update(CHOSEN, REJECTED, RATINGS)
    out = m.compute()
    assert out.keys() == EXPECTED.keys()
    for k, v in EXPECTED.items():
        assert out[k] == pytest.approx(v, abs=1e-6), k
    assert isinstance(out["count/better"], int)


def test_bucket_accuracy_accumulates_omits_empty_buckets_and_resets():
    m = RatingBucketAccuracy()
    m.update(CHOSEN[:2], REJECTED[:2], RATINGS[:2])
    m.update(CHOSEN[4:5], REJECTED[4:5], [1])  # integer rating 1 = slightly_better
    assert m.compute() == {
        "accuracy/significantly_better": 0.5, "reward_gap/significantly_better": 0.0, "count/significantly_better": 2,
        "accuracy/slightly_better": 1.0, "reward_gap/slightly_better": 3.0, "count/slightly_better": 1,
        "accuracy": 2 / 3, "reward_gap": 1.0, "count": 3,
    }
    m.reset()
    m.update(CHOSEN[2:3], REJECTED[2:3], ["better"])
    assert m.compute() == {"accuracy/better": 0.0, "reward_gap/better": 0.0, "count/better": 1,
                           "accuracy": 0.0, "reward_gap": 0.0, "count": 1}


def test_bucket_accuracy_states_merge_like_a_distributed_sum():
    # The states are sum-reduced with fixed bucket indices: two "ranks" merged equal one pass.
    assert all(m == "sum" or getattr(m, "__name__", "") == "dim_zero_sum"
               for m in RatingBucketAccuracy()._reductions.values())
    a, b = RatingBucketAccuracy(), RatingBucketAccuracy()
    a.update(CHOSEN[:3], REJECTED[:3], RATINGS[:3])
    b.update(CHOSEN[3:], REJECTED[3:], RATINGS[3:])
    a.merge_state(b)
    out = a.compute()
    for k, v in EXPECTED.items():
        assert out[k] == pytest.approx(v, abs=1e-6), k


def test_bucket_accuracy_input_errors():
    m = RatingBucketAccuracy()
    with pytest.raises(ValueError, match=r"chosen \(7, 1\) and rejected \(7, 1\) must both have shape \(B,\)"):
        m.update(CHOSEN[:, None], REJECTED[:, None], RATINGS)
    with pytest.raises(ValueError, match="must both have shape"):
        m.update(CHOSEN, REJECTED[:3], RATINGS)
    with pytest.raises(ValueError, match="3 ratings for a batch of 7"):
        m.update(CHOSEN, REJECTED, RATINGS[:3])
    with pytest.raises(ValueError, match="unknown rating 'meh'"):
        m.update(CHOSEN[:1], REJECTED[:1], ["meh"])
    with pytest.warns(UserWarning, match="called before the ``update``"):
        assert RatingBucketAccuracy().compute() == {}


def test_format_bucket_table_numbers():
    table = format_bucket_table(EXPECTED)
    lines = table.splitlines()
    assert lines[0] == "Reward model accuracy per preference rating"
    header = [c.strip() for c in lines[1].split("|")]
    assert header == [
        "", "Significantly Better", "Better", "Slightly Better", "Negligibly Better / Unsure", "Unknown", "Avg"
    ]
    assert [c.strip() for c in lines[3].split("|")] == ["Accuracy (%)", "50.0", "50.0", "100.0", "0.0", "100.0", "57.1"]
    assert [c.strip() for c in lines[4].split("|")] == ["Count", "2", "2", "1", "1", "1", "7"]


def test_format_bucket_table_missing_buckets_and_prefix():
    logged = {"val/accuracy/better": 0.75, "val/count/better": 4, "val/accuracy": 0.75, "val/count": 4}
    table = format_bucket_table(logged)
    lines = table.splitlines()
    assert "Unknown" not in lines[1]
    assert [c.strip() for c in lines[3].split("|")] == ["Accuracy (%)", "-", "75.0", "-", "-", "75.0"]
    assert [c.strip() for c in lines[4].split("|")] == ["Count", "-", "4", "-", "-", "4"]


# ------------------------------------------------------------------------------------------ callback


class _FakeModule:
    def __init__(self):
        self.bucket_metric = RatingBucketAccuracy()
        self.logged = []

    def log_dict(self, values, **kwargs):
        self.logged.append((values, kwargs))


def _trainer(sanity=False, rank0=True, fn="fit"):
    return SimpleNamespace(sanity_checking=sanity, is_global_zero=rank0, state=SimpleNamespace(fn=fn))


def test_callback_logs_stores_resets_and_prints_once():
    printed = []
    cb = RatingBucketCallback(printer=printed.append)
    module = _FakeModule()

    module.bucket_metric.update(CHOSEN[:1], REJECTED[:1], ["better"])
    cb.on_validation_epoch_end(_trainer(sanity=True), module)  # sanity check: dropped
    assert module.logged == [] and cb.last_results == {} and module.bucket_metric.count.sum() == 0

    module.bucket_metric.update(CHOSEN, REJECTED, RATINGS)
    cb.on_validation_epoch_end(_trainer(), module)
    (values, kwargs), = module.logged
    assert values["val/accuracy/better"] == 0.5 and values["val/count/unknown"] == 1.0
    assert values["val/accuracy"] == pytest.approx(4 / 7)
    assert set(values) == {f"val/{k}" for k in EXPECTED}
    assert cb.last_results["count"] == 7 and module.bucket_metric.count.sum() == 0  # reset

    cb.on_validation_end(_trainer(fn="fit"), module)  # mid-fit validation: no table
    cb.on_fit_end(_trainer(rank0=False), module)  # not rank zero: no table
    assert printed == []
    cb.on_fit_end(_trainer(), module)
    assert len(printed) == 1 and printed[0].splitlines()[3].split("|")[-1].strip() == "57.1"

    printed.clear()
    cb.on_validation_end(_trainer(fn="validate"), module)  # a trainer.validate() run prints too
    assert len(printed) == 1


def test_callback_requires_bucket_metric():
    with pytest.raises(AttributeError, match="bucket_metric = RatingBucketAccuracy"):
        RatingBucketCallback().on_validation_epoch_end(_trainer(), SimpleNamespace())


def test_callback_in_a_real_trainer(tmp_path):
    import lightning.pytorch as pl

    class TinyRM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(1.0))
            self.bucket_metric = RatingBucketAccuracy()

        def training_step(self, batch, _):
            c, r, _ = batch
            return -torch.nn.functional.logsigmoid(self.w * (c - r)).mean()

        def validation_step(self, batch, _):
            c, r, ratings = batch
            self.bucket_metric.update(self.w.detach() * c, self.w.detach() * r, list(ratings))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    # batch_size=None: the loader yields the one hand-made batch as is (the ratings stay a list of str).
    batches = torch.utils.data.DataLoader([(CHOSEN, REJECTED, RATINGS)], batch_size=None)
    printed = []
    cb = RatingBucketCallback(printer=printed.append)
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb], default_root_dir=tmp_path,
        num_sanity_val_steps=1,
    )
    trainer.fit(TinyRM(), train_dataloaders=batches, val_dataloaders=batches)
    assert trainer.callback_metrics["val/accuracy/better"].item() == 0.5
    assert trainer.callback_metrics["val/count"].item() == 7
    assert cb.last_results["accuracy"] == pytest.approx(4 / 7)
    assert len(printed) == 1 and "57.1" in printed[0]
