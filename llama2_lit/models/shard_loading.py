"""Reading weights shard by shard: each rank fills only the part of each tensor its FSDP2 shard holds.

- :func:`load_safetensors_`: a (materialised, possibly sharded) model from the ``*.safetensors`` files of a folder,
  each rank reading only its rows of each tensor (``safe_open(...).get_slice``), so no rank holds a whole model;
- :func:`safetensors_index`: tensor name -> the file that holds it (headers only);
- :func:`load_distributed_`: a stage module, built on the meta device, filled from a distributed checkpoint
  directory (Lightning's sharded ``last.ckpt/``), whole on CPU (``python -m llama2_lit.tools.consolidate``).

Sharding itself (``fully_shard``, the strategy, gathering) is ``llama2_lit.models.sharding``.
Models layer: imports errors, ``models.init`` and ``models.loading``.
"""
from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch
from torch import nn

from llama2_lit.errors import UserError
from llama2_lit.models.init import _std, materialize_, seeded_value
from llama2_lit.models.loading import pickled_only


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _rows_held(param: torch.Tensor) -> tuple[slice, ...]:
    """The index of the global tensor this rank's shard of ``param`` holds (everything when not a DTensor)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(param, DTensor):
        return tuple(slice(0, n) for n in param.shape)
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def load_safetensors_(model: nn.Module, folder: str | Path, seed: int = 0) -> nn.Module:
    """Fill ``model``'s (materialised, possibly sharded) parameters from the ``*.safetensors`` files of ``folder``.

    Each rank reads, with ``safe_open(...).get_slice(name)[index]``, only the part of each tensor its shard
    holds (FSDP2 shards dim 0: the rows ``_rows_held`` gives), so no rank reads or holds a whole model.
    Parameters the checkpoint lacks: LoRA adapters and a new scalar head (``score``: a critic started from a
    causal LM) take the seeded init (``llama2_lit.models.init``); any other missing name, or a shape that
    differs from the checkpoint's, is an error. Tied parameters are read once.
    """
    from safetensors import safe_open

    index = safetensors_index(folder)
    base = base_model(model)
    std = _std(base)
    with ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(str(f), framework="pt", device="cpu")) for f in set(index.values())}
        where = {key: handles[f] for key, f in index.items()}
        with torch.no_grad():
            for name, param in base.named_parameters():  # remove_duplicate: a tied weight once
                key = name.replace(".base_layer.", ".")  # peft keeps the wrapped Linear's weight under base_layer
                local = param.to_local() if hasattr(param, "to_local") else param
                if key not in where:
                    if ".lora_" in name or name.split(".")[0] in ("score", "classifier"):
                        owner = base.get_submodule(name.rsplit(".", 1)[0])
                        full = seeded_value(name, owner, param.shape, std, seed)
                        local.copy_(full[_rows_held(param)])
                        continue
                    raise UserError(f"{folder}: the checkpoint has no tensor '{key}' for parameter {name} of "
                                    f"{type(base).__name__}")
                piece = where[key].get_slice(key)
                if list(piece.get_shape()) != list(param.shape):
                    raise UserError(f"{folder}: tensor '{key}' has shape {piece.get_shape()}, the model's parameter "
                                    f"{list(param.shape)}")
                local.copy_(piece[_rows_held(param)])
    return model


def safetensors_index(folder: str | Path) -> dict[str, Path]:
    """Tensor name -> the ``*.safetensors`` file of ``folder`` that holds it (headers only are read); a folder
    without such files is an error (sharded runs read weights slice by slice, which only safetensors allows)."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder}: no *.safetensors files to read shard by shard (trainer=fsdp loads model "
                        f"folders in safetensors format only){pickled_only(str(folder))}")
    index: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as handle:
            index.update(dict.fromkeys(handle.keys(), f))
    return index


def check_distributed(ckpt: str | Path) -> None:
    """Refuse ``ckpt`` unless it is a distributed checkpoint directory (one with ``.metadata``)."""
    if not (Path(ckpt).is_dir() and (Path(ckpt) / ".metadata").exists()):
        raise UserError(f"{ckpt}: not a distributed checkpoint directory (no .metadata): a single-file checkpoint "
                        "loads with torch.load")


def load_distributed_(module: nn.Module, ckpt: str | Path) -> nn.Module:
    """Fill ``module`` (a stage module whose ``model`` is on the meta device) from the distributed checkpoint
    directory ``ckpt``: allocated whole on CPU (the model's size in host memory), read from every rank's shards."""
    import torch.distributed.checkpoint as dcp

    check_distributed(ckpt)
    materialize_(module.model, "cpu")
    sd = module.state_dict()
    saved = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    if any(k.startswith("state_dict.sft.model.") for k in saved):  # RSDistillModule checkpoints before issue 15
        sd = {f"sft.{k}": v for k, v in sd.items()}  # load_state_dict's pre-hook maps them back
    state = {"state_dict": sd}
    dcp.load(state, checkpoint_id=str(ckpt))
    module.load_state_dict(state["state_dict"])
    return module
