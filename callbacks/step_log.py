"""StepLog: one JSON line per training batch in ``<run dir>/steps.jsonl`` (the per-step record resumes compare).

Each line: ``batch`` (0-based, over the whole run), ``epoch``, ``step`` (optimizer steps), ``lr``, the batch's
training scalars (``train/*_step``; PPO's ``ppo/*``), and ``data``: a CRC32 of the batch's contents (token ids,
prompt texts), so two runs can be checked to have trained the same examples in the same order. A run resumed from
a checkpoint first cuts the file back to the lines written when that checkpoint was (the steps after it, done again,
are appended once more): the file of a killed-and-resumed run reads as the uninterrupted run's.
"""
from __future__ import annotations

import dataclasses
import json
import math
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch


def fingerprint(obj: Any, crc: int = 0) -> int:
    """CRC32 over a batch's tensors, strings and numbers (dicts in key order, dataclasses by field)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return zlib.crc32(data, zlib.crc32(str(t.dtype).encode(), crc))
    if isinstance(obj, Mapping):
        for k in sorted(obj, key=str):
            crc = fingerprint(obj[k], zlib.crc32(str(k).encode(), crc))
        return crc
    if isinstance(obj, (list, tuple)):
        for x in obj:
            crc = fingerprint(x, crc)
        return crc
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return fingerprint({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}, crc)
    if isinstance(obj, (str, bytes, int, float, bool)) or obj is None:
        return zlib.crc32(repr(obj).encode(), crc)
    return zlib.crc32(type(obj).__name__.encode(), crc)


def _keep(key: str) -> bool:
    return key.endswith("_step") and not key.startswith(("perf/", "time/")) or key.startswith("ppo/")


class StepLog(L.Callback):
    """Append a line per training batch to ``<trainer.default_root_dir>/<filename>`` (see the module docstring)."""

    def __init__(self, filename: str = "steps.jsonl", data_fingerprint: bool = True):
        self.filename, self.data_fingerprint = filename, data_fingerprint
        self.rows = 0
        self._restored: int | None = None
        self._file = None

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = int(state_dict.get("rows", 0))

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        path = Path(trainer.default_root_dir) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        keep = self._restored or 0
        lines = path.read_text().splitlines(keepends=True)[:keep] if keep and path.exists() else []
        path.write_text("".join(lines))
        self.rows, self._restored = len(lines), None
        self._file = open(path, "a")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._file is None:
            return
        rec: dict[str, Any] = {"batch": int(trainer.fit_loop.epoch_loop.batch_progress.total.processed) - 1,
                               "epoch": int(trainer.current_epoch), "step": int(trainer.global_step)}
        if trainer.optimizers:
            rec["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        for k, v in sorted(trainer.callback_metrics.items()):
            if _keep(k) and isinstance(v, (torch.Tensor, float, int)):
                x = float(v)
                rec[k] = x if math.isfinite(x) else str(x)
        if self.data_fingerprint:
            rec["data"] = fingerprint(batch)
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        self.rows += 1

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def on_train_end(self, trainer, pl_module) -> None:
        self._close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._close()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._close()
