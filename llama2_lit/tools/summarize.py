"""One table of reward-model accuracy per rating bucket across the runs of a sweep (Llama 2 Table 28).

    python -m llama2_lit -m stage=rm data=synthetic_pairs reward.margin=none,small,large model.path=...
    python -m llama2_lit.tools.summarize outputs/multirun/rm/<date>            # writes margin_table.{md,json} there

or let Hydra write it when the sweep ends (``experiment=rm_margin_sweep`` registers :class:`MarginTableCallback`).
Each run directory of the sweep must hold ``metrics.json`` and ``.hydra/config.yaml``; rows are labelled by
the config value at ``--key`` (default ``reward.margin``) and ordered none, small, large, then the rest.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

BUCKET_COLUMNS = (
    ("significantly_better", "Significantly Better"),
    ("better", "Better"),
    ("slightly_better", "Slightly Better"),
    ("negligibly_better", "Negligibly Better / Unsure"),
)
ROW_TITLES = {"none": "No Margin", "small": "Margin Small", "large": "Margin Large"}
_ORDER = {"none": 0, "small": 1, "large": 2}


def collect(sweep_dir: str | Path, key: str = "reward.margin") -> list[dict[str, Any]]:
    """``[{"value", "run", "metrics"}]`` for every run under ``sweep_dir`` with a metrics.json."""
    rows = []
    for metrics_file in sorted(Path(sweep_dir).glob("*/metrics.json")):
        run = metrics_file.parent
        cfg_file = run / ".hydra" / "config.yaml"
        value = None
        if cfg_file.exists():
            value = OmegaConf.select(OmegaConf.load(cfg_file), key, default=None)
        rows.append({"value": str(value), "run": run.name, "metrics": json.loads(metrics_file.read_text())})
    rows.sort(key=lambda r: (_ORDER.get(r["value"], 99), r["value"], r["run"]))
    return rows


def table(rows: list[dict[str, Any]], prefix: str = "val/") -> tuple[str, list[dict[str, Any]]]:
    """A markdown table (accuracy %, one decimal, per bucket and Avg; ``-`` for an empty bucket) and its data."""
    headers = [""] + [t for _, t in BUCKET_COLUMNS] + ["Avg", "pairs"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    data = []
    for r in rows:
        m = r["metrics"]
        accs = {b: m.get(f"{prefix}accuracy/{b}") for b, _ in BUCKET_COLUMNS}
        avg, count = m.get(f"{prefix}accuracy"), m.get(f"{prefix}count")
        title = ROW_TITLES.get(r["value"], r["value"])
        cells = [title] + ["-" if accs[b] is None else f"{100 * accs[b]:.1f}" for b, _ in BUCKET_COLUMNS]
        cells += ["-" if avg is None else f"{100 * avg:.1f}", "-" if count is None else str(int(count))]
        lines.append("| " + " | ".join(cells) + " |")
        data.append({"value": r["value"], "run": r["run"], "accuracy": accs, "avg": avg, "count": count,
                     "counts": {b: m.get(f"{prefix}count/{b}") for b, _ in BUCKET_COLUMNS}})
    return "\n".join(lines), data


def write_table(sweep_dir: str | Path, key: str = "reward.margin", name: str = "margin_table") -> str:
    """Write ``<sweep_dir>/<name>.md`` and ``.json``; return the markdown."""
    rows = collect(sweep_dir, key)
    if not rows:
        raise SystemExit(f"{sweep_dir}: no */metrics.json (is it a multirun sweep directory?)")
    md, data = table(rows)
    title = f"Reward model accuracy (%) per rating bucket, by {key} (shape of Llama 2 Table 28)"
    text = f"{title}\n\n{md}\n"
    Path(sweep_dir, f"{name}.md").write_text(text)
    Path(sweep_dir, f"{name}.json").write_text(json.dumps({"key": key, "rows": data}, indent=2) + "\n")
    return text


try:  # a Hydra callback, so that a sweep writes its own table
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object


class MarginTableCallback(_HydraCallback):
    """Hydra callback: after a multirun, writes :func:`write_table` into the sweep directory."""

    def __init__(self, key: str = "reward.margin", name: str = "margin_table"):
        self.key, self.name = key, name

    def on_multirun_end(self, config, **kwargs) -> None:
        print(write_table(config.hydra.sweep.dir, self.key, self.name))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir", help="a Hydra multirun directory (one numbered subfolder per run)")
    ap.add_argument("--key", default="reward.margin", help="config key that labels the rows")
    ap.add_argument("--name", default="margin_table", help="output file stem")
    args = ap.parse_args(argv)
    print(write_table(args.sweep_dir, args.key, args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
