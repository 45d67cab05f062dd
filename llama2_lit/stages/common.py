"""What the sampling runners (``stage=rs``, ``stage=collect``) share: the run's setup (output folder, seed, matmul
precision, threads, the prompt DataModule, device, model options), the policy loader and seeds derived from settings.
A stages module: may import modules, scoring, callbacks, generation, models, data_modules, core and world.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from data_modules.prompts import Prompt, PromptDataModule
from llama2_lit.errors import UserError
from llama2_lit.generation.engine import Engine
from llama2_lit.models.loading import load_causal_lm
from llama2_lit.models.tokenizers import folder_tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PromptRun:
    """A sampling runner's inputs, set up by :func:`setup_prompt_run`."""

    out: Path                 # the run's output folder (created)
    data: PromptDataModule
    prompts: list[Prompt]
    tokenizer: Any            # the data's (the policy's) tokenizer
    device: torch.device
    model_cfg: dict           # ``cfg.model``, resolved
    policy_name: str          # ``model.path``, or ``random-init:<model.name>``


def setup_prompt_run(cfg: DictConfig, opts: DictConfig, stage: str) -> PromptRun:
    """Create the output folder, seed everything (``cfg.seed``), set the matmul precision and ``<stage>.num_threads``,
    build the prompt DataModule (``cfg.data``: ``data=rs_prompts``) and pick ``<stage>.device`` (auto: CUDA if any)."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "highest"))
    if opts.get("num_threads"):
        torch.set_num_threads(int(opts.num_threads))
    dm = instantiate(cfg.data)
    if not isinstance(dm, PromptDataModule):
        raise UserError(f"stage={stage} samples answers to prompts, but data is {type(dm).__name__}: add "
                        "data=rs_prompts (synthetic world prompts, or data.path=<a file with a 'prompt' field>)")
    device = torch.device(opts.device if opts.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    policy_name = str(model_cfg.get("path") or f"random-init:{model_cfg.get('name')}")
    return PromptRun(out, dm, dm.prompts(), dm.tokenizer, device, model_cfg, policy_name)


def load_policy(model_cfg: dict, tokenizer, device, path: str | None = None):
    """``(model, tokenizer)`` in eval mode on ``device``: the policy ``model_cfg`` (``model.dtype``) for ``path=None``,
    else the causal LM folder ``path`` with the same options (and its own tokenizer if it saved one)."""
    if path is not None:
        tokenizer = folder_tokenizer(path, tokenizer)
        model_cfg = {**model_cfg, "path": path}
    return load_causal_lm(model_cfg, tokenizer, trainable=False).to(device).eval(), tokenizer


def derived_seed(*parts: Any) -> int:
    """A sampling seed from settings (62 bits of sha1 of ``"|".join(parts)``): the same parts, the same seed."""
    h = hashlib.sha1("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "big") >> 2


def sampled_rows(out: Path, settings: dict[str, Any], sample: Callable[[Path], dict[str, float]], what: str
                 ) -> tuple[Path, dict[str, float]]:
    """``out/rows.jsonl`` and its sampling's metrics: reused when ``out/sampling.json`` holds the same ``settings``
    (a resumed run does not sample again), else ``sample(rows_path)`` writes the rows and returns the metrics, which
    ``sampling.json`` then keeps with the settings' key (stage=gatt, stage=context_distill)."""
    out.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    info_path, rows_path = out / "sampling.json", out / "rows.jsonl"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if info.get("key") == key and rows_path.is_file():
        log.info("%s: reusing the sampled rows in %s", what, rows_path)
        return rows_path, info.get("metrics") or {}
    metrics = sample(rows_path)
    info_path.write_text(json.dumps({"key": key, "metrics": metrics}, indent=2) + "\n")
    return rows_path, metrics


def policy_engine(cfg: DictConfig, opts: DictConfig):
    """``(engine, tokenizer, device)``: the policy ``cfg.model`` in eval mode on ``opts.device`` (auto: CUDA if any),
    with ``opts.num_threads`` and ``opts.engine`` (stage=gatt, stage=context_distill)."""
    device = torch.device(opts.device if opts.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if opts.get("num_threads"):
        torch.set_num_threads(int(opts.num_threads))
    tok = instantiate(cfg.model.tokenizer)
    policy, tok = load_policy(OmegaConf.to_container(cfg.model, resolve=True), tok, device)
    return Engine(policy, tok, backend=opts.engine.backend, compile=bool(opts.engine.compile)), tok, device
