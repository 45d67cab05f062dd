"""LoRA adapters through peft (``model.lora.*``), and merging them back into a plain Hugging Face model.

    model.lora: {enabled: true, r: 8, alpha: 16, dropout: 0.05, target_modules: [q_proj, v_proj]}

:func:`apply_lora` wraps the model in a ``peft.PeftModel``: the base weights are frozen and each targeted
linear layer gains ``B @ A`` (``A``: r x in, ``B``: out x r, ``B = 0`` at start, scaled by ``alpha / r``).
``trainable`` names modules that stay fully trainable (the reward model's ``score`` head). :func:`merge_lora`
folds the adapters into the base weights, giving the plain model that ``save_pretrained`` writes and
``from_pretrained`` loads (no peft needed to use the result).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

from torch import nn

from llama2_lit.errors import UserError

log = logging.getLogger(__name__)


def lora_enabled(model_cfg: Mapping[str, Any]) -> bool:
    return bool((model_cfg.get("lora") or {}).get("enabled"))


def _linear_names(model: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def apply_lora(model: nn.Module, lora_cfg: Mapping[str, Any] | None, trainable: Sequence[str] = ()) -> nn.Module:
    """``model`` with LoRA adapters when ``lora_cfg.enabled``, else ``model`` unchanged.

    lora_cfg: ``r``, ``alpha``, ``dropout``, ``target_modules`` (names of linear layers, e.g. ``q_proj``).
    trainable: attribute names of ``model`` whose parameters keep ``requires_grad`` (e.g. ``["score"]``).
    Raises UserError naming the target modules the model does not have.
    """
    if not lora_cfg or not lora_cfg.get("enabled"):
        return model
    from peft import LoraConfig, get_peft_model

    targets = list(lora_cfg.get("target_modules") or [])
    if not targets:
        raise UserError("model.lora.target_modules: name at least one linear layer (e.g. [q_proj, v_proj])")
    have = _linear_names(model)
    missing = [t for t in targets if t not in have]
    if missing:
        raise UserError(f"model.lora.target_modules: {', '.join(missing)} not found in {type(model).__name__} "
                        f"(its linear layers: {', '.join(have)})")
    cfg = LoraConfig(r=int(lora_cfg.get("r", 8)), lora_alpha=float(lora_cfg.get("alpha", 16)),
                     lora_dropout=float(lora_cfg.get("dropout", 0.0)), target_modules=targets, bias="none")
    peft_model = get_peft_model(model, cfg)
    for attr in trainable:
        for p in getattr(model, attr).parameters():
            p.requires_grad_(True)
    n_train = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in peft_model.parameters())
    log.info("LoRA r=%s alpha=%s on %s%s: %d of %d parameters trainable (%.2f%%)", cfg.r, cfg.lora_alpha,
             ",".join(targets), f" (+ {','.join(trainable)} fully)" if trainable else "", n_train, n_all,
             100 * n_train / max(1, n_all))
    return peft_model


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def merge_lora(model: nn.Module) -> nn.Module:
    """The plain model with the adapters folded into the base weights (``model`` itself if it has none).

    Folding changes the base weights in place: use the returned model from then on.
    """
    if not is_lora(model):
        return model
    return model.merge_and_unload()
