"""Seeded, layout-independent random init, and materialising models built on the meta device.

``model.init: seeded`` draws every parameter from its own generator, seeded by ``(model.init_seed, parameter
name)``, with the transformers init rules (Linear/Embedding ``N(0, initializer_range)``, the padding row
zero, norms one, biases zero; LoRA ``A`` Kaiming-uniform, ``B`` zero, as peft). The weights are then the
same whether one process holds the whole model or N processes each hold a shard, so a sharded run
(``trainer=fsdp``) builds the model on the meta device and each rank fills only its own shard: no rank
ever holds a full copy, only one full parameter at a time. ``model.init: default`` keeps the transformers
constructor's init (drawn in order from the global RNG), which depends on building the whole model at once.
"""
from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from llama2_lit.errors import UserError


def has_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def _param_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2 ** 63 - 1)


def _std(model: nn.Module) -> float:
    cfg = getattr(model, "config", None)
    return float(getattr(cfg, "initializer_range", None) or 0.02)


def seeded_value(name: str, owner: nn.Module, shape: torch.Size, std: float, seed: int) -> torch.Tensor:
    """The full float32 initial value of parameter ``name`` (``owner`` is the module that holds it)."""
    gen = torch.Generator().manual_seed(_param_seed(seed, name))
    leaf = name.rsplit(".", 1)[-1]
    out = torch.empty(shape, dtype=torch.float32)
    if ".lora_B." in name:
        return out.zero_()
    if ".lora_A." in name:  # peft's default (init_lora_weights=True): kaiming_uniform_(a=sqrt(5))
        return nn.init.kaiming_uniform_(out, a=math.sqrt(5), generator=gen)
    if leaf == "bias":
        return out.zero_()
    if isinstance(owner, nn.Embedding):
        out.normal_(0.0, std, generator=gen)
        if owner.padding_idx is not None:
            out[owner.padding_idx] = 0
        return out
    if isinstance(owner, nn.Linear):
        return out.normal_(0.0, std, generator=gen)
    if "RMSNorm" in type(owner).__name__ or "LayerNorm" in type(owner).__name__:
        return out.fill_(1.0)
    raise UserError(f"model.init=seeded: no init rule for parameter {name} of a {type(owner).__name__}")


def _write(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy ``full`` into ``param``; a sharded (DTensor) parameter takes only the slice this rank holds."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(param, DTensor):
            local = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements,
                                      src_data_rank=None).to_local()  # each rank slices its own copy: no traffic
            param.to_local().copy_(local)
        else:
            param.copy_(full.to(param.dtype))


def seeded_init_(model: nn.Module, seed: int, names: list[str] | None = None) -> nn.Module:
    """Overwrite every parameter (each tied parameter once) with its seeded value; see the module docstring.

    ``names``: the parameter names to use (default ``model.named_parameters()``), e.g. captured before a
    ``to_empty`` that may untie shared parameters.
    """
    std = _std(getattr(model, "get_base_model", lambda: model)())
    for name in names if names is not None else [n for n, _ in model.named_parameters()]:
        param = model.get_parameter(name)
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        _write(param, seeded_value(name, owner, param.shape, std, seed))
    return model


def _reset_buffers_(model: nn.Module) -> None:
    """Recompute the non-persistent buffers ``to_empty`` left uninitialised (RoPE inverse frequencies)."""
    for mod_name, mod in model.named_modules():
        own = dict(mod.named_buffers(recurse=False))
        if not own:
            continue
        if not hasattr(mod, "inv_freq") or not hasattr(mod, "config"):
            raise UserError(f"cannot materialise buffers {sorted(own)} of {mod_name} ({type(mod).__name__})")
        with torch.device("cpu"):
            fresh = dict(type(mod)(mod.config).named_buffers(recurse=False))
        with torch.no_grad():
            for k, buf in own.items():
                buf.copy_(fresh[k])


def materialize_(model: nn.Module, device: torch.device | str, seed: int | None = None) -> nn.Module:
    """Allocate a meta-device (possibly sharded) model on ``device``; with ``seed``, fill it by :func:`seeded_init_`.

    Without ``seed`` the parameters are left uninitialised for a checkpoint load to fill.
    """
    names = [n for n, _ in model.named_parameters()]  # before to_empty, which may untie shared parameters
    model.to_empty(device=device)
    _reset_buffers_(model)
    base = getattr(model, "get_base_model", lambda: model)()
    if not any(type(p).__name__ == "DTensor" for p in model.parameters()) and hasattr(base, "tie_weights"):
        base.tie_weights()
    if seed is not None:
        seeded_init_(model, seed, names)
    return model
