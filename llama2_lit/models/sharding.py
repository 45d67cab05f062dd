"""FSDP2 sharding of the training stages (``trainer=fsdp``), and consolidating sharded checkpoints.

``trainer=fsdp`` runs Lightning's ``ModelParallelStrategy`` as :class:`FSDP2Strategy`: data-parallel size =
world size, no tensor parallelism. A stage module's ``configure_model`` calls :func:`configure_sharded`,
which applies ``fully_shard`` to every decoder layer and then to the root (:func:`shard_model`): each rank
keeps 1/N of every parameter, gradient and optimizer moment; a layer's parameters are all-gathered for its
forward and backward only. Mixed precision is FSDP2's ``MixedPrecisionPolicy`` (bf16 compute and all-gathers,
fp32 sharded master weights and gradient reduction) on GPU, fp32 on CPU; ``model.gradient_checkpointing``
recomputes each decoder layer in backward; ``strategy.cpu_offload`` keeps the shards in host memory.

Building: every model is built on the meta device and sharded before any weight exists. A random-init
model is then filled shard by shard (``model.init=seeded``, ``llama2_lit.models.init``); a pretrained
``model.path`` (a folder of ``*.safetensors``) is read slice by slice: each rank reads only the rows of each
tensor its shard holds (:func:`load_safetensors_`), so no rank ever holds a full copy.

PPO (``llama2_lit.modules.ppo``) shards the policy, the critic, the frozen reference and the reward models
alike; its rollouts run on the policy's gathered weights (:func:`gathered`: one all-gather per rollout phase,
freed after) or, with ``ppo.gather_for_generation=false``, on the sharded policy, each decoding step gathering
every layer again (:func:`lockstep_forwards` keeps the ranks' collective forwards paired).

Checkpoints: Lightning saves a distributed checkpoint directory (``checkpoints/last.ckpt/``: one file of
shards per rank and ``meta.pt``); ``ckpt_path=<that dir>`` resumes from it. ``hf/`` is written at the end
of a run by gathering the full weights on rank 0 (:func:`gather_full_`). A checkpoint directory becomes an HF
folder with ``python -m llama2_lit.tools.consolidate <run>/checkpoints/last.ckpt <out dir> [overrides]``; the
older command ``python -m llama2_lit.models.sharding consolidate ...`` runs that tool.

Reading weights shard by shard (safetensors slices, distributed checkpoints) is ``models/shard_loading.py``;
whether a stage shards and whether a run fits the GPUs is the entry's decision (``llama2_lit.run``).
Models layer: imports errors and ``models.{init,rank_watch,shard_loading}``.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from llama2_lit.errors import UserError
from llama2_lit.models.init import has_meta, materialize_
from llama2_lit.models.rank_watch import (RANK_LOST_EXIT_CODE, RankLost, _PEERS, _set_collective_timeout,  # noqa: F401
                                          _watch_parent, _WatchedLauncher, rank_lost)
from llama2_lit.models.shard_loading import base_model as _base
from llama2_lit.models.shard_loading import load_safetensors_, safetensors_index  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


# -- sharding a model ------------------------------------------------------------------------------------------
def mixed_precision_policy(name: str | None, device_type: str):
    """FSDP2's policy for ``name``: ``bf16`` (bf16 compute and all-gathers, fp32 gradient reduction), ``fp32``,
    or ``auto`` (bf16 on GPU, fp32 on CPU)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    name = str(name or "auto")
    if name == "auto":
        name = "bf16" if device_type == "cuda" else "fp32"
    if name in ("bf16", "bfloat16"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if name in ("fp32", "float32", "32"):
        return MixedPrecisionPolicy()
    raise UserError(f"trainer.strategy.mixed_precision: unknown '{name}' (choose auto, bf16, fp32)")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (its ``_no_split_modules`` classes: ``LlamaDecoderLayer`` for Llama)."""
    kinds = set(getattr(_base(model), "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in kinds]
    if not layers:
        raise UserError(f"trainer=fsdp: no decoder layers ({', '.join(sorted(kinds)) or 'no _no_split_modules'}) "
                        f"found in {type(model).__name__}")
    return layers


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module, mesh, mp_policy=None, reshard_after_forward: bool = True,
                cpu_offload: bool = False, activation_checkpointing: bool = False, called: tuple[str, ...] = ()) -> nn.Module:
    """Apply FSDP2 ``fully_shard`` to each decoder layer, then to ``model`` (the embeddings, final norm, head).

    mesh: a 1-D device mesh of the data-parallel ranks. mp_policy: a ``MixedPrecisionPolicy`` (default fp32).
    reshard_after_forward: free each layer's gathered parameters after its forward (ZeRO-3; gathered again in
    backward) rather than keeping them to backward (ZeRO-2: faster, more memory); the last layer always
    keeps them, as backward needs them at once. cpu_offload: shards, gradients and the optimizer step on CPU.
    activation_checkpointing: recompute each decoder layer in backward (transformers' per-layer checkpointing,
    non-reentrant, which runs inside each layer's FSDP hooks). called: submodules that code calls directly rather
    than through ``model``'s forward (the critic's backbone and value head): each becomes its own FSDP group, so
    that its hooks gather it. Works on meta-device models too.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if activation_checkpointing:
        _base(model).activation_checkpointing_enable({"use_reentrant": False})
    kw = dict(mesh=mesh, mp_policy=mp_policy or MixedPrecisionPolicy(),
              offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        fully_shard(layer, reshard_after_forward=reshard_after_forward and i < len(layers) - 1, **kw)
    for name in called:
        fully_shard(model.get_submodule(name), reshard_after_forward=reshard_after_forward, **kw)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kw)
    return model


def local_numel(model: nn.Module) -> int:
    """Parameters this rank holds (its shards; the whole model when unsharded)."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` with data-parallel size = world size (pure FSDP2, no tensor parallelism).

    Args:
        mixed_precision: ``auto`` (bf16 on GPU, fp32 on CPU), ``bf16`` or ``fp32``: see :func:`mixed_precision_policy`.
            Keep ``trainer.precision: 32-true``: the policy, not autocast, sets the compute dtype.
        reshard_after_forward, cpu_offload: see :func:`shard_model`.
        save_distributed_checkpoint: checkpoints as a directory of per-rank shards (True) or one full file
            gathered on rank 0 (False).
        timeout_minutes: a collective that waits longer than this for a rank fails (floats: 0.1 is 6 s); the run
            then stops with one line naming the rank (:func:`rank_lost`).
        join_timeout_minutes: how long the ranks are given to start and join the process group (the rendezvous
            uses ``max(timeout_minutes, join_timeout_minutes)``: a child rank takes seconds to import and build its
            data, longer than a short collective timeout).

    A rank that dies (killed, out of memory, a crash on that rank only) stops the others within seconds, with one
    line naming it: ``error: rank 1 (pid 4255) stopped answering: it was killed by SIGKILL; rerun the same command
    with ckpt_path=last hydra.run.dir=<run> to resume from <checkpoint>`` and exit code 69
    (:data:`RANK_LOST_EXIT_CODE`), rather than a gloo traceback or a hang. Rank 0 is the parent of the other ranks
    of its node (Lightning's ``_SubprocessScriptLauncher``), so it polls them (:class:`_RankObserver`, which replaces
    Lightning's observer: that one SIGKILLs rank 0 without a word); a child rank watches its parent's pid. Where the
    surviving rank's collective fails first (gloo on a closed socket: "Connection reset by peer", at once; on a
    rank that hangs: after ``timeout_minutes``), ``python -m llama2_lit`` turns that error into the same line
    (:func:`rank_lost`); the observer is the backstop when the main thread cannot get there.
    """

    def __init__(self, mixed_precision: str = "auto", reshard_after_forward: bool = True, cpu_offload: bool = False,
                 save_distributed_checkpoint: bool = True, process_group_backend: str | None = None,
                 timeout_minutes: float = 30.0, join_timeout_minutes: float = 10.0):
        self.collective_timeout = timedelta(minutes=float(timeout_minutes))
        join = max(self.collective_timeout, timedelta(minutes=float(join_timeout_minutes)))
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=join)
        self.mixed_precision, self.reshard_after_forward, self.cpu_offload = mixed_precision, reshard_after_forward, cpu_offload

    def _configure_launcher(self) -> None:  # runs when the Trainer is built: devices and nodes are known
        world = self.num_processes * self.num_nodes
        if world < 2:
            raise UserError(
                f"trainer=fsdp shards the model over data-parallel processes, but this run has {world} "
                f"(trainer.devices={self.num_processes}, trainer.num_nodes={self.num_nodes}): set trainer.devices "
                "to 2 or more (on CPU: trainer.devices=2 trainer.accelerator=cpu), or train on one device with "
                "trainer=gpu / trainer=cpu")
        super()._configure_launcher()
        from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

        grace = min(5.0, self.collective_timeout.total_seconds())
        if type(self._launcher) is _SubprocessScriptLauncher:  # the same launcher, with the reporting observer
            self._launcher = _WatchedLauncher(self.cluster_environment, self.num_processes, self.num_nodes, grace)
        elif self._launcher is None:  # a rank started by rank 0's launcher (or torchrun, SLURM: then nothing)
            _watch_parent(self.cluster_environment, self.num_processes, grace)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()  # the process group (join timeout) and the device mesh's groups
        _set_collective_timeout(self.collective_timeout)
        _PEERS.strategy, _PEERS.active = self, True  # from here a lost rank 0 is reported (teardown: no longer)

    def teardown(self) -> None:
        _PEERS.active = False
        super().teardown()

    def setup(self, trainer) -> None:
        from lightning.pytorch.utilities.model_helpers import is_overridden

        if not is_overridden("configure_model", self.lightning_module):
            raise UserError(f"trainer=fsdp: {type(self.lightning_module).__name__} does not shard its models yet "
                            "(no configure_model): train this stage with trainer=gpu or trainer=cpu")
        super().setup(trainer)


def _checkpointing(model: nn.Module) -> bool:
    base = _base(model)  # transformers 5 renamed is_gradient_checkpointing (now deprecated)
    if hasattr(base, "is_activation_checkpointing"):
        return bool(base.is_activation_checkpointing)
    return bool(getattr(base, "is_gradient_checkpointing", False))


def _fill(model: nn.Module, device, seed: int | None) -> None:
    """Allocate a meta-device model on ``device`` and fill it: from its checkpoint folder when it has one
    (``checkpoint_source``, set by ``loading.finish_model``), else by the seeded init."""
    source = getattr(_base(model), "checkpoint_source", None)
    materialize_(model, device, seed=None if source else (seed or 0))
    if source:
        load_safetensors_(model, source, seed=seed or 0)


def sharding_strategy(module) -> ModelParallelStrategy | None:
    """The module's trainer's strategy when it shards (``trainer=fsdp``), else None."""
    strategy = getattr(getattr(module, "_trainer", None), "strategy", None)
    return strategy if isinstance(strategy, ModelParallelStrategy) else None


def configure_sharded(module, model: nn.Module, seed: int | None = None, called: tuple[str, ...] = ()) -> nn.Module:
    """The body of a stage module's ``configure_model``: shard ``model`` when the trainer runs FSDP2.

    A model built on the meta device is then materialised: sharded on the strategy's device (each rank fills
    its shard, by the seeded init or from the slices of its checkpoint files it holds), or whole on CPU when
    the run is not sharded. Idempotent (Lightning calls ``configure_model`` again for ``validate``).
    ``seed``: ``model.init_seed``; ``called``: see :func:`shard_model`. Frozen models (PPO's reference and
    reward models) shard the same way.
    """
    strategy = sharding_strategy(module)
    if strategy is None:
        if has_meta(model):
            _fill(model, "cpu", seed)
        return model
    if is_sharded(model):
        return model
    device = strategy.root_device
    offload = bool(getattr(strategy, "cpu_offload", False))
    if offload and device.type == "cpu":
        log.info("trainer.strategy.cpu_offload ignored: the run is on CPU already")
        offload = False
    mesh = module.device_mesh["data_parallel"]
    shard_model(model, mesh, mp_policy=mixed_precision_policy(getattr(strategy, "mixed_precision", "auto"), device.type),
                reshard_after_forward=bool(getattr(strategy, "reshard_after_forward", True)), cpu_offload=offload,
                activation_checkpointing=_checkpointing(model), called=called)
    if has_meta(model):
        _fill(model, "cpu" if offload else device, seed)
    total = sum(p.numel() for p in model.parameters())
    log.info("rank %d of %d holds %d of %d parameters (%.1f%%)", mesh.get_local_rank(), mesh.size(),
             local_numel(model), total, 100 * local_numel(model) / max(1, total))
    return model


# -- rollouts of a sharded policy ------------------------------------------------------------------------------
def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered(model: nn.Module):
    """All-gather every FSDP group of ``model`` once (FSDP2's ``unshard``; a collective), so that its
    parameters are plain full tensors (in the compute dtype) inside the block; reshard and free them after.

    Code inside reads the parameters directly (the generation engine's ``llama`` backend): a module forward
    would run FSDP's hooks, which reshard after each layer.
    """
    mods = fsdp_modules(model)
    for m in mods:
        m.unshard()
    try:
        yield model
    finally:
        for m in mods:
            m.reshard()


@contextmanager
def lockstep_forwards(model: nn.Module, idle_forward):
    """Pair the collective forwards of a sharded ``model`` across ranks that make different numbers of them
    (sampling stops when this rank's answers have all ended).

    Each forward inside the block first all-reduces a 1; at the end of the block a rank all-reduces 0 and, while
    another rank is still making forwards (the sum is not 0), joins each of them with ``idle_forward()`` (a
    forward of a dummy input: FSDP's all-gathers do not depend on the input's shape).
    """
    import torch.distributed as dist

    device = next(model.parameters()).device
    draining = [False]

    def before(mod, args, kwargs):
        if not draining[0]:
            dist.all_reduce(torch.ones(1, device=device))

    handle = model.register_forward_pre_hook(before, with_kwargs=True, prepend=True)  # before FSDP's own hook
    try:
        yield model
        draining[0] = True
        while True:
            others = torch.zeros(1, device=device)
            dist.all_reduce(others)
            if others.item() == 0:
                break
            idle_forward()
    finally:
        handle.remove()


# -- whole weights from shards -----------------------------------------------------------------------------
def gather_full_(model: nn.Module, keep: bool) -> nn.Module:
    """Replace every sharded parameter of ``model`` by its full value, one parameter at a time (a collective:
    every rank calls it). ``keep``: whether this rank keeps the full values (rank 0, which exports); the
    others drop them. The model stops being trainable through FSDP; its ``state_dict`` is plain tensors.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    for mod in model.modules():  # a layer left gathered (e.g. after an evaluation forward) holds views of freed buffers
        if isinstance(mod, FSDPModule):
            mod.reshard()
    full: dict[int, nn.Parameter] = {}
    for mod in model.modules():
        for key, p in list(mod._parameters.items()):
            if not isinstance(p, DTensor):
                continue
            if id(p) not in full:
                value = p.full_tensor().detach().cpu() if keep else p.full_tensor().new_empty(0).cpu()
                full[id(p)] = nn.Parameter(value, requires_grad=p.requires_grad)
            mod._parameters[key] = full[id(p)]
    return model


__all__: list[Any] = ["FSDP2Strategy", "configure_sharded", "decoder_layers", "gather_full_", "gathered",
                      "load_safetensors_", "local_numel", "safetensors_index", "lockstep_forwards",
                      "mixed_precision_policy", "shard_model", "sharding_strategy"]

if __name__ == "__main__":  # the older command: python -m llama2_lit.models.sharding consolidate <ckpt> <out> [overrides]
    import runpy

    runpy.run_module("llama2_lit.tools.consolidate", run_name="__main__", alter_sys=True)
