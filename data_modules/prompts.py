"""Rejection-sampling data: prompts to sample from (``data=rs_prompts``) and the selected best samples to
fine-tune on (``data=rs_bag``).

    dm = PromptDataModule(tok, path="synthetic", synthetic={"num_train": 256})
    dm.prompts()[0]            # Prompt(id='…', text='Reverse the word: lemon', is_safety=False)

    dm = RSSelectionDataModule(tok, path="outputs/runs/rs_iter1")   # reads <run>/selected.parquet
    dm.setup("fit"); batch = next(iter(dm.train_dataloader()))       # packed SFT rows, loss on the answers
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Sampler

from data_modules.annotations import prompt_id
from data_modules.resumable import EpochRandomSampler, ResumableDataLoader
from data_modules.sft import PackedSFTDataModule
from data_modules.sources import brief, iter_records
from llama2_lit.world import oracle as world
from llama2_lit.errors import DataError, UserError

log = logging.getLogger(__name__)
_SYNTHETIC = {"num_train": 512, "num_val": 0, "num_eval": 128, "safety_fraction": 0.2}


@dataclass(frozen=True)
class Prompt:
    id: str          # sha1 of the text (16 hex): the key samples are grouped by across iterations
    text: str        # the user message
    is_safety: bool  # the prompt's safety tag (Llama 2's IS_SAFETY(p))


def world_eval_prompts(num_eval: int, seed: int, safety_fraction: float) -> list[str]:
    """The held-out world prompts ``PackedSFTDataModule`` evaluates on for the same seed (so runs compare)."""
    return [t.prompt for t in world.generate_tasks(num_eval, seed=seed + 2, split="heldout",
                                                  safety_fraction=safety_fraction)]


class PromptDataModule(L.LightningDataModule):
    """Prompts (with their safety tag) from the synthetic world or a file.

    Args:
        tokenizer: the policy's tokenizer (kept for the stage; prompts are text).
        path: ``synthetic`` (world prompts of ``split``; ``synthetic.num_train`` of them, seed ``seed``) or a
            JSONL / JSON / Parquet file / ``save_to_disk`` folder with a ``prompt_field`` string and an optional
            ``safety_field`` bool (default false).
        limit: keep the first N prompts. Identical prompts are kept once.
        batch_size: prompts per batch of ``train_dataloader`` (lists of :class:`Prompt`).
        num_batches: batches per epoch of ``train_dataloader`` (PPO: one per iteration), drawn from successive
            seeded shuffles of the prompts; null: one pass over the prompts.
        val_path: held-out prompts for ``val_dataloader`` (same format); with ``path=synthetic`` the world's
            held-out prompts (``synthetic.num_eval``) are used when it is null.
        val_batch_size: prompts per validation batch (default ``batch_size``).
    """

    def __init__(self, tokenizer=None, path: str = "synthetic", split: str = "train", prompt_field: str = "prompt",
                 safety_field: str = "is_safety", batch_size: int = 8, seed: int = 0, limit: int | None = None,
                 synthetic: dict[str, Any] | None = None, num_workers: int = 0, num_batches: int | None = None,
                 val_path: str | None = None, val_batch_size: int | None = None):
        super().__init__()
        self.num_batches = int(num_batches) if num_batches else None
        self.val_path = str(val_path) if val_path else None
        self.val_batch_size = int(val_batch_size or batch_size)
        self.tokenizer = tokenizer
        self.path, self.split, self.seed, self.limit = str(path), split, seed, limit
        self.prompt_field, self.safety_field = prompt_field, safety_field
        self.batch_size, self.num_workers = batch_size, num_workers
        self.synthetic = {**_SYNTHETIC, **dict(synthetic or {})}
        self.oracle = self.path == "synthetic"
        self.stats: dict[str, float] = {}
        self._prompts: list[Prompt] | None = None

    def prompts(self) -> list[Prompt]:
        if self._prompts is not None:
            return self._prompts
        if self.oracle:
            tasks = world.generate_tasks(int(self.synthetic["num_train"]), seed=self.seed, split=self.split,
                                         safety_fraction=self.synthetic["safety_fraction"])
            raw, untagged = [(t.prompt, t.is_safety) for t in tasks], 0
        else:
            raw, untagged = self._read(self.path)
        seen: dict[str, Prompt] = {}
        for text, tag in raw:
            pid = prompt_id(text)
            if pid not in seen:
                seen[pid] = Prompt(pid, text, bool(tag))
        out = list(seen.values())[: self.limit] if self.limit is not None else list(seen.values())
        if not out:
            raise UserError(f"{self.path}: no prompts (the prompt set is empty)")
        self.stats = {"data/prompts": float(len(out)), "data/safety_prompts": float(sum(p.is_safety for p in out)),
                      "data/duplicate_prompts": float(len(raw) - len(seen)),
                      "data/prompts_without_safety_tag": float(untagged)}
        if untagged:
            log.info("%s: %d prompts have no '%s' field: treated as not safety prompts", self.path, untagged,
                     self.safety_field)
        self._prompts = out
        return out

    def _read(self, path: str) -> tuple[list[tuple[str, bool]], int]:
        """``([(text, is_safety)], number of records without the safety field)`` of a prompt file."""
        raw, untagged = [], 0
        for line, rec in iter_records(path):
            text = rec.get(self.prompt_field)
            if not isinstance(text, str) or not text.strip():
                why = ("is missing" if text is None else "is empty" if isinstance(text, str)
                       else f"must be a string, got {type(text).__name__}")
                raise DataError(path, line, self.prompt_field, why)
            if self.safety_field not in rec:
                untagged += 1
            tag = rec.get(self.safety_field, False)
            if not isinstance(tag, bool):
                raise DataError(path, line, self.safety_field, f"must be true or false, got {brief(tag)}")
            raw.append((text, tag))
        return raw, untagged

    def eval_prompts(self) -> list[str]:
        if not self.oracle:
            return []
        return world_eval_prompts(int(self.synthetic["num_eval"]), self.seed, self.synthetic["safety_fraction"])

    def val_prompts(self) -> list[Prompt]:
        """Held-out prompts: ``val_path``, else (synthetic world) the gold evaluation's held-out prompts."""
        if self.val_path:
            raw, _ = self._read(self.val_path)
        elif self.oracle:
            raw = [(t, world.is_safety_prompt(t)) for t in self.eval_prompts()]
        else:
            return []
        return [Prompt(prompt_id(t), t, bool(s)) for t, s in raw]  # as given (the gold evaluation's weighting)

    def setup(self, stage: str | None = None) -> None:
        self.prompts()

    def train_dataloader(self) -> DataLoader:
        import torch

        # a position Lightning checkpoints (data_modules/resumable.py); orders are functions of (seed, epoch)
        if self.num_batches:  # num_batches global batches: batch_size is each rank's share (llama2_lit.core.batching)
            world = (torch.distributed.get_world_size()
                     if torch.distributed.is_available() and torch.distributed.is_initialized() else 1)
            sampler = CyclingSampler(len(self.prompts()), self.num_batches * self.batch_size * world, self.seed)
            return ResumableDataLoader(self.prompts(), batch_size=self.batch_size, sampler=sampler, collate_fn=list,
                                       num_workers=self.num_workers)
        prompts = self.prompts()
        return ResumableDataLoader(prompts, batch_size=self.batch_size, sampler=EpochRandomSampler(prompts, self.seed),
                                   collate_fn=list, num_workers=self.num_workers,
                                   generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self):
        prompts = self.val_prompts()
        if not prompts:
            return []
        return DataLoader(prompts, batch_size=self.val_batch_size, shuffle=False, collate_fn=list,
                          num_workers=self.num_workers)


class CyclingSampler(Sampler):
    """``num_samples`` indices into ``n`` items: successive seeded permutations, concatenated (so a PPO run of
    any length sees every prompt once per pass, in a fresh order each pass)."""

    def __init__(self, n: int, num_samples: int, seed: int = 0):
        self.n, self.num_samples, self.seed = n, num_samples, seed

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        import torch

        gen = torch.Generator().manual_seed(self.seed)
        left = self.num_samples
        while left > 0:
            perm = torch.randperm(self.n, generator=gen)[:left].tolist()
            left -= len(perm)
            yield from perm


def selection_file(path: str | Path) -> Path:
    """``selected.parquet`` of an RS run directory (or the file itself)."""
    p = Path(str(path)).expanduser()
    f = p / "selected.parquet" if p.is_dir() else p
    if not f.is_file():
        raise UserError(f"data.path: '{path}' has no selected samples ({f} not found): run stage=rs first and "
                        f"pass its run directory")
    return f


class RSSelectionDataModule(L.LightningDataModule):
    """The best samples an RS run selected, as packed SFT rows (loss on the response tokens only).

    Composes a :class:`PackedSFTDataModule` over ``selected.parquet`` (``prompt``/``response`` columns):
    tokenisation with the chat template, ``val_fraction`` held out, packing, loaders. Adds what RS needs:
    ``source_tokenizers`` (fingerprints of the tokenizers the samples were generated with, which a student
    must share) and, when every prompt is a world prompt, the gold-oracle ``eval_prompts`` of the SFT stage.

    Args:
        path: an RS run directory (``selected.parquet`` inside) or the Parquet file.
        synthetic: ``num_eval`` / ``safety_fraction`` of the held-out gold evaluation (as ``data=synthetic``).
    """

    def __init__(self, tokenizer, path: str, seq_len: int = 512, batch_size: int = 8, packing: str = "isolated",
                 overlong: str = "truncate", val_fraction: float = 0.05, seed: int = 0,
                 synthetic: dict[str, Any] | None = None, num_workers: int = 0):
        super().__init__()
        self.file = selection_file(path)
        self.tokenizer = tokenizer
        self.seed = seed
        self.synthetic = {**_SYNTHETIC, **dict(synthetic or {})}
        import pyarrow.parquet as pq

        sel = pq.read_table(self.file)
        for col in ("prompt", "response", "tokenizer", "policy"):
            if col not in sel.column_names:
                raise UserError(f"{self.file}: column '{col}' missing (not written by stage=rs?)")
        if sel.num_rows == 0:
            raise UserError(f"{self.file}: no selected samples")
        self.source_tokenizers = sorted(set(sel.column("tokenizer").to_pylist()))
        self.source_policies = sorted(set(sel.column("policy").to_pylist()))
        self.oracle = _all_world_prompts(sel.column("prompt").to_pylist())
        self.sft = PackedSFTDataModule(tokenizer, path=str(self.file), format="prompt_response", mode="sft",
                                       val_fraction=val_fraction, seq_len=seq_len, batch_size=batch_size,
                                       packing=packing, overlong=overlong, prompt_field="prompt",
                                       response_field="response", seed=seed, num_workers=num_workers)
        self.batch_size = batch_size
        self.stats: dict[str, float] = {"rs/distill_samples": float(sel.num_rows)}

    def setup(self, stage: str | None = None) -> None:
        self.sft.setup(stage)
        self.stats.update(self.sft.stats)

    def eval_prompts(self) -> list[str]:
        if not self.oracle:
            return []
        return world_eval_prompts(int(self.synthetic["num_eval"]), self.seed, self.synthetic["safety_fraction"])

    def train_dataloader(self) -> DataLoader:
        return self.sft.train_dataloader()

    def val_dataloader(self) -> DataLoader:
        return self.sft.val_dataloader()


def _all_world_prompts(prompts) -> bool:
    try:
        for p in prompts:
            world.family_of(p)
    except ValueError:
        return False
    return True
