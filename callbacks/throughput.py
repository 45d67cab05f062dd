"""TokensPerSecond: wall-clock training throughput in non-pad tokens per second."""
from __future__ import annotations

import time
from collections.abc import Mapping

import lightning as L


def count_tokens(batch, pad_id: int | None) -> int:
    """Non-pad tokens in an HF batch (the attention mask if present, else ids that are not ``pad_id``)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if pad_id is None:
        return int(batch["input_ids"].numel())
    return int((batch["input_ids"] != pad_id).sum())


class TokensPerSecond(L.Callback):
    """Times every optimizer-step batch; reports the mean after ``skip_first`` warm-up steps.

    Logged as ``perf/tokens_per_s``; the entry point writes ``perf/*`` to ``perf.json`` rather than
    ``metrics.json`` so that metrics stay reproducible run to run.
    """

    def __init__(self, skip_first: int = 1):
        self.skip_first = skip_first
        self.final_metrics: dict[str, float] = {}
        self._t0 = 0.0
        self._tokens = 0
        self._seconds = 0.0
        self._n = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not isinstance(batch, Mapping):  # not a token batch (PPO's prompt lists): that stage times itself
            return
        dt = time.perf_counter() - self._t0
        self._n += 1
        if self._n <= self.skip_first:
            return
        tok = getattr(pl_module, "tokenizer", None)
        tokens = count_tokens(batch, getattr(tok, "pad_token_id", None))
        self._tokens += tokens
        self._seconds += dt
        pl_module.log("perf/tokens_per_s", tokens / max(dt, 1e-9), on_step=True, on_epoch=False, prog_bar=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._seconds > 0:
            self.final_metrics = {"perf/tokens_per_s": self._tokens / self._seconds,
                                  "perf/timed_steps": float(self._n - self.skip_first)}
