"""make soak: a long PPO run on model=tiny (200 iterations, small batches): no NaN, memory flat after warm-up.

The run goes through the real stage (``llama2_lit.run.run`` with ``stage=ppo``, checkpoints, held-out evaluation
every 50 iterations, early stopping off so that every iteration runs). The policy and both reward models are
random-init tiny models (``bench/ppo.py``'s ``random_rms``): what is soaked is the loop, not the learning. The
process RSS is read after every iteration; reported: after warm-up (iteration ``--warmup``), at the end, the
largest, and the growth. Fails (exit 1) on a non-finite PPO scalar, a skipped iteration, or growth over
``--max-growth-mib``. Writes bench/results/soak_ppo.json.

    .venv/bin/python bench/soak_ppo.py [--iterations 200] [--batch-size 16]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from bench.ppo import random_rms  # noqa: E402
from llama2_lit.config import compose  # noqa: E402


def rss_mib() -> float:
    """This process's resident set size (MiB), from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class RSSProbe(L.Callback):
    """RSS after every training iteration (``+callbacks.rss._target_=...``)."""

    samples: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        RSSProbe.samples.append(rss_mib())


def soak(iterations: int = 200, batch_size: int = 16, warmup: int = 20, max_new_tokens: int = 16,
         out: Path | None = None, cache_dir: str | None = None, max_growth_mib: float = 64.0) -> dict:
    from llama2_lit.run import run

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="soak_ppo_"))
    out = out or tmp / "run"
    cache_dir = cache_dir or str(ROOT / ".cache")
    policy, rm_h, rm_s = random_rms(None, "tiny", tmp, cache_dir)
    RSSProbe.samples = []
    t0 = time.perf_counter()
    metrics = run(compose([
        "stage=ppo", "model=tiny", f"model.path={policy}", f"ppo.reward_models.helpfulness={rm_h}",
        f"ppo.reward_models.safety={rm_s}", f"ppo.iterations={iterations}", f"stage.batch_size={batch_size}",
        f"ppo.mini_batch_size={max(1, batch_size // 2)}", "ppo.ppo_epochs=1", f"ppo.max_new_tokens={max_new_tokens}",
        f"ppo.eval.max_new_tokens={max_new_tokens}", "stage.val_check_interval=50", "ppo.early_stopping.enabled=false",
        "data.synthetic.num_eval=32", "data.val_batch_size=32", "logger=none", "trainer.enable_progress_bar=false",
        "callbacks.gold_eval.max_new_tokens=8", f"paths.output_dir={out}", f"paths.cache_dir={cache_dir}",
        f"+callbacks.rss._target_={__name__}.RSSProbe"]))
    seconds = time.perf_counter() - t0
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    bad = [(r["batch"], k, v) for r in steps for k, v in r.items()
           if k.startswith("ppo/") and not (isinstance(v, float) and math.isfinite(v))]
    rss = RSSProbe.samples
    w = min(warmup, len(rss)) - 1
    res = {"iterations": len(steps), "seconds": round(seconds, 1), "batch_size": batch_size,
           "max_new_tokens": max_new_tokens, "rss_mib_after_warmup": round(rss[w], 1), "warmup_iterations": w + 1,
           "rss_mib_end": round(rss[-1], 1), "rss_mib_max_after_warmup": round(max(rss[w:]), 1),
           "rss_growth_mib": round(rss[-1] - rss[w], 1), "non_finite": bad[:10],
           "skipped_iterations": metrics.get("ppo/skipped_batches", 0.0),
           "final": {k: metrics[k] for k in ("ppo/kl", "ppo/reward_raw", "val/reward") if k in metrics}}
    res["ok"] = (not bad and len(steps) == iterations and res["skipped_iterations"] == 0
                 and res["rss_growth_mib"] <= max_growth_mib)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--max-growth-mib", type=float, default=64.0)
    a = ap.parse_args(argv)
    res = soak(a.iterations, a.batch_size, a.warmup, a.max_new_tokens, max_growth_mib=a.max_growth_mib)
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "soak_ppo.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
