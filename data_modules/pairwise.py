"""PairwiseDataModule: preference pairs -> length-grouped, dynamically padded chosen/rejected batches.

Pairs come from files (anything :func:`data_modules.preferences.read_pairs` reads: flat JSONL, chat
messages, Anthropic HH transcripts) or from the synthetic world's simulated annotator
(:mod:`data_modules.synthetic_pairs`). Each side is ``prompt + answer`` rendered with the tokenizer's
chat template; a side longer than ``max_length`` loses prompt tokens from the left (counted).

A batch (``collate_pairs``), B pairs padded on the right to one common length T::

    chosen_input_ids, chosen_attention_mask      (B, T) long
    rejected_input_ids, rejected_attention_mask  (B, T) long
    attention_mask                               (2B, T) long: chosen rows then rejected rows, the mask
                                                 of the one-forward batch (token counters read it)
    margin                                       (B,) float32, the loss margin m(rating)
    rating                                       list[str] of B bucket names
    is_safety                                    (B,) bool
    safety_label                                 list of B safety bins (Table 29) or None
    chosen_answer_mask, rejected_answer_mask     (B, T) long: 1 on each side's answer tokens (DPO's log-probs)

Usable on its own::

    dm = PairwiseDataModule(tok, path="../shared/data/preferences/hh_harmless/train.jsonl", format="hh")
    dm.setup("fit"); batch = next(iter(dm.train_dataloader()))
"""
from __future__ import annotations

import logging
import math
import random
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data_modules.preferences import MARGIN_PRESETS, REWARDS, PreferencePair, mix_for_reward, read_pairs
from data_modules.records import render
from data_modules.resumable import ResumableDataLoader
from data_modules.synthetic_pairs import build_synthetic_pairs
from llama2_lit.errors import UserError
from llama2_lit.world import oracle as world

log = logging.getLogger(__name__)

POOLS = ("helpfulness", "safety", "other")
OVERLONG = ("truncate", "drop", "error")


# ------------------------------------------------------------------------------------------ encoding


@dataclass(frozen=True)
class Encoded:
    """One side of a pair: ``ids`` = (possibly truncated) prompt + answer; tokens cut from each part."""

    ids: list[int]
    prompt_cut: int  # prompt tokens removed from the left (after a leading BOS, which is kept)
    answer_cut: int  # answer tokens removed from the right (only when the answer alone is too long)
    answer_start: int = 0  # index in ``ids`` of the answer's first token (the rest is the rendered prompt)


def encode_response(tokenizer, prompt: str | list[dict], answer: str, max_length: int | None = None) -> Encoded:
    """Token ids of ``prompt`` (a user string or chat messages ending with a user turn) answered by ``answer``.

    The conversation is rendered with the tokenizer's chat template; the answer's tokens are those
    after the rendering with a generation prompt (so the template's end-of-turn tokens belong to the
    answer and the reward is read at the last of them). Over ``max_length``: prompt tokens are removed
    from the left, keeping a leading BOS; if the prompt would keep fewer than ``min(prompt, max_length
    // 2)`` tokens, the answer is cut from the right instead so that the prompt keeps that many.
    """
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    prompt_ids = render(tokenizer, msgs, add_generation_prompt=True)
    full = render(tokenizer, msgs + [{"role": "assistant", "content": answer}], add_generation_prompt=False)
    if full[: len(prompt_ids)] != prompt_ids:
        raise UserError("chat template: the rendering with the answer does not extend the rendering of the prompt "
                        "with a generation prompt, so prompt and answer tokens cannot be separated")
    if max_length is None or len(full) <= max_length:
        return Encoded(full, 0, 0, len(prompt_ids))
    answer_ids = full[len(prompt_ids):]
    bos = tokenizer.bos_token_id
    head = prompt_ids[:1] if bos is not None and prompt_ids[:1] == [bos] else []
    body = prompt_ids[len(head):]
    keep = max(max_length - len(answer_ids), min(len(prompt_ids), max_length // 2))  # prompt tokens to keep
    keep_body = max(0, keep - len(head))
    answer_keep = max_length - len(head) - keep_body
    ids = head + body[len(body) - keep_body:] + answer_ids[:answer_keep]
    return Encoded(ids, len(body) - keep_body, len(answer_ids) - answer_keep, len(head) + keep_body)


@dataclass(frozen=True)
class EncodedPair:
    chosen: list[int]
    rejected: list[int]
    margin: float
    rating: str
    is_safety: bool
    safety_label: str | None = None  # Table 29's bin (data_modules.preferences.SAFETY_LABELS) or None
    chosen_start: int = 0  # index of the chosen answer's first token in ``chosen`` (DPO's log-probs start there)
    rejected_start: int = 0

    @property
    def length(self) -> int:
        return max(len(self.chosen), len(self.rejected))


def encode_pairs(pairs: Sequence[PreferencePair], tokenizer, *, max_length: int, margin: str,
                 overlong: str = "truncate") -> tuple[list[EncodedPair], dict[str, int]]:
    """Tokenize pairs; returns ``(encoded, counts)``.

    ``overlong``: ``truncate`` (see :func:`encode_response`), ``drop`` (skip the pair, counted) or
    ``error`` (raise a :class:`UserError` naming the file and line). Counts: ``truncated_pairs``,
    ``truncated_sequences``, ``truncated_prompt_tokens``, ``truncated_answer_tokens``, ``dropped_overlong``,
    ``dropped_identical_tokens`` (distinct answers whose token ids coincide, e.g. after truncation).
    """
    if overlong not in OVERLONG:
        raise UserError(f"data.overlong: unknown '{overlong}' (choose {', '.join(OVERLONG)})")
    if margin not in MARGIN_PRESETS:
        raise UserError(f"reward.margin: unknown '{margin}' (choose {', '.join(MARGIN_PRESETS)})")
    counts = Counter({k: 0 for k in ("truncated_pairs", "truncated_sequences", "truncated_prompt_tokens",
                                     "truncated_answer_tokens", "dropped_overlong", "dropped_identical_tokens")})
    out = []
    for p in pairs:
        limit = max_length if overlong == "truncate" else None
        c = encode_response(tokenizer, p.prompt, p.chosen, limit)
        r = encode_response(tokenizer, p.prompt, p.rejected, limit)
        if overlong != "truncate" and max(len(c.ids), len(r.ids)) > max_length:
            if overlong == "error":
                raise UserError(f"{p.where}: prompt + answer is {max(len(c.ids), len(r.ids))} tokens, more than "
                                f"max_length={max_length} (set data.overlong=truncate or drop)")
            counts["dropped_overlong"] += 1
            continue
        cut = [e for e in (c, r) if e.prompt_cut or e.answer_cut]
        if cut:
            counts["truncated_pairs"] += 1
            counts["truncated_sequences"] += len(cut)
            counts["truncated_prompt_tokens"] += sum(e.prompt_cut for e in cut)
            counts["truncated_answer_tokens"] += sum(e.answer_cut for e in cut)
        if c.ids == r.ids:  # distinct answers that tokenize (or truncate) to the same ids carry no signal
            counts["dropped_identical_tokens"] += 1
            continue
        out.append(EncodedPair(c.ids, r.ids, p.margin_value(margin), p.rating, p.is_safety, p.safety_label,
                               c.answer_start, r.answer_start))
    return out, dict(counts)


# ------------------------------------------------------------------------------------------ batching


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int,
              length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)``, both (N, T) long, right-padded to ``length`` (default: the longest)."""
    t = max(len(s) for s in seqs) if length is None else length
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s) > t:
            raise ValueError(f"sequence of {len(s)} tokens does not fit length {t}")
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def collate_pairs(rows: Sequence[EncodedPair], pad_id: int, pad_to: int | None = None) -> dict[str, Any]:
    """A pair batch (see the module docstring); both sides padded to one length: the longest, or ``pad_to``."""
    c_ids, c_mask = pad_right([r.chosen for r in rows] + [r.rejected for r in rows], pad_id, pad_to)
    b = len(rows)
    return {
        "chosen_input_ids": c_ids[:b], "chosen_attention_mask": c_mask[:b],
        "rejected_input_ids": c_ids[b:], "rejected_attention_mask": c_mask[b:],
        "attention_mask": c_mask,
        "margin": torch.tensor([r.margin for r in rows], dtype=torch.float32),  # (B,)
        "rating": [r.rating for r in rows],
        "is_safety": torch.tensor([r.is_safety for r in rows], dtype=torch.bool),
        "safety_label": [r.safety_label for r in rows],
        # answer tokens of each side (B, T) long: 1 from the answer's first token to the last real token
        "chosen_answer_mask": _answer_mask(c_mask[:b], [r.chosen_start for r in rows]),
        "rejected_answer_mask": _answer_mask(c_mask[b:], [r.rejected_start for r in rows]),
    }


def _answer_mask(mask: torch.Tensor, starts: Sequence[int]) -> torch.Tensor:
    pos = torch.arange(mask.shape[1]).unsqueeze(0)  # (1, T)
    return mask * (pos >= torch.tensor(starts).unsqueeze(1)).long()


def concat_pairs(batch: Mapping[str, torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-forward batch: ``cat([chosen, rejected])`` as ``(ids, mask)`` of shape (2B, T), right-padded
    to the longer of the two sides when they differ."""
    ci, cm = batch["chosen_input_ids"], batch["chosen_attention_mask"]
    ri, rm = batch["rejected_input_ids"], batch["rejected_attention_mask"]
    t = max(ci.shape[1], ri.shape[1])

    def pad(x, value):
        return torch.nn.functional.pad(x, (0, t - x.shape[1]), value=value) if x.shape[1] < t else x

    return torch.cat([pad(ci, pad_id), pad(ri, pad_id)]), torch.cat([pad(cm, 0), pad(rm, 0)])


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of similar length: shuffle, cut into mega-batches of ``batch_size * mega_batch`` items,
    sort each by length (longest first), cut into batches, shuffle the batch order and put the batch
    with the longest item first (an out-of-memory shows at step 0). ``shuffle=False`` sorts the whole
    set by length. A new order every ``__iter__`` (epoch), deterministic in ``seed``: the pass uses ``self.epoch``,
    read when its first batch is drawn, then counts it up; Lightning sets the epoch before every pass (through
    ``self.sampler.set_epoch``, where it looks for a batch sampler's sampler), so a resumed run deals epoch ``e``
    the batches an uninterrupted one did (see ``data_modules/resumable.py``).

    Distributed runs: pass ``num_replicas``/``rank``; every rank gets ``len(self)`` batches (the tail
    batches that do not divide evenly are dropped) and Lightning's ``use_distributed_sampler`` must be off.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool = True, mega_batch: int = 50,
                 seed: int = 0, group_by_length: bool = True, num_replicas: int = 1, rank: int = 0):
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths, self.batch_size, self.shuffle = list(lengths), batch_size, shuffle
        self.mega_batch, self.seed, self.group_by_length = max(1, mega_batch), seed, group_by_length
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self.sampler = _EpochSetter(self)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        n, bs = len(self.lengths), self.batch_size
        idx = list(range(n))
        rng = random.Random(f"{self.seed}:{self.epoch}")
        if self.shuffle:
            rng.shuffle(idx)
        if not self.group_by_length:
            return [idx[i:i + bs] for i in range(0, n, bs)]
        if not self.shuffle:
            idx.sort(key=lambda i: -self.lengths[i])
            return [idx[i:i + bs] for i in range(0, n, bs)]
        mega = bs * self.mega_batch
        batches = []
        for s in range(0, n, mega):
            group = sorted(idx[s:s + mega], key=lambda i: -self.lengths[i])
            batches += [group[i:i + bs] for i in range(0, len(group), bs)]
        rng.shuffle(batches)
        longest = max(range(len(batches)), key=lambda j: self.lengths[batches[j][0]])
        batches[0], batches[longest] = batches[longest], batches[0]
        return batches

    def __iter__(self) -> Iterator[list[int]]:  # a generator: the epoch is read at the first batch
        batches = self._batches()
        self.epoch += 1
        if self.num_replicas > 1:
            per = len(batches) // self.num_replicas
            batches = batches[self.rank::self.num_replicas][:per]
        yield from batches

    def __len__(self) -> int:
        n = math.ceil(len(self.lengths) / self.batch_size)
        return n // self.num_replicas if self.num_replicas > 1 else n


class _EpochSetter:
    """``batch_sampler.sampler`` for Lightning's ``set_epoch`` call (it sets no epoch on a batch sampler itself)."""

    def __init__(self, batch_sampler: LengthGroupedBatchSampler):
        self.batch_sampler = batch_sampler

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


class _ListDataset(Dataset):
    def __init__(self, rows: list):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.rows[i]


# -------------------------------------------------------------------------------------- DataModule


def _as_list(x) -> list[str]:
    if x is None:
        return []
    if isinstance(x, (str, Path)):
        return [str(x)]
    return [str(p) for p in x]


def _pool_of(p: PreferencePair) -> str:
    return "safety" if p.is_safety else "helpfulness"


class PairwiseDataModule(L.LightningDataModule):
    """Preference pairs for reward modelling (Llama 2 section 3.2.2).

    Args:
        tokenizer: a transformers tokenizer with a chat template and a pad token distinct from EOS.
        path: ``synthetic`` (simulated annotator over the world, options in ``synthetic``) or one or more
            files/folders of pairs (``format``: auto | flat | messages | hh). Rows go to the ``safety``
            pool when ``is_safety`` (default ``default_is_safety``), else to ``helpfulness``.
        other_path: files whose pairs form the ``other`` pool (open-source helpfulness data).
        val_path: validation files; else ``val_fraction`` of ``path`` is held out (before mixing).
        reward: ``helpfulness`` | ``safety``: selects the training mixture (``mix_for_reward``) with
            ``mixture`` ratios (``helpful_other_ratio``, ``safety_helpful_ratio``); ``mix=False`` trains on
            every pair as read.
        margin: ``none`` | ``small`` | ``large`` (paper Table 27); a row's explicit ``margin`` wins.
        val_pools: validate only on pairs of these pools (e.g. ``[safety]``); null = all.
        max_length: tokens per side; ``overlong``: truncate | drop | error (see :func:`encode_pairs`).
        on_error: ``raise`` (first bad row stops the run, naming file and line) or ``skip`` (counted).
        batch_size: pairs per micro-batch; ``group_by_length`` with ``mega_batch`` (see the sampler).
        limit / val_limit: use only the first N train / validation pairs read (documented subsets).
        run_dir: where synthetic pairs are written as JSONL for inspection.
        gold_eval: offer ``eval_prompts`` (``num_eval`` held-out world prompts) to the gold-eval callback, for a policy
            trained on world pairs (stage=dpo: synthetic pairs, or pairs a pipeline collected on the world; reward
            models leave it off).
    """

    pairwise = True  # the RewardModule checks this: stage=rm needs pair batches

    def __init__(self, tokenizer, path: str | Sequence[str] = "synthetic", val_path: str | Sequence[str] | None = None,
                 other_path: str | Sequence[str] | None = None, format: str = "auto", default_is_safety: bool = False,
                 val_fraction: float = 0.05, reward: str = "helpfulness", margin: str = "small",
                 mixture: Mapping[str, float] | None = None, mix: bool = True, val_pools: Sequence[str] | None = None,
                 max_length: int = 512, overlong: str = "truncate", on_error: str = "raise", batch_size: int = 8,
                 val_batch_size: int | None = None, group_by_length: bool = True, mega_batch: int = 50,
                 limit: int | None = None, val_limit: int | None = None, seed: int = 0, num_workers: int = 0,
                 synthetic: Mapping[str, Any] | None = None, run_dir: str | None = None, gold_eval: bool = False,
                 num_eval: int = 1000):
        super().__init__()
        if tokenizer.pad_token_id is None:
            raise UserError("tokenizer has no pad token (reward models read the last non-pad token)")
        if tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise UserError("tokenizer pad == eos: a trailing EOS would be taken for padding; add a distinct pad token")
        if reward not in REWARDS:
            raise UserError(f"reward.name: unknown '{reward}' (choose {', '.join(REWARDS)})")
        if margin not in MARGIN_PRESETS:
            raise UserError(f"reward.margin: unknown '{margin}' (choose {', '.join(MARGIN_PRESETS)})")
        if overlong not in OVERLONG:
            raise UserError(f"data.overlong: unknown '{overlong}' (choose {', '.join(OVERLONG)})")
        if on_error not in ("raise", "skip"):
            raise UserError(f"data.on_error: unknown '{on_error}' (choose raise, skip)")
        bad = [p for p in (val_pools or []) if p not in POOLS]
        if bad:
            raise UserError(f"data.val_pools: unknown {bad} (choose from {', '.join(POOLS)})")
        self.tokenizer = tokenizer
        self.path, self.val_path, self.other_path = path, val_path, other_path
        self.format, self.default_is_safety, self.val_fraction = format, default_is_safety, val_fraction
        self.reward, self.margin, self.mixture, self.mix = reward, margin, dict(mixture or {}), mix
        self.val_pools = list(val_pools) if val_pools else None
        self.max_length, self.overlong, self.on_error = max_length, overlong, on_error
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.group_by_length, self.mega_batch = group_by_length, mega_batch
        self.limit, self.val_limit, self.seed, self.num_workers = limit, val_limit, seed, num_workers
        self.synthetic = dict(synthetic or {})
        self.run_dir = run_dir
        # gold-eval callbacks generate from a causal LM: on for stage=dpo (a policy) on the world, off for reward models
        self.oracle, self.num_eval = bool(gold_eval), int(num_eval)
        self.val_prompts: list[list[dict]] = []  # the validation pairs' prompts (held out), for stage=dpo's KL
        self.stats: dict[str, float] = {}
        self.train_pairs: list[EncodedPair] | None = None
        self.val_pairs: list[EncodedPair] | None = None

    # -- reading --------------------------------------------------------------------------------
    def _read(self, paths: list[str], what: str, default_is_safety: bool) -> list[PreferencePair]:
        pairs: list[PreferencePair] = []
        for p in paths:
            got, st = read_pairs(p, fmt=self.format, on_error=self.on_error, default_is_safety=default_is_safety)
            self._count(what, st)
            if st["skipped"]:
                log.warning("%s: skipped %d of %d rows: %s (first: %s)", p, st["skipped"], st["read"],
                            st["skipped_by_reason"], next(iter(st["first_error_by_reason"].values())))
            pairs += got
        return pairs

    def _count(self, what: str, st: Mapping[str, Any]) -> None:
        for k in ("read", "kept", "skipped"):
            self.stats[f"data/{what}/{k}"] = self.stats.get(f"data/{what}/{k}", 0) + st[k]
        for reason, n in st.get("skipped_by_reason", {}).items():
            key = f"data/{what}/skipped/{reason}"
            self.stats[key] = self.stats.get(key, 0) + n

    def _synthetic_files(self) -> tuple[list[str], list[str]]:
        files, stats = build_synthetic_pairs(self.tokenizer, seed=self.seed, run_dir=self.run_dir,
                                             **self.synthetic)
        self.stats.update(stats)
        return [files["train"]], [files["val"]]

    def setup(self, stage: str | None = None) -> None:
        if self.train_pairs is not None:
            return
        if self.path == "synthetic":
            train_files, val_files = self._synthetic_files()
        else:
            train_files, val_files = _as_list(self.path), _as_list(self.val_path)
            if not train_files:
                raise UserError("data.path: no preference files given")
        train = self._read(train_files, "train", self.default_is_safety)
        if self.limit is not None:
            train = train[: self.limit]
        if val_files:
            val = self._read(val_files, "val", self.default_is_safety)
            val_source = f"{len(val)} pairs read from data.val_path"
        else:
            idx = list(range(len(train)))
            random.Random(f"{self.seed}:val").shuffle(idx)
            n_val = max(1, round(self.val_fraction * len(train))) if len(train) > 1 else 0
            held = set(idx[:n_val])
            val = [train[i] for i in sorted(held)]
            val_source = (f"{len(train)} pairs read from data.path, {len(val)} of them held out for validation "
                          f"(data.val_fraction={self.val_fraction})")
            train = [train[i] for i in range(len(train)) if i not in held]
        if self.val_limit is not None:
            val = val[: self.val_limit]
        other = self._read(_as_list(self.other_path), "other", False) if self.other_path else []

        # the training mixture (paper 3.2.2): ratios from config, sampled counts logged
        helpful = [p for p in train if _pool_of(p) == "helpfulness"]
        safety = [p for p in train if _pool_of(p) == "safety"]
        if self.mix:
            train, counts = mix_for_reward(helpful, safety, other, reward=self.reward, seed=self.seed, **self.mixture)
        else:
            train = train + other
            counts = {"helpfulness": len(helpful), "safety": len(safety), "other": len(other), "total": len(train)}
        self.stats.update({f"data/mix/{k}": v for k, v in counts.items()})
        log.info("%s RM training mixture (%s): %s of %d helpfulness, %d safety, %d other pairs read", self.reward,
                 self.mixture or "defaults", counts, len(helpful), len(safety), len(other))
        if self.val_pools:
            val = [p for p in val if _pool_of(p) in self.val_pools]
            if not val:
                raise UserError(f"no validation pairs in pools {self.val_pools} (data.val_pools)")

        seen: set[str] = set()
        for pair in val:  # held-out prompts, each once, in file order
            key = repr(pair.prompt)
            if key not in seen:
                seen.add(key)
                self.val_prompts.append(pair.prompt)
        self.train_pairs = self._encode(train, "train")
        self.val_pairs = self._encode(val, "val", val_source, "; give validation pairs with data.val_path=<file>")
        log.info("pairs: %d train, %d val (max_length=%d, margin=%s)", len(self.train_pairs), len(self.val_pairs),
                 self.max_length, self.margin)

    def _encode(self, pairs: list[PreferencePair], what: str, source: str = "", hint: str = "") -> list[EncodedPair]:
        """Tokenized ``pairs`` with their counts in ``stats``; none left is a UserError saying where the pairs came
        from (``source``), followed by ``hint``."""
        enc, counts = encode_pairs(pairs, self.tokenizer, max_length=self.max_length, margin=self.margin,
                                   overlong=self.overlong)
        self.stats.update({f"data/{what}/{k}": v for k, v in counts.items()})
        self.stats[f"data/{what}/pairs"] = len(enc)
        for b, n in Counter(p.rating for p in enc).items():
            self.stats[f"data/{what}/rating/{b}"] = n
        for b, n in Counter(p.safety_label for p in enc if p.safety_label).items():
            self.stats[f"data/{what}/safety_label/{b}"] = n
        if counts.get("truncated_pairs"):
            log.warning("%s: %d of %d pairs truncated to max_length=%d (%d prompt tokens cut from the left, %d answer "
                        "tokens from the right)", what, counts["truncated_pairs"], len(pairs), self.max_length,
                        counts["truncated_prompt_tokens"], counts["truncated_answer_tokens"])
        if not enc:
            tokenized = f"{len(pairs)} to tokenize, none left after tokenization ({dict(counts)})" if pairs else ""
            raise UserError(f"no {what} pairs: {', '.join(x for x in (source, tokenized) if x)}{hint}")
        return enc

    def eval_prompts(self) -> list[str]:
        """Held-out world prompts for the gold evaluation (``gold_eval`` on the synthetic world), else none."""
        if not self.oracle:
            return []
        return [t.prompt for t in world.generate_tasks(self.num_eval, seed=self.seed + 2, split="heldout",
                                                       safety_fraction=self.synthetic.get("safety_fraction", 0.2))]

    def kl_prompts(self, n: int) -> list[list[dict]]:
        """Up to ``n`` held-out prompts (the validation pairs' own) for a policy's KL to its reference."""
        return self.val_prompts[:n]

    # -- loaders --------------------------------------------------------------------------------
    def _loader(self, rows: list[EncodedPair], batch_size: int, shuffle: bool) -> DataLoader:
        world, rank = 1, 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        sampler = LengthGroupedBatchSampler([r.length for r in rows], batch_size, shuffle=shuffle,
                                            mega_batch=self.mega_batch, seed=self.seed,
                                            group_by_length=self.group_by_length, num_replicas=world, rank=rank)
        cls = ResumableDataLoader if shuffle else DataLoader  # training: a position Lightning checkpoints
        return cls(_ListDataset(rows), batch_sampler=sampler, num_workers=self.num_workers,
                   collate_fn=partial(collate_pairs, pad_id=self.tokenizer.pad_token_id))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_pairs, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_pairs, self.val_batch_size, shuffle=False)


__all__ = ["POOLS", "Encoded", "EncodedPair", "LengthGroupedBatchSampler", "PairwiseDataModule",
           "collate_pairs", "concat_pairs", "encode_pairs", "encode_response", "pad_right"]
