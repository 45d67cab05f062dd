"""Reward-model accuracy per annotator rating (Llama 2, Table 8), as a torchmetrics Metric and a callback.

The metric keeps three sum-reduced states indexed by bucket (``BUCKETS`` order: the four ratings,
then ``"unknown"``), so it syncs across processes like any torchmetrics metric.

Not included: the safety-label breakdown of the paper's safety RM tables (safe/unsafe chosen vs
rejected, unsafe-response recall). It needs a safe/unsafe label per *response*, which
``PreferencePair`` does not carry (only ``is_safety`` per pair).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch
from lightning.pytorch import Callback
from torchmetrics import Metric

from data_modules.preferences import BUCKETS, RATINGS, UNKNOWN, parse_rating

_INDEX = {b: i for i, b in enumerate(BUCKETS)}

# Table 8 column headers, in BUCKETS order (the "unknown" column is shown only when it has rows).
COLUMN_TITLES = {
    "significantly_better": "Significantly Better",
    "better": "Better",
    "slightly_better": "Slightly Better",
    "negligibly_better": "Negligibly Better / Unsure",
    UNKNOWN: "Unknown",
}


def _bucket_index(rating: Any) -> int:
    if isinstance(rating, str) and rating in _INDEX:
        return _INDEX[rating]
    return _INDEX[parse_rating(rating)]  # ValueError naming the valid choices


class RatingBucketAccuracy(Metric):
    """Pairwise accuracy of a reward model per rating bucket.

    ``update(chosen_rewards (B,), rejected_rewards (B,), ratings)``: ``ratings`` is a length-B
    sequence of bucket names (``RATINGS`` or ``"unknown"``; anything :func:`parse_rating` accepts).
    A pair is correct when ``r_c > r_r`` strictly: ties count as wrong.

    ``compute()`` returns python numbers, for each bucket with rows: ``accuracy/<bucket>``,
    ``reward_gap/<bucket>`` (mean ``r_c - r_r``), ``count/<bucket>`` (int); and overall
    ``accuracy``, ``reward_gap``, ``count``. Empty dict when no pair was seen.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        n = len(BUCKETS)
        self.add_state("correct", default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("gap_sum", default=torch.zeros(n, dtype=torch.float32), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, ratings: Sequence) -> None:
        if chosen_rewards.dim() != 1 or chosen_rewards.shape != rejected_rewards.shape:
            raise ValueError(
                f"RatingBucketAccuracy: chosen {tuple(chosen_rewards.shape)} and rejected "
                f"{tuple(rejected_rewards.shape)} must both have shape (B,)"
            )
        if isinstance(ratings, str) or len(ratings) != chosen_rewards.shape[0]:
            n = "a string" if isinstance(ratings, str) else len(ratings)
            raise ValueError(f"RatingBucketAccuracy: {n} ratings for a batch of {chosen_rewards.shape[0]}")
        idx = torch.tensor([_bucket_index(r) for r in ratings], dtype=torch.long, device=self.count.device)
        diff = (chosen_rewards.detach().float() - rejected_rewards.detach().float()).to(self.gap_sum.device)
        self.correct.index_add_(0, idx, (diff > 0).long())
        self.gap_sum.index_add_(0, idx, diff)
        self.count.index_add_(0, idx, torch.ones_like(idx))

    def compute(self) -> dict[str, float | int]:
        correct, gap, count = self.correct.tolist(), self.gap_sum.tolist(), self.count.tolist()
        out: dict[str, float | int] = {}
        for i, b in enumerate(BUCKETS):
            if count[i]:
                out[f"accuracy/{b}"] = correct[i] / count[i]
                out[f"reward_gap/{b}"] = gap[i] / count[i]
                out[f"count/{b}"] = int(count[i])
        total = sum(count)
        if total:
            out["accuracy"] = sum(correct) / total
            out["reward_gap"] = sum(gap) / total
            out["count"] = int(total)
        return out


def format_bucket_table(results: dict, title: str = "Reward model accuracy per preference rating") -> str:
    """A plain-text table shaped like Llama 2 Table 8 from :meth:`RatingBucketAccuracy.compute` output.

    Columns: Significantly Better, Better, Slightly Better, Negligibly Better / Unsure, [Unknown if
    any rows], Avg. Rows: accuracy in percent (one decimal) and count; ``-`` where a bucket is empty.
    Keys may carry a prefix such as ``val/`` (as logged); it is ignored.
    """
    flat = {k.split("/", 1)[1] if k.startswith("val/") else k: v for k, v in results.items()}
    buckets = list(RATINGS) + ([UNKNOWN] if flat.get(f"count/{UNKNOWN}") else [])
    headers = [""] + [COLUMN_TITLES[b] for b in buckets] + ["Avg"]

    def pct(key):
        return f"{100 * flat[key]:.1f}" if key in flat else "-"

    def cnt(key):
        return f"{int(flat[key])}" if key in flat else "-"

    rows = [
        ["Accuracy (%)"] + [pct(f"accuracy/{b}") for b in buckets] + [pct("accuracy")],
        ["Count"] + [cnt(f"count/{b}") for b in buckets] + [cnt("count")],
    ]
    widths = [max(len(r[i]) for r in [headers] + rows) for i in range(len(headers))]

    def fmt(cells):
        return " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([title, fmt(headers), rule] + [fmt(r) for r in rows])


class RatingBucketCallback(Callback):
    """Logs per-rating reward-model accuracy each validation epoch and prints Table 8 at the end.

    Contract with the LightningModule: it owns ``self.bucket_metric = RatingBucketAccuracy()``
    (an attribute, so it moves to the module's device) and calls
    ``self.bucket_metric.update(chosen_rewards, rejected_rewards, batch["rating"])`` in
    ``validation_step``, and does **not** log or reset it itself.

    ``on_validation_epoch_end``: computes (synced across processes), logs every value as
    ``val/<key>`` via ``pl_module.log_dict`` (``val/accuracy/better``, ``val/count/better``, ...,
    ``val/accuracy``), stores the un-prefixed dict in ``self.last_results`` (python numbers, ready
    for metrics.json) and resets the metric. Sanity-check epochs are reset and not recorded.
    At the end of ``fit`` (or of a ``validate`` run) rank zero prints :func:`format_bucket_table`
    of ``last_results`` once, via ``printer`` (``print`` by default).
    """

    def __init__(self, prefix: str = "val/", printer: Callable[[str], Any] = print):
        self.prefix = prefix
        self.printer = printer
        self.last_results: dict[str, float | int] = {}

    @staticmethod
    def _metric(pl_module) -> RatingBucketAccuracy:
        metric = getattr(pl_module, "bucket_metric", None)
        if not isinstance(metric, RatingBucketAccuracy):
            raise AttributeError(
                "RatingBucketCallback needs the LightningModule to own `bucket_metric = RatingBucketAccuracy()` "
                "and update it in validation_step"
            )
        return metric

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        metric = self._metric(pl_module)
        if trainer.sanity_checking:
            metric.reset()
            return
        # Every rank computes (the sync is collective), even one that saw no batch this epoch.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*compute.*called before.*update.*")
            results = metric.compute()
        metric.reset()
        self.last_results = dict(results)
        if results:
            pl_module.log_dict({f"{self.prefix}{k}": float(v) for k, v in results.items()}, sync_dist=False)

    def _print_table(self, trainer) -> None:
        if trainer.is_global_zero and self.last_results:
            self.printer(format_bucket_table(self.last_results))

    def on_fit_end(self, trainer, pl_module) -> None:
        self._print_table(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if getattr(trainer.state, "fn", None) == "validate":
            self._print_table(trainer)
