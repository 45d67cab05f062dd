"""Rejection sampling's data side: the sample bag, best-of-K selection and the max/median curves (paper Fig. 7).

The bag is a folder of Parquet files (``datasets`` features, read back as a ``datasets.Dataset``) that persists across RS
iterations, so a later iteration can select from every earlier one (Llama 2's fix after RLHF V3)::

    <bag>/bag.json                                   {"format": "llama2-lit/rs-bag", "version": 1}
    <bag>/iteration=0001/<sample set>/manifest.json  the settings that produced the set, chunk count, complete
    <bag>/iteration=0001/<sample set>/chunk-00000.parquet    one row per sample (BAG_COLUMNS)

A sample set is one RS run's samples at one iteration (its key hashes the settings: policy, prompts,
K, temperature, top-p, length, seed, scorer), so a temperature sweep adds sets side by side. Each chunk is
written to a temporary name and renamed: a crash leaves whole chunks only, and the run resumes at the
first missing chunk (the chunk's seed depends on its index, so a resumed set equals an uninterrupted one).

Pure parts (no model): :func:`select_best`, :func:`best_of_n_curves`, :func:`pick_temperature` (Fig. 8's choice of
the sampling temperature). Prompt ids: ``data_modules.annotations.prompt_id``;
tokenizer fingerprints: ``llama2_lit.models.tokenizers``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from llama2_lit.errors import UserError

BAG_FORMAT = "llama2-lit/rs-bag"
BAG_VERSION = 1
SELECTIONS = ("all_iterations", "previous_iteration")

# one row per sample; the order is the Parquet column order
BAG_COLUMNS: dict[str, str] = {
    "prompt_id": "string",        # sha1 of the prompt text (16 hex)
    "prompt": "string",
    "is_safety": "bool",
    "sample_index": "int64",      # 0 .. K-1
    "response": "string",
    "num_tokens": "int64",        # generated tokens, stop token included
    "finished": "bool",           # ended with a stop token (else cut at max_new_tokens)
    "logprob": "float64",         # sum of the sampling policy's token log-probs
    "iteration": "int64",
    "policy": "string",           # the checkpoint sampled from
    "tokenizer": "string",        # tokenizer_fingerprint of the policy's tokenizer
    "temperature": "float64",
    "top_p": "float64",
    "seed": "int64",              # the chunk's sampling seed
    "scorer": "string",           # scorer fingerprint ("gold", or "rm:<hash>")
    "score_helpful": "float64",   # sigmoid-scale helpfulness score
    "score_safety": "float64",    # sigmoid-scale safety score
    "reward": "float64",          # safety-gated R_c
    "gold_helpfulness": "float64",  # world oracle (NaN off the synthetic world)
    "gold_safety": "float64",
}


def settings_key(settings: Mapping[str, Any]) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------------ the bag


def _schema():
    import datasets

    return datasets.Features({k: datasets.Value(v) for k, v in BAG_COLUMNS.items()}).arrow_schema


class Bag:
    """A persistent sample bag under ``root`` (created on first use). See the module docstring."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        meta = self.root / "bag.json"
        if meta.exists():
            try:
                info = json.loads(meta.read_text())
            except json.JSONDecodeError as e:
                raise UserError(f"{meta}: not a sample bag description ({e})") from None
            if info.get("format") != BAG_FORMAT or info.get("version") != BAG_VERSION:
                raise UserError(f"{self.root}: a sample bag written by an incompatible version (format "
                                f"{info.get('format')!r} version {info.get('version')!r}; this code reads "
                                f"{BAG_FORMAT!r} version {BAG_VERSION}): use a new rs.bag_dir")
        elif self.root.exists() and any(self.root.iterdir()):
            raise UserError(f"{self.root}: exists and is not a sample bag (no bag.json): use a new rs.bag_dir")
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(meta, json.dumps({"format": BAG_FORMAT, "version": BAG_VERSION,
                                                 "columns": BAG_COLUMNS}, indent=2) + "\n")

    # -- writing -------------------------------------------------------------------------------------
    def set_dir(self, iteration: int, key: str) -> Path:
        return self.root / f"iteration={iteration:04d}" / key

    def open_set(self, iteration: int, settings: Mapping[str, Any], num_chunks: int) -> tuple[Path, set[int]]:
        """The folder of the sample set for ``settings`` at ``iteration`` and the chunks already written."""
        if iteration < 1:
            raise UserError(f"rs.iteration must be >= 1, got {iteration}")
        d = self.set_dir(iteration, settings_key(settings))
        man = d / "manifest.json"
        if man.exists():
            info = json.loads(man.read_text())
            if info.get("settings") != json.loads(json.dumps(settings, default=str)):
                raise UserError(f"{d}: a sample set with the same key but other settings")
        else:
            d.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(man, json.dumps({"iteration": iteration, "settings": settings, "num_chunks": num_chunks,
                                                "complete": False}, indent=2, default=str) + "\n")
        done = {int(m.group(1)) for f in d.glob("chunk-*.parquet") if (m := re.fullmatch(r"chunk-(\d+)\.parquet", f.name))}
        return d, done

    def write_chunk(self, set_dir: Path, index: int, rows: Sequence[Mapping[str, Any]]) -> Path:
        """Write ``rows`` as ``chunk-<index>.parquet`` atomically (temporary file, then rename)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        missing = [k for k in BAG_COLUMNS if rows and k not in rows[0]]
        if missing:
            raise ValueError(f"bag rows lack columns {missing}")
        table = pa.Table.from_pylist([{k: r[k] for k in BAG_COLUMNS} for r in rows], schema=_schema())
        final = set_dir / f"chunk-{index:05d}.parquet"
        tmp = set_dir / f".chunk-{index:05d}.parquet.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, final)
        return final

    def complete_set(self, set_dir: Path) -> None:
        man = set_dir / "manifest.json"
        info = json.loads(man.read_text())
        info["complete"] = True
        _atomic_write_text(man, json.dumps(info, indent=2, default=str) + "\n")

    # -- reading -------------------------------------------------------------------------------------
    def iterations(self) -> list[int]:
        out = []
        for d in self.root.glob("iteration=*"):
            m = re.fullmatch(r"iteration=(\d+)", d.name)
            if m and any(d.glob("*/chunk-*.parquet")):
                out.append(int(m.group(1)))
        return sorted(out)

    def load(self, iterations: Iterable[int] | None = None, set_dirs: Iterable[Path] | None = None):
        """The samples of ``iterations`` (all if None) or of the given sample sets, as an in-memory
        ``datasets.Dataset`` (rows in file order: iteration, sample set, chunk)."""
        import datasets
        import pyarrow as pa
        import pyarrow.parquet as pq
        from datasets.table import InMemoryTable

        if set_dirs is not None:
            files = [f for d in set_dirs for f in sorted(Path(d).glob("chunk-*.parquet"))]
        else:
            its = self.iterations() if iterations is None else sorted(set(iterations))
            files = [f for i in its for f in sorted(self.root.glob(f"iteration={i:04d}/*/chunk-*.parquet"))]
        schema = _schema()
        tables = []
        for f in files:
            t = pq.read_table(f)
            if set(t.column_names) != set(BAG_COLUMNS):
                raise UserError(f"{f}: columns {sorted(t.column_names)} differ from this version's bag columns "
                                f"(written by an incompatible version?): use a new rs.bag_dir")
            tables.append(t.select(list(BAG_COLUMNS)).cast(schema))
        table = pa.concat_tables(tables) if tables else schema.empty_table()
        return datasets.Dataset(InMemoryTable(table))


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------- selection


def selection_iterations(available: Sequence[int], iteration: int, selection: str) -> list[int]:
    """The iterations a selection draws from at ``iteration``.

    ``all_iterations``: every iteration up to and including this one (the paper's fix from RLHF V4);
    ``previous_iteration``: this iteration's bag only, i.e. the samples of the model just sampled
    (RLHF V1-V3: V3 was trained on V2's samples only).
    """
    if selection not in SELECTIONS:
        raise UserError(f"rs.selection: unknown '{selection}' (choose {list(SELECTIONS)})")
    if selection == "previous_iteration":
        return [iteration] if iteration in available else []
    return [i for i in available if i <= iteration]


def select_best(prompt_ids: Sequence[str], rewards: Sequence[float], iterations: Sequence[int] | None = None,
                sample_index: Sequence[int] | None = None, tiebreak: Sequence[float] | None = None) -> list[int]:
    """Row indices of the best sample per prompt, in order of first appearance of each prompt.

    Best = highest reward; equal rewards go to the higher ``tiebreak`` score (the stage passes the helpfulness
    score: among equally safe answers to a safety prompt, the more helpful one, e.g. a refusal over noise),
    then to the later iteration, then to the lower sample index. NaN rewards never win.
    """
    n = len(prompt_ids)
    its = list(iterations) if iterations is not None else [0] * n
    idx = list(sample_index) if sample_index is not None else list(range(n))
    tie = list(tiebreak) if tiebreak is not None else [0.0] * n
    if not (len(rewards) == len(its) == len(idx) == len(tie) == n):
        raise ValueError("select_best: columns of different lengths")

    def key(i: int) -> tuple:
        r, t = float(rewards[i]), float(tie[i])
        return (-math.inf if math.isnan(r) else r, -math.inf if math.isnan(t) else t, its[i], -idx[i])

    best: dict[str, tuple[tuple, int]] = {}
    for i in range(n):
        k = key(i)
        cur = best.get(prompt_ids[i])
        if cur is None or k > cur[0]:
            best[prompt_ids[i]] = (k, i)
    return [i for _, i in best.values()]


def reward_table(prompt_ids: Sequence[str], sample_index: Sequence[int], rewards: Sequence[float]) -> torch.Tensor:
    """(P, K) float64 rewards, one row per prompt (in order of first appearance), one column per sample index."""
    order = list(dict.fromkeys(prompt_ids))
    k = max(sample_index) + 1 if len(sample_index) else 0
    row = {p: i for i, p in enumerate(order)}
    out = torch.full((len(order), k), float("nan"), dtype=torch.float64)
    if len(prompt_ids):
        out[torch.tensor([row[p] for p in prompt_ids]), torch.tensor(list(sample_index))] = torch.tensor(
            [float(r) for r in rewards], dtype=torch.float64)
    if torch.isnan(out).any():
        raise ValueError("reward_table: some prompts lack some sample indices")
    return out


def _expected_order_stat(sorted_vals: torch.Tensor, n: int, j: int) -> torch.Tensor:
    """E[j-th smallest of a random n-subset] (rows of ascending ``sorted_vals`` (P, K)), j in 1..n."""
    k = sorted_vals.shape[1]
    total = math.comb(k, n)
    w = torch.tensor([math.comb(i - 1, j - 1) * math.comb(k - i, n - j) / total for i in range(1, k + 1)],
                     dtype=torch.float64)
    return sorted_vals @ w


def best_of_n_curves(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper Fig. 7 from a (P, K) reward table: ``(max (K,), median (K,))``, entry N-1 for N samples.

    ``max[N-1]`` is the mean over prompts of the expected maximum reward among N samples, ``median[N-1]``
    of the expected median (the mean of the two middle values for even N), both over N drawn without
    replacement from the K samples of a prompt: an exact average over every N-subset (order statistics),
    not one noisy draw. N = 1 gives the mean reward for both; N = K the max and median of all K.
    Example: one prompt with rewards [1, 2, 3] gives max [2, 8/3, 3] and median [2, 2, 2].
    """
    if rewards.ndim != 2 or rewards.shape[1] < 1 or rewards.shape[0] < 1:
        raise ValueError(f"rewards must be (P, K) with P, K >= 1, got {tuple(rewards.shape)}")
    vals = rewards.to(torch.float64).sort(dim=1).values
    k = vals.shape[1]
    mx, md = torch.empty(k, dtype=torch.float64), torch.empty(k, dtype=torch.float64)
    for n in range(1, k + 1):
        mx[n - 1] = _expected_order_stat(vals, n, n).mean()
        if n % 2:
            md[n - 1] = _expected_order_stat(vals, n, (n + 1) // 2).mean()
        else:
            md[n - 1] = 0.5 * (_expected_order_stat(vals, n, n // 2) + _expected_order_stat(vals, n, n // 2 + 1)).mean()
    return mx, md


def pick_temperature(max_at_k: Mapping[float, float]) -> float:
    """The temperature with the highest mean max@K (``{temperature: mean over prompts of the max reward among K}``).

    Ties go to the lowest temperature (the less random policy); values within float rounding (a relative 1e-12) of
    the best count as ties, so that the same rewards summed in another prompt order do not decide. Example:
    ``{0.8: 0.61, 1.0: 0.70, 1.2: 0.66}`` gives 1.0, ``{0.8: 0.7, 1.2: 0.7}`` gives 0.8. An empty mapping or a NaN
    value is refused (ValueError).
    """
    if not max_at_k:
        raise ValueError("pick_temperature: no candidate temperatures (an empty max@K mapping)")
    nan = [t for t, v in max_at_k.items() if math.isnan(float(v))]
    if nan:
        raise ValueError(f"pick_temperature: max@K is NaN for temperature(s) {sorted(nan)}")
    best = max(float(v) for v in max_at_k.values())
    tol = 1e-12 * max(1.0, abs(best))
    return float(min(t for t, v in max_at_k.items() if float(v) >= best - tol))


def max_median_figure(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                      title: str = "Rejection sampling: reward among N samples"):
    """The Fig. 7 plot (a matplotlib figure): per label, the max (solid) and median (dashed) curve over N = 1..K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, (label, (mx, md)) in enumerate(curves.items()):
        ns = list(range(1, len(mx) + 1))
        ax.plot(ns, list(mx), color=f"C{i}", label=f"max {label}".strip())
        ax.plot(ns, list(md), color=f"C{i}", linestyle="--", label=f"median {label}".strip())
    ax.set_xlabel("N samples")
    ax.set_ylabel("reward score")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
