"""PackedSFTDataModule: SFT (loss on answers only) and pretraining (loss on every token) data.

``hydra.utils.instantiate(cfg.data)`` gives a ready DataModule; it is usable on its own:

    dm = PackedSFTDataModule(tokenizer=tok, path="synthetic", seq_len=256)
    dm.setup("fit"); batch = next(iter(dm.train_dataloader()))
"""
from __future__ import annotations

import logging
import random
from functools import partial
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from data_modules.packing import Row, check_packing, pack
from data_modules.records import FORMATS, text_of, to_messages, tokenize_chat, tokenize_text
from data_modules.resumable import EpochRandomSampler, ResumableDataLoader
from data_modules.sources import iter_records
from llama2_lit.errors import DataError, UserError
from llama2_lit.core.losses import IGNORE_INDEX
from llama2_lit.world import oracle as world

log = logging.getLogger(__name__)
MODES = ("sft", "pretrain")


class RowDataset(Dataset):
    def __init__(self, rows: list[Row]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Row:
        return self.rows[i]


def collate_rows(rows: list[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack rows into an HF batch.

    Equal-length (packed) rows → ``input_ids``, ``labels``, ``position_ids`` and no attention mask
    (transformers then derives per-example masks from ``position_ids``). Unequal rows (``packing=none``)
    are right-padded to the longest and get an ``attention_mask`` instead.
    """
    lengths = {len(r.input_ids) for r in rows}
    if len(lengths) == 1:
        return {
            "input_ids": torch.tensor([r.input_ids for r in rows], dtype=torch.long),
            "labels": torch.tensor([r.labels for r in rows], dtype=torch.long),
            "position_ids": torch.tensor([r.position_ids for r in rows], dtype=torch.long),
        }
    n = max(lengths)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r.input_ids)
        ids[i, :k] = torch.tensor(r.input_ids)
        labels[i, :k] = torch.tensor(r.labels)
        mask[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class PackedSFTDataModule(L.LightningDataModule):
    """Packed SFT / pretraining data from the synthetic world or from files.

    Args:
        tokenizer: a transformers tokenizer with a chat template (SFT) and a pad token.
        path: ``synthetic`` (the gold-oracle world) or a file, folder or hub id (see ``data_modules.sources``).
        format: record format of a file (``alpaca``, ``prompt_response``, ``messages``, ``text``).
        mode: ``sft`` (loss on answers) or ``pretrain`` (loss on every token).
        val_path: a separate validation source; else ``val_fraction`` of ``path`` is held out.
        packing: ``isolated`` | ``concat`` | ``none`` (see ``data_modules.packing``).
        overlong: ``truncate`` | ``drop`` | ``split`` (concat only) for examples longer than ``seq_len``.
        synthetic: world options (``num_train``, ``num_val``, ``safety_fraction``, ``num_eval``).
    """

    def __init__(self, tokenizer, path: str = "synthetic", format: str = "alpaca", mode: str = "sft",
                 val_path: str | None = None, val_fraction: float = 0.05, seq_len: int = 256,
                 batch_size: int = 8, packing: str = "isolated", overlong: str = "truncate",
                 prompt_field: str = "prompt", response_field: str = "response", text_field: str = "text",
                 synthetic: dict[str, Any] | None = None, limit: int | None = None, seed: int = 0,
                 num_workers: int = 0):
        super().__init__()
        if mode not in MODES:
            raise UserError(f"data.mode: unknown '{mode}' (choose {list(MODES)})")
        if path != "synthetic" and format not in FORMATS:
            raise UserError(f"data.format: unknown '{format}' (choose {list(FORMATS)})")
        check_packing(packing, overlong, UserError, "data.")
        if tokenizer.pad_token_id is None:
            raise UserError("tokenizer has no pad token")
        self.tokenizer = tokenizer
        self.path, self.format, self.mode = path, format, mode
        self.val_path, self.val_fraction = val_path, val_fraction
        self.seq_len, self.batch_size, self.packing, self.overlong = seq_len, batch_size, packing, overlong
        self.fields = {"prompt_field": prompt_field, "response_field": response_field}
        self.text_field = text_field
        self.synthetic = {"num_train": 2000, "num_val": 200, "num_eval": 64, "safety_fraction": 0.2,
                          **dict(synthetic or {})}
        self.limit, self.seed, self.num_workers = limit, seed, num_workers
        self.oracle = path == "synthetic"  # gold scores exist: callbacks can evaluate generations
        self.stats: dict[str, float] = {}
        self.train_rows: list[Row] | None = None
        self.val_rows: list[Row] | None = None

    # -- examples -------------------------------------------------------------------------
    def _synthetic_examples(self, split: str, n: int, seed: int) -> list[tuple[list[int], list[int]]]:
        tasks = world.generate_tasks(n, seed=seed, split=split, safety_fraction=self.synthetic["safety_fraction"])
        out = []
        for t in tasks:
            if self.mode == "sft":
                msgs = [{"role": "user", "content": t.prompt}, {"role": "assistant", "content": t.answer}]
                out.append(tokenize_chat(msgs, self.tokenizer, "synthetic"))
            else:
                out.append(tokenize_text(f"{t.prompt}\n{t.answer}", self.tokenizer))
        return out

    def _file_examples(self, path: str) -> list[tuple[list[int], list[int]]]:
        out = []
        for line, rec in iter_records(path):
            if self.limit is not None and len(out) >= self.limit:
                break
            if self.mode == "pretrain" or self.format == "text":
                if self.mode == "sft":
                    raise DataError(path, line, None, "format=text has no prompt/answer split: use stage=pretrain")
                out.append(tokenize_text(text_of(rec, self.text_field, path, line), self.tokenizer))
            else:
                msgs = to_messages(rec, self.format, path, line, **self.fields)
                out.append(tokenize_chat(msgs, self.tokenizer, f"{path}:{line}"))
        return out

    def _pack(self, examples, name: str) -> list[Row]:
        rows, stats = pack(examples, self.seq_len, self.tokenizer.pad_token_id, self.packing, self.overlong)
        if not rows:
            where = self.path if name == "train" else (self.val_path or self.path)
            raise UserError(f"{where}: no {name} examples left after filtering "
                            f"({stats.examples} read, {stats.dropped} dropped as overlong or label-free)")
        if name == "train":
            self.stats = stats.as_dict()
        else:
            self.stats.update({f"packing/val_{k.split('/', 1)[1]}": v for k, v in stats.as_dict().items()
                               if k in ("packing/rows", "packing/efficiency")})
        if stats.truncated or stats.dropped:
            log.warning("%s data: %d of %d examples truncated, %d dropped (seq_len=%d, overlong=%s)", name,
                        stats.truncated, stats.examples, stats.dropped, self.seq_len, self.overlong)
        return rows

    def setup(self, stage: str | None = None) -> None:
        if self.train_rows is not None:
            return
        if self.path == "synthetic":
            s = self.synthetic
            train = self._synthetic_examples("train", s["num_train"], self.seed)
            val = self._synthetic_examples("heldout", s["num_val"], self.seed + 1)
        else:
            train = self._file_examples(self.path)
            if self.val_path:
                val = self._file_examples(self.val_path)
            else:
                idx = list(range(len(train)))
                random.Random(self.seed).shuffle(idx)
                n_val = max(1, int(round(self.val_fraction * len(train)))) if len(train) > 1 else 0
                held = set(idx[:n_val])
                val = [train[i] for i in sorted(held)]
                train = [train[i] for i in range(len(train)) if i not in held]
        self.train_rows = self._pack(train, "train")
        self.val_rows = self._pack(val, "validation")
        log.info("packed %d train rows (efficiency %.4f), %d val rows", len(self.train_rows),
                 self.stats["packing/efficiency"], len(self.val_rows))

    # -- gold evaluation prompts (synthetic world only) ----------------------------------
    def eval_prompts(self) -> list[str]:
        if not self.oracle:
            return []
        return [t.prompt for t in world.generate_tasks(self.synthetic["num_eval"], seed=self.seed + 2,
                                                      split="heldout",
                                                      safety_fraction=self.synthetic["safety_fraction"])]

    # -- loaders --------------------------------------------------------------------------
    def _loader(self, rows: list[Row], shuffle: bool) -> DataLoader:
        pad = self.tokenizer.pad_token_id
        collate = partial(collate_rows, pad_id=pad)
        if not shuffle:
            return DataLoader(RowDataset(rows), batch_size=self.batch_size, num_workers=self.num_workers,
                              collate_fn=collate)
        # training: a seeded order per epoch and a position Lightning checkpoints (data_modules/resumable.py);
        # the loader's own generator only seeds workers (so the global RNG is not drawn from)
        ds = RowDataset(rows)
        return ResumableDataLoader(ds, batch_size=self.batch_size, sampler=EpochRandomSampler(ds, self.seed),
                                   num_workers=self.num_workers, collate_fn=collate,
                                   generator=torch.Generator().manual_seed(self.seed))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_rows, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_rows, shuffle=False)
