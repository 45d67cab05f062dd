"""Statistics of gold scores, pure (no I/O): the mean with its standard error and the paired difference of two
policies on the same prompts. Imports nothing of the project."""
from __future__ import annotations

from typing import Sequence


def mean_and_se(xs: Sequence[float]) -> tuple[float, float]:
    """The mean and its standard error (sample standard deviation / sqrt(n); 0 for one value).

    Two runs' gold scores differ meaningfully only by a few standard errors: on 128 held-out prompts it was about
    0.02, as large as the RLHF gains being measured, hence the 1,000-prompt default of ``data.synthetic.num_eval``.
    """
    n = len(xs)
    mean = sum(xs) / n
    return mean, (sum((x - mean) ** 2 for x in xs) / max(n - 1, 1) / n) ** 0.5


def paired_difference(base: Sequence[float], other: Sequence[float]) -> tuple[float, float]:
    """Mean of ``other - base`` per prompt and its standard error (sample sd / sqrt(n); 0 for one prompt)."""
    if len(base) != len(other) or not base:
        raise ValueError(f"paired scores need the same non-zero number of prompts, got {len(base)} and {len(other)}")
    return mean_and_se([o - b for b, o in zip(base, other)])
