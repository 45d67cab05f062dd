"""Best-of-n over-optimisation arithmetic (Gao, Schulman & Hilton 2022, "Scaling laws for reward model
overoptimization"), pure (no I/O): the KL of best-of-n sampling from its base policy and the unbiased estimate of
best-of-k's expected proxy and gold reward from n >= k samples of one prompt. Imports nothing of the project."""
from __future__ import annotations

import math
from typing import Sequence


def kl_best_of_n(n: int) -> float:
    """KL(best-of-n || base) = log n - (n - 1) / n, in nats (the analytic value for a continuous proxy; 0 at n=1)."""
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_k_weights(n: int, k: int) -> list[float]:
    """The probability that the i-th smallest of ``n`` samples (i = 1..n) is the largest of a uniformly drawn
    k-subset: C(i-1, k-1) / C(n, k). They sum to 1 (the hockey-stick identity)."""
    if not 1 <= k <= n:
        raise ValueError(f"best-of-k from n samples needs 1 <= k <= n, got k={k}, n={n}")
    total = math.comb(n, k)
    return [math.comb(i - 1, k - 1) / total for i in range(1, n + 1)]


def best_of_k_expectation(proxy: Sequence[float], gold: Sequence[float], k: int) -> tuple[float, float]:
    """``(proxy, gold)``: the expected proxy and gold reward of the best of ``k`` samples selected by proxy,
    estimated without bias from the ``n = len(proxy)`` samples of one prompt (the average over all k-subsets).

    The samples are sorted by proxy and the i-th smallest weighted by :func:`best_of_k_weights`. Samples that tie
    on proxy share their mean gold (the selection breaks ties uniformly at random). k=1 gives the plain means,
    k=n the proxy-argmax's values.
    """
    n = len(proxy)
    if len(gold) != n:
        raise ValueError(f"proxy and gold need one score per sample, got {n} and {len(gold)}")
    w = best_of_k_weights(n, k)
    order = sorted(range(n), key=lambda i: proxy[i])
    p = [float(proxy[i]) for i in order]
    g = [float(gold[i]) for i in order]
    s = 0
    while s < n:  # average gold within each run of equal proxy
        e = s
        while e + 1 < n and p[e + 1] == p[s]:
            e += 1
        g[s:e + 1] = [sum(g[s:e + 1]) / (e + 1 - s)] * (e + 1 - s)
        s = e + 1
    return sum(a * b for a, b in zip(w, p)), sum(a * b for a, b in zip(w, g))
