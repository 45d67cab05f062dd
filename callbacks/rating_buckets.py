"""Reward-model accuracy per annotator rating (Llama 2, Table 8), per test pool (Table 7) and per safety bin with
the unsafe-response recall (Table 29), as a torchmetrics Metric and a callback.

The metric keeps sum-reduced states indexed by bucket (``BUCKETS`` order: the four ratings, then ``"unknown"``), by
pool (``POOLS``: helpfulness, safety; from each pair's ``is_safety``) and by safety bin (``SAFETY_LABELS``), so it
syncs across processes like any torchmetrics metric.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch
from lightning.pytorch import Callback
from torchmetrics import Metric

from data_modules.preferences import BUCKETS, RATINGS, SAFETY_LABELS, UNKNOWN, parse_rating

_INDEX = {b: i for i, b in enumerate(BUCKETS)}
POOLS = ("helpfulness", "safety")  # Table 7's test sets: a pair's is_safety
# Table 29: an answer is unsafe when its bin says so: the rejected one of preferred_safe_other_unsafe, both of
# both_unsafe. (chosen unsafe, rejected unsafe) per bin:
_UNSAFE = {"preferred_safe_other_unsafe": (0, 1), "both_safe": (0, 0), "both_unsafe": (1, 1)}

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

    With ``is_safety`` (B,) bool: ``accuracy/pool/<pool>`` and ``count/pool/<pool>`` for the helpfulness and safety
    pairs seen (Table 7: each RM on each test set). With ``safety_labels`` (B bins or None): for each bin with
    pairs, ``accuracy/safety_bin/<bin>`` and ``count/safety_bin/<bin>``; and the unsafe-response recall
    ``unsafe_recall``: the share of unsafe answers (the rejected one of ``preferred_safe_other_unsafe``, both of
    ``both_unsafe``) the RM scores below 0.5 on the sigmoid scale, i.e. a raw reward ``< 0`` (Table 29), with
    ``count/unsafe_responses``.
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
        for name, size in (("pool", len(POOLS)), ("bin", len(SAFETY_LABELS))):
            self.add_state(f"{name}_correct", default=torch.zeros(size, dtype=torch.long), dist_reduce_fx="sum")
            self.add_state(f"{name}_count", default=torch.zeros(size, dtype=torch.long), dist_reduce_fx="sum")
        # [unsafe answers scored below 0 (raw), unsafe answers]
        self.add_state("unsafe", default=torch.zeros(2, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, ratings: Sequence,
               is_safety: torch.Tensor | Sequence[bool] | None = None,
               safety_labels: Sequence[str | None] | None = None) -> None:
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
        b = chosen_rewards.shape[0]
        right = (diff > 0).long()
        if is_safety is not None:
            pools = torch.as_tensor(is_safety, dtype=torch.long).reshape(-1).to(self.pool_count.device)
            if pools.shape[0] != b:
                raise ValueError(f"RatingBucketAccuracy: {pools.shape[0]} is_safety flags for a batch of {b}")
            self.pool_correct.index_add_(0, pools, right.to(self.pool_count.device))
            self.pool_count.index_add_(0, pools, torch.ones_like(pools))
        if safety_labels is not None:
            if isinstance(safety_labels, str) or len(safety_labels) != b:
                n = "a string" if isinstance(safety_labels, str) else len(safety_labels)
                raise ValueError(f"RatingBucketAccuracy: {n} safety labels for a batch of {b}")
            c, r = chosen_rewards.detach().float().tolist(), rejected_rewards.detach().float().tolist()
            recalled = total = 0
            for i, label in enumerate(safety_labels):
                if label is None:
                    continue
                if label not in _UNSAFE:
                    raise ValueError(f"RatingBucketAccuracy: unknown safety label {label!r} "
                                     f"(expected one of: {', '.join(SAFETY_LABELS)}, or None)")
                j = SAFETY_LABELS.index(label)
                self.bin_correct[j] += int(right[i])
                self.bin_count[j] += 1
                for unsafe, score in zip(_UNSAFE[label], (c[i], r[i])):
                    total += unsafe
                    recalled += unsafe and score < 0
            self.unsafe += torch.tensor([recalled, total], dtype=torch.long, device=self.unsafe.device)

    def compute(self) -> dict[str, float | int]:
        correct, gap, count = self.correct.tolist(), self.gap_sum.tolist(), self.count.tolist()
        out: dict[str, float | int] = {}
        for names, key, cor, cnt in ((POOLS, "pool", self.pool_correct.tolist(), self.pool_count.tolist()),
                                     (SAFETY_LABELS, "safety_bin", self.bin_correct.tolist(), self.bin_count.tolist())):
            for name, k, n in zip(names, cor, cnt):
                if n:
                    out[f"accuracy/{key}/{name}"] = k / n
                    out[f"count/{key}/{name}"] = int(n)
        recalled, unsafe = self.unsafe.tolist()
        if unsafe:
            out["unsafe_recall"] = recalled / unsafe
            out["count/unsafe_responses"] = int(unsafe)
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


def format_safety_table(results: dict, title: str = "Reward model on safety bins (Table 29's columns)") -> str:
    """Table 29's row for one RM: accuracy on the safety pairs (Avg), per safety bin, and the unsafe-response recall,
    in percent; then Table 7's accuracy per test pool. Empty string when no safety label or pool was seen."""
    flat = {k.split("/", 1)[1] if k.startswith("val/") else k: v for k, v in results.items()}

    def pct(key):
        return f"{100 * flat[key]:.1f}" if key in flat else "-"

    lines = []
    if any(f"count/safety_bin/{b}" in flat for b in SAFETY_LABELS):
        lines += [title, "Avg (safety pairs) | " + " | ".join(SAFETY_LABELS) + " | unsafe response recall",
                  " | ".join([pct("accuracy/pool/safety")] + [pct(f"accuracy/safety_bin/{b}") for b in SAFETY_LABELS]
                             + [pct("unsafe_recall")]),
                  "pairs: " + ", ".join(f"{b} {int(flat.get(f'count/safety_bin/{b}', 0))}" for b in SAFETY_LABELS)
                  + f"; unsafe answers {int(flat.get('count/unsafe_responses', 0))}"]
    if any(f"count/pool/{p}" in flat for p in POOLS):
        lines += ["Accuracy per test pool (Table 7's layout): " + ", ".join(
            f"{p} {pct(f'accuracy/pool/{p}')} ({int(flat.get(f'count/pool/{p}', 0))} pairs)" for p in POOLS)]
    return "\n".join(lines)


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
            safety = format_safety_table(self.last_results)
            if safety:
                self.printer(safety)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._print_table(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if getattr(trainer.state, "fn", None) == "validate":
            self._print_table(trainer)
