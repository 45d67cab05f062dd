"""Packing tokenized examples into fixed-length rows (Llama 2 §3.1: fill the sequence length).

Pure functions over lists of ints. Three layouts:
- ``isolated`` (default): whole examples are placed into rows (fill-and-close or best-fit decreasing,
  whichever needs fewer rows);
  ``position_ids`` restart at 0 for every example, which (with no attention mask and no KV cache)
  makes transformers build a block-diagonal causal mask, so an example attends only to itself.
  The first label of every example is masked so no loss crosses an example boundary.
- ``concat``: the paper's layout: all examples are concatenated into one stream and cut every
  ``seq_len`` tokens; attention may cross examples; ``position_ids`` run 0..seq_len-1.
- ``none``: one example per row, no padding here (the collator pads to the longest in a batch):
  the baseline the packed layouts are measured against.
"""
from __future__ import annotations

import bisect
from collections import defaultdict, deque
from dataclasses import dataclass, field

from llama2_lit.core.losses import IGNORE_INDEX

PACKINGS = ("isolated", "concat", "none")
OVERLONG = ("truncate", "drop", "split")


@dataclass
class PackStats:
    examples: int = 0          # examples given
    truncated: int = 0         # examples cut to seq_len
    dropped: int = 0           # examples dropped (overlong with overlong=drop, or no label left after truncation)
    rows: int = 0
    tokens: int = 0            # non-pad tokens in rows
    capacity: int = 0          # rows * seq_len (for `none`: the sum of row lengths)
    label_tokens: int = 0      # tokens that carry a label

    @property
    def efficiency(self) -> float:
        """Non-pad tokens / all tokens in the packed rows."""
        return self.tokens / self.capacity if self.capacity else 0.0

    def as_dict(self, prefix: str = "packing/") -> dict[str, float]:
        d = {k: getattr(self, k) for k in ("examples", "truncated", "dropped", "rows", "tokens", "label_tokens")}
        d["efficiency"] = self.efficiency
        return {prefix + k: v for k, v in d.items()}


@dataclass
class Row:
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)


def _fit(examples, seq_len: int, overlong: str, stats: PackStats):
    """Apply the overlong policy; yield examples that fit (or all, for ``split``)."""
    for ids, labels in examples:
        stats.examples += 1
        if len(ids) != len(labels):
            raise ValueError(f"example {stats.examples}: {len(ids)} ids but {len(labels)} labels")
        if len(ids) > seq_len and overlong != "split":
            if overlong == "drop":
                stats.dropped += 1
                continue
            ids, labels = ids[:seq_len], labels[:seq_len]
            stats.truncated += 1
        if all(x == IGNORE_INDEX for x in labels[1:]):
            stats.dropped += 1  # nothing left to learn from (e.g. the prompt alone fills seq_len)
            continue
        yield ids, labels


def check_packing(packing: str, overlong: str, error: type[Exception] = ValueError, prefix: str = "") -> None:
    """Refuse an unknown ``packing`` or ``overlong``, and ``overlong=split`` without ``packing=concat``; ``error`` and
    ``prefix`` (the option path, e.g. ``data.``) word the refusal for the caller."""
    if packing not in PACKINGS:
        raise error(f"{prefix}packing: unknown '{packing}' (choose {list(PACKINGS)})")
    if overlong not in OVERLONG:
        raise error(f"{prefix}overlong: unknown '{overlong}' (choose {list(OVERLONG)})")
    if overlong == "split" and packing != "concat":
        raise error(f"{prefix}overlong=split needs {prefix}packing=concat (an isolated example cannot span rows)")


def pack(examples, seq_len: int, pad_id: int, packing: str = "isolated", overlong: str = "truncate"):
    """Pack ``examples`` (an iterable of ``(input_ids, labels)``) into rows of ``seq_len`` tokens.

    Returns ``(rows, stats)``; ``rows`` is a list of ``Row`` (lists of ints of length ``seq_len``,
    except for ``packing='none'``). Pad positions carry ``pad_id`` and label ``IGNORE_INDEX``.
    """
    check_packing(packing, overlong)
    if seq_len < 2:
        raise ValueError("seq_len must be >= 2")
    stats = PackStats()
    kept = list(_fit(examples, seq_len, overlong, stats))
    if packing == "none":
        rows = [Row(list(i), list(l), list(range(len(i)))) for i, l in kept]
        stats.capacity = sum(len(r.input_ids) for r in rows)
    elif packing == "concat":
        rows = _concat(kept, seq_len, pad_id)
        stats.capacity = len(rows) * seq_len
    else:
        rows = _isolated(kept, seq_len, pad_id)
        stats.capacity = len(rows) * seq_len
    stats.rows = len(rows)
    stats.tokens = sum(len(i) for i, _ in kept)
    stats.label_tokens = sum(sum(1 for x in r.labels[1:] if x != IGNORE_INDEX) for r in rows)
    return rows, stats


def _concat(kept, seq_len: int, pad_id: int) -> list[Row]:
    stream_ids = [t for ids, _ in kept for t in ids]
    stream_labels = [t for _, labels in kept for t in labels]
    rows = []
    for s in range(0, len(stream_ids), seq_len):
        ids, labels = stream_ids[s:s + seq_len], stream_labels[s:s + seq_len]
        n = len(ids)
        rows.append(Row(ids + [pad_id] * (seq_len - n), labels + [IGNORE_INDEX] * (seq_len - n), list(range(seq_len))))
    return rows


def _isolated(kept, seq_len: int, pad_id: int) -> list[Row]:
    """Whole examples into rows, by whichever of two heuristics needs fewer rows (ties: fill-and-close).

    Best-fit decreasing is strong when examples are long relative to a row, but its rows hold examples of
    one length, and on many short examples of few distinct lengths it strands a small gap in every row
    (8 x 31 tokens leave 8 that no example fills). Fill-and-close fills rows in data order and closes each
    with an exact subset sum, so rows mix lengths (and task families) and come out full.
    """
    lengths = [len(ids) for ids, _ in kept]
    bins = _fill_and_close(lengths, seq_len)
    bfd = _best_fit_decreasing(lengths, seq_len)
    if len(bfd) < len(bins):
        bins = bfd
    return [_row(kept, members, seq_len, pad_id) for members in bins]


def _row(kept, members: list[int], seq_len: int, pad_id: int) -> Row:
    row = Row()
    for k in sorted(members):  # keep the original order inside a row
        ids, labels = kept[k]
        row.input_ids += ids
        row.labels += [IGNORE_INDEX] + labels[1:]  # no loss across the example boundary
        row.position_ids += list(range(len(ids)))
    pad = seq_len - len(row.input_ids)
    row.input_ids += [pad_id] * pad
    row.labels += [IGNORE_INDEX] * pad
    row.position_ids += list(range(pad))  # padding forms its own block; it never reaches a real token
    return row


def _best_fit_decreasing(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Each example (longest first) goes into the open row it fills most tightly. Returns indices per row."""
    order = sorted(range(len(lengths)), key=lambda k: (-lengths[k], k))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []     # sorted (free space, row index)
    for k in order:
        n = lengths[k]
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            space, b = free.pop(j)
        else:
            space, b = seq_len, len(bins)
            bins.append([])
        bins[b].append(k)
        if space - n > 0:
            bisect.insort(free, (space - n, b))
    return bins


def _fill_and_close(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Rows one at a time: take examples in data order while at least one longest example's worth of
    space would remain, then close the row with the subset of all remaining examples whose lengths sum
    closest to the space left (exact when possible). Returns example indices per row."""
    reserve = max(lengths, default=0)
    by_len: dict[int, deque[int]] = defaultdict(deque)   # unplaced examples of each length, in data order
    for k, n in enumerate(lengths):
        by_len[n].append(k)
    placed = [False] * len(lengths)
    bins: list[list[int]] = []
    nxt, left = 0, len(lengths)
    while left:
        row, space = [], seq_len
        while nxt < len(lengths):
            if placed[nxt]:
                nxt += 1
                continue
            n = lengths[nxt]
            if n > space - reserve:
                break
            by_len[n].popleft()  # the earliest unplaced example of its length is this one
            placed[nxt] = True
            row.append(nxt)
            space -= n
            nxt += 1
        for n, count in _closest_subset({n: len(q) for n, q in by_len.items() if q}, space):
            for _ in range(count):
                k = by_len[n].popleft()
                placed[k] = True
                row.append(k)
        if not row:  # cannot happen for lengths <= seq_len; guards against an endless loop
            raise ValueError(f"an example longer than seq_len={seq_len} reached the packer")
        left -= len(row)
        bins.append(row)
    return bins


def _closest_subset(counts: dict[int, int], space: int) -> list[tuple[int, int]]:
    """Bounded subset sum: ``(length, how many)`` pairs (longest first) from ``counts`` (length -> available)
    whose total is the largest reachable <= ``space``; longer lengths are preferred among equal totals.

    The reachable totals are a bitset (a Python int), one shift-or per binary chunk of each length's count.
    """
    chunks: list[tuple[int, int]] = []
    for n in sorted((n for n in counts if n <= space), reverse=True):
        c, k = min(counts[n], space // n), 1
        while c > 0:
            t = min(k, c)
            chunks.append((n, t))
            c, k = c - t, 2 * k
    mask = (1 << (space + 1)) - 1
    reach = [1]                      # reach[i]: totals reachable with the first i chunks
    for n, t in chunks:
        reach.append((reach[-1] | (reach[-1] << (n * t))) & mask)
        if reach[-1] >> space:
            break                    # exact fit found
    total = reach[-1].bit_length() - 1
    picks: dict[int, int] = {}
    for i in range(len(reach) - 1, 0, -1):   # walk back: a chunk is used iff the total needed it
        if not (reach[i - 1] >> total) & 1:
            n, t = chunks[i - 1]
            picks[n] = picks.get(n, 0) + t
            total -= n * t
    return sorted(picks.items(), reverse=True)
