"""``python -m llama2_lit.tools.consolidate <ckpt dir> <out dir> [hydra overrides of the run]``: a distributed
(sharded, ``trainer=fsdp``) checkpoint directory as a ``from_pretrained``-ready folder.

The run's ``.hydra/config.yaml`` (found above the checkpoint) rebuilds the stage module; with overrides, ``conf/`` is
composed with them instead. ``python -m llama2_lit.models.sharding consolidate ...`` (the older command) runs this.
Entry layer: imports the config, the entry's export and the models layer's shard reading.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf

from llama2_lit.config import compose  # also registers ${project_root:}, which saved configs use
from llama2_lit.errors import UserError
from llama2_lit.models.shard_loading import check_distributed, load_distributed_
from llama2_lit.run import export_hf

log = logging.getLogger(__name__)


def run_config(ckpt: Path, overrides: list[str]):
    """The config of the run that wrote ``ckpt``: ``conf/`` with ``overrides``, else the nearest saved one above."""
    if overrides:
        return compose(overrides)
    for parent in ckpt.resolve().parents:
        saved = parent / ".hydra" / "config.yaml"
        if saved.exists():
            log.info("run config: %s", saved)
            return OmegaConf.load(saved)
    raise UserError(f"{ckpt}: no .hydra/config.yaml above it; pass the run's overrides (e.g. stage=sft model=tiny)")


def consolidate(ckpt: str | Path, out: str | Path, overrides: list[str] | None = None) -> Path:
    """Write the model of a distributed checkpoint directory as a ``from_pretrained``-ready folder ``out``.

    The stage module is rebuilt from the run's config on the meta device, allocated on CPU (one full copy:
    this needs the model's size in host memory, on one machine), filled from the shards, and exported as a
    run would (``module.export`` or ``save_pretrained``; LoRA adapters merged). Runs in one process.
    """
    ckpt, out = Path(ckpt), Path(out)
    check_distributed(ckpt)
    cfg = run_config(ckpt, list(overrides or []))
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg["init_device"] = "meta"
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.stage.module, model_cfg=model_cfg, tokenizer=datamodule.tokenizer, _recursive_=False,
                         _convert_="all")
    load_distributed_(module, ckpt).eval()
    export_hf(module, out)
    log.info("wrote %s from %s", out, ckpt)
    return out


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["consolidate"]:  # the older command's subcommand
        args = args[1:]
    ap = argparse.ArgumentParser(prog="python -m llama2_lit.tools.consolidate",
                                 description="consolidate a distributed (sharded) checkpoint into an HF folder")
    ap.add_argument("ckpt")
    ap.add_argument("out")
    ap.add_argument("overrides", nargs="*", help="compose conf/ with these instead of the run's .hydra/config.yaml")
    a = ap.parse_args(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        consolidate(a.ckpt, a.out, a.overrides)
    except UserError as e:  # one line and exit code 2, as python -m llama2_lit
        sys.stderr.write(f"error: {e}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
