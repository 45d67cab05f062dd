"""Loading tokenizers and causal LMs from config: random-init from dimensions, a local folder, or a hub id.

Weights load through safetensors only and remote code is never trusted.
"""
from __future__ import annotations

import copy
import os
import re
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Mapping

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerBase)

from llama2_lit.errors import UserError
from llama2_lit.models.chat_templates import ensure_chat_template, load_llama2_tokenizer
from llama2_lit.models.init import seeded_init_
from llama2_lit.models.lora import apply_lora
from llama2_lit.models.packed_attention import NAME as PACKED_SDPA
from llama2_lit.world.tokenizer import build_world_tokenizer

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def pickled_only(src: str) -> str:
    """A sentence for a folder that holds pickled weights but no safetensors ('' otherwise)."""
    p = Path(str(src))
    if p.is_dir() and not any(p.glob("*.safetensors")) and any(p.glob("pytorch_model*.bin")):
        return (f" {p} holds only pickled weights (pytorch_model*.bin), which are refused because unpickling can run "
                "code. If you trust their source, convert them once: load the folder with transformers and "
                "use_safetensors=False, then save_pretrained to it, which writes model.safetensors.")
    return ""


def resolve_path(path: str, what: str = "model.path") -> str:
    """Return a local folder or a hub id; a local-looking path that does not exist is a user error."""
    p = Path(os.path.expanduser(str(path)))
    if p.exists():
        return str(p)
    if not p.is_absolute() and not str(path).startswith((".", "~")) and _HUB_ID.match(str(path)):
        return str(path)  # a hub id: from_pretrained fetches it (or fails below with a clear message)
    raise UserError(f"{what}: '{path}' does not exist")


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def model_folder(path: str, what: str = "model.path") -> str:
    """:func:`resolve_path` for a model: a local folder must hold a ``config.json`` (a ``save_pretrained`` folder)."""
    src = resolve_path(path, what)
    if Path(src).is_dir() and not (Path(src) / "config.json").is_file():
        raise UserError(f"{what}: '{path}' holds no config.json, so it is not a saved model (give a "
                        "save_pretrained folder, such as a run's hf/, or a hub id)")
    return src


def load_pretrained(auto_cls, path: str, kind: str, what: str = "model.path", **kwargs) -> torch.nn.Module:
    """``auto_cls.from_pretrained`` of the folder or hub id ``path``: safetensors only, no remote code.

    Whatever stops it (a missing path or config, missing or pickled weights, a config transformers cannot
    read) is a one-line :class:`UserError` naming ``what``; ``kind`` names the model in it ("a causal LM").
    """
    src = model_folder(path, what)
    try:
        return auto_cls.from_pretrained(src, use_safetensors=True, trust_remote_code=False, **kwargs)
    except (OSError, ValueError) as e:  # transformers: OSError for missing files, ValueError for unknown configs
        raise UserError(f"{what}: could not load {kind} from '{path}': {one_line(e)}{pickled_only(src)}") from None


def load_tokenizer(kind: str = "pretrained", path: str | None = None, chat_template: str | None = None,
                   vocab_size: int = 512, cache_dir: str | None = None, padding_side: str = "right",
                   add_pad_token: bool = True) -> PreTrainedTokenizerBase:
    """Build the tokenizer named by ``kind``.

    kind: ``world_bpe`` (trained offline on the synthetic world, cached in ``cache_dir``),
    ``pretrained`` (``AutoTokenizer.from_pretrained(path)``), or ``llama2_sp`` (a Llama 2
    ``tokenizer.model`` file or folder). ``chat_template`` names a template to force (``llama2``).
    A tokenizer without a pad token, or whose pad equals eos, gets a distinct ``<pad>`` when
    ``add_pad_token`` (the model's embeddings are resized to match on load).
    """
    if kind == "world_bpe":
        tok = _world(vocab_size, cache_dir)
    elif kind == "pretrained":
        if not path:
            raise UserError("model.tokenizer.path is required for kind=pretrained")
        src = resolve_path(path, "model.tokenizer.path")
        try:
            tok = AutoTokenizer.from_pretrained(src, trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise UserError(f"model.tokenizer.path: could not load a tokenizer from '{path}': {one_line(e)}") from None
    elif kind == "llama2_sp":
        tok = load_llama2_tokenizer(resolve_path(path or "", "model.tokenizer.path"))
    else:
        raise UserError(f"model.tokenizer.kind: unknown '{kind}' (choose world_bpe, pretrained, llama2_sp)")
    if chat_template is not None or tok.chat_template is None:
        ensure_chat_template(tok, chat_template)
    if add_pad_token and (tok.pad_token is None or tok.pad_token_id == tok.eos_token_id):
        tok.add_special_tokens({"pad_token": "<pad>"})
    tok.padding_side = padding_side
    return tok


def _world(vocab_size: int, cache_dir: str | None):
    return build_world_tokenizer(vocab_size=vocab_size, cache_dir=cache_dir)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[str(name)]
    except KeyError:
        raise UserError(f"model.dtype: unknown '{name}' (choose {sorted(_DTYPES)})") from None


# Precision policy. A model that trains keeps its parameters, and so AdamW's moments, in float32 (the master
# weights): a bf16 weight keeps about 3 significant digits, so AdamW steps at the paper's learning rates (1e-6 to
# 2e-5) mostly round to nothing. bf16 is a compute dtype (Lightning's bf16-mixed autocast; FSDP2's
# MixedPrecisionPolicy(param_dtype=bf16)). ``model.dtype`` is the dtype of frozen copies (PPO's reference and
# reward models, RS / collect / evaluation inference) and of the exported hf/ folders.
MASTER_DTYPE = torch.float32


def model_dtype(model_cfg: Mapping[str, Any], trainable: bool = True) -> torch.dtype:
    """The parameter dtype of a model built from ``model_cfg``: float32 when it trains, else ``model.dtype``."""
    stored = torch_dtype(model_cfg.get("dtype", "float32"))  # validated either way
    return MASTER_DTYPE if trainable else stored


def save_pretrained_as(model: torch.nn.Module, path: str | Path, dtype: torch.dtype) -> None:
    """``save_pretrained`` (safetensors) with floating-point weights cast to ``dtype`` (``model.dtype``: exports
    are stored as the checkpoint the run started from); the model in memory is left as it is. Tied tensors stay
    tied (one cast per storage)."""
    if all(p.dtype == dtype for p in model.parameters() if p.is_floating_point()):
        model.save_pretrained(path, safe_serialization=True)
        return
    cast: dict[int, torch.Tensor] = {}
    state = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            key = v.data_ptr()
            if key not in cast:
                cast[key] = v.detach().to(dtype)
            v = cast[key]
        state[k] = v
    model.save_pretrained(path, state_dict=state, safe_serialization=True)
    config = copy.deepcopy(model.config)  # save_pretrained recorded the in-memory (float32) dtype
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(path)


def llama_config(tokenizer: PreTrainedTokenizerBase, config: Mapping[str, Any]) -> LlamaConfig:
    """A LlamaConfig of the given dimensions whose vocabulary and special ids match ``tokenizer``."""
    dims = dict(config)
    dims.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaConfig(**dims)


def init_options(model_cfg: Mapping[str, Any]) -> tuple[bool, str, int]:
    """``(on_meta, init, init_seed)`` of a model config.

    ``model.init_device: meta`` builds the architecture without memory (a sharded run fills each rank's shard,
    a consolidation loads a checkpoint into it); ``model.init``: ``default`` (the transformers constructor's
    random init) or ``seeded`` (per-parameter generators, the same on any number of processes:
    ``llama2_lit.models.init``), for random-init models; ``model.init_seed``: its seed (the run's ``seed``).
    """
    device = model_cfg.get("init_device")
    if device not in (None, "cpu", "meta"):
        raise UserError(f"model.init_device: unknown '{device}' (choose null or meta)")
    init = model_cfg.get("init") or "default"
    if init not in ("default", "seeded"):
        raise UserError(f"model.init: unknown '{init}' (choose default or seeded)")
    return device == "meta", init, int(model_cfg.get("init_seed") or 0)


def pretrained_config(src: str, path: str, **overrides):
    """The config of a checkpoint folder (no weights read)."""
    try:
        config = AutoConfig.from_pretrained(src, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise UserError(f"model.path: could not load a config from '{path}': {one_line(e)}") from None
    for k, v in overrides.items():
        setattr(config, k, v)
    return config


def finish_model(model: torch.nn.Module, model_cfg: Mapping[str, Any], trainable: tuple[str, ...] = ()):
    """The steps after building the architecture that every loader shares: LoRA (``model.lora``), then the
    seeded init of a random-init model that was not built on the meta device. A checkpoint's model built on the
    meta device records its folder (``checkpoint_source``): ``models.sharding`` reads it there, shard by shard."""
    on_meta, init, seed = init_options(model_cfg)
    if on_meta and model_cfg.get("path"):  # filled later from this folder, shard by shard (models.sharding)
        model.checkpoint_source = resolve_path(str(model_cfg["path"]))
    model = apply_lora(model, model_cfg.get("lora"), trainable)
    if init == "seeded" and not model_cfg.get("path") and not on_meta:
        seeded_init_(model, seed)
    return model


def build_model(model_cfg: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, auto_cls, llama_cls,
                dtype: torch.dtype, attn: str, kind: str, **config) -> torch.nn.Module:
    """The architecture of a causal LM or a reward model, the one path both loaders share.

    ``model_cfg.path`` set: that checkpoint (``auto_cls.from_pretrained``; with ``model.init_device: meta`` its
    config only, built on the meta device). Null: ``llama_cls`` from ``model_cfg.config`` sized to ``tokenizer``.
    ``config`` (e.g. ``num_labels=1``) and ``attn`` (the attention implementation) go into the model's config;
    ``kind`` names the model in errors. The input embeddings grow to the tokenizer; the pad id is the tokenizer's.
    """
    on_meta, _, _ = init_options(model_cfg)
    path = model_cfg.get("path")
    if path and on_meta:
        cfg = pretrained_config(model_folder(path), path, **config, _attn_implementation=attn)
        with torch.device("meta"):
            model = auto_cls.from_config(cfg, trust_remote_code=False).to(dtype)
    elif path:
        model = load_pretrained(auto_cls, path, kind, dtype=dtype, attn_implementation=attn, **config)
    else:
        if not model_cfg.get("config"):
            raise UserError("model: set either model.path (a checkpoint) or model.config (dimensions for random init)")
        cfg = llama_config(tokenizer, model_cfg["config"])
        for k, v in {**config, "_attn_implementation": attn}.items():
            setattr(cfg, k, v)
        with torch.device("meta") if on_meta else nullcontext():
            model = llama_cls(cfg).to(dtype)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False  # training: packed rows stay isolated only without a cache
    if model_cfg.get("gradient_checkpointing"):  # transformers 5 renamed it; 4.x only has the old name
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    return model


def load_causal_lm(model_cfg: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase,
                   trainable: bool = True) -> torch.nn.Module:
    """A ``LlamaForCausalLM`` (or any causal LM) as ``model_cfg`` says.

    ``model_cfg.path`` set: load that folder / hub id (safetensors only, no remote code).
    ``model_cfg.path`` null: random init from ``model_cfg.config`` (dimensions) sized to the tokenizer.
    ``attn_implementation: sdpa`` runs as ``sdpa_packed`` (``llama2_lit.models.packed_attention``): identical
    outputs, and packed rows cost the attention of their documents, not of whole rows.
    ``init_device``, ``init``, ``init_seed``: see :func:`init_options`; ``lora``: ``llama2_lit.models.lora``.
    ``trainable``: parameters in float32 (master weights, whatever ``model.dtype``); False (inference, frozen
    copies): in ``model.dtype`` (see :data:`MASTER_DTYPE`).
    """
    attn = model_cfg.get("attn_implementation", "sdpa")
    if attn == "sdpa":  # the same sdpa, but packed rows attend one document at a time (no dense block mask)
        attn = PACKED_SDPA
    model = build_model(model_cfg, tokenizer, AutoModelForCausalLM, LlamaForCausalLM, model_dtype(model_cfg, trainable),
                        attn, "a causal LM")
    model.train()  # from_pretrained returns eval mode; Lightning keeps whatever mode it finds
    return finish_model(model, model_cfg)
