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
from llama2_lit.world import dialogue, oracle as world, preprompt

log = logging.getLogger(__name__)
MODES = ("sft", "pretrain")
LOSS_TURNS = ("all", "last")


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
        loss_turns: ``all`` (every assistant turn of a ``messages`` record) or ``last`` (the last one only: Ghost
            Attention's rows, Llama 2 §3.3).
        synthetic: world options (``num_train``, ``num_val``, ``safety_fraction``, ``num_eval``, and
            ``dialogue_fraction``: that share of the examples are the world's multi-turn rows,
            ``llama2_lit.world.dialogue.sft_dialogue``; ``preprompt_fraction``: that share are rows with a safety
            preprompt before a world prompt and the gold answer, ``llama2_lit.world.preprompt.sft_rows``, so that the
            model learns what a preprompt says before stage=context_distill uses one).
    """

    def __init__(self, tokenizer, path: str = "synthetic", format: str = "alpaca", mode: str = "sft",
                 val_path: str | None = None, val_fraction: float = 0.05, seq_len: int = 256,
                 batch_size: int = 8, packing: str = "isolated", overlong: str = "truncate",
                 prompt_field: str = "prompt", response_field: str = "response", text_field: str = "text",
                 synthetic: dict[str, Any] | None = None, limit: int | None = None, seed: int = 0,
                 num_workers: int = 0, loss_turns: str = "all"):
        super().__init__()
        if mode not in MODES:
            raise UserError(f"data.mode: unknown '{mode}' (choose {list(MODES)})")
        if path != "synthetic" and format not in FORMATS:
            raise UserError(f"data.format: unknown '{format}' (choose {list(FORMATS)})")
        if loss_turns not in LOSS_TURNS:
            raise UserError(f"data.loss_turns: unknown '{loss_turns}' (choose {list(LOSS_TURNS)})")
        check_packing(packing, overlong, UserError, "data.")
        if tokenizer.pad_token_id is None:
            raise UserError("tokenizer has no pad token")
        self.tokenizer = tokenizer
        self.path, self.format, self.mode = path, format, mode
        self.val_path, self.val_fraction = val_path, val_fraction
        self.seq_len, self.batch_size, self.packing, self.overlong = seq_len, batch_size, packing, overlong
        self.fields = {"prompt_field": prompt_field, "response_field": response_field}
        self.loss_turns = loss_turns
        self.text_field = text_field
        self.synthetic = {"num_train": 2000, "num_val": 200, "num_eval": 64, "safety_fraction": 0.2,
                          "dialogue_fraction": 0.0, "preprompt_fraction": 0.0, **dict(synthetic or {})}
        if not 0.0 <= float(self.synthetic["dialogue_fraction"]) <= 1.0:
            raise UserError(f"data.synthetic.dialogue_fraction: {self.synthetic['dialogue_fraction']} is not in [0, 1]")
        if not 0.0 <= float(self.synthetic["preprompt_fraction"]) <= 1.0:
            raise UserError(f"data.synthetic.preprompt_fraction: {self.synthetic['preprompt_fraction']} is not in "
                            "[0, 1]")
        if float(self.synthetic["dialogue_fraction"]) + float(self.synthetic["preprompt_fraction"]) > 1.0:
            raise UserError("data.synthetic.dialogue_fraction + data.synthetic.preprompt_fraction: "
                            f"{self.synthetic['dialogue_fraction']} + {self.synthetic['preprompt_fraction']} > 1")
        self.limit, self.seed, self.num_workers = limit, seed, num_workers
        self.oracle = path == "synthetic"  # gold scores exist: callbacks can evaluate generations
        self.stats: dict[str, float] = {}
        self.train_rows: list[Row] | None = None
        self.val_rows: list[Row] | None = None

    # -- examples -------------------------------------------------------------------------
    def _synthetic_examples(self, split: str, n: int, seed: int) -> list[tuple[list[int], list[int]]]:
        """``n`` world examples: single-turn tasks, and (SFT, ``dialogue_fraction`` > 0) that share of multi-turn
        rows, placed at seeded positions among the tasks (the tasks themselves are those of the smaller count); then
        (SFT, ``preprompt_fraction`` > 0) that share of preprompted rows, placed the same way."""
        n_dialogues = round(n * float(self.synthetic["dialogue_fraction"])) if self.mode == "sft" else 0
        n_preprompted = round(n * float(self.synthetic["preprompt_fraction"])) if self.mode == "sft" else 0
        tasks = world.generate_tasks(n - n_dialogues - n_preprompted, seed=seed, split=split,
                                     safety_fraction=self.synthetic["safety_fraction"])
        out = []
        for t in tasks:
            if self.mode == "sft":
                msgs = [{"role": "user", "content": t.prompt}, {"role": "assistant", "content": t.answer}]
                out.append(tokenize_chat(msgs, self.tokenizer, "synthetic"))
            else:
                out.append(tokenize_text(f"{t.prompt}\n{t.answer}", self.tokenizer))
        rng = random.Random(f"llama2-lit-sft-dialogues|{split}|{seed}")
        for _ in range(n_dialogues):
            row = tokenize_chat(dialogue.sft_dialogue(rng, split), self.tokenizer, "synthetic")
            out.insert(rng.randrange(len(out) + 1), row)
        if n_preprompted:
            rng = random.Random(f"llama2-lit-sft-preprompted|{split}|{seed}")
            for msgs in preprompt.sft_rows(n_preprompted, seed, split):
                out.insert(rng.randrange(len(out) + 1), tokenize_chat(msgs, self.tokenizer, "synthetic"))
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
                out.append(tokenize_chat(msgs, self.tokenizer, f"{path}:{line}", last_only=self.loss_turns == "last"))
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
