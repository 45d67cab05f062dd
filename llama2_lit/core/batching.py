"""Global batch sizes: the recipe's sizes are per optimizer step over all ranks; each rank's share is derived.

The Llama 2 sizes are global: SFT 64 sequences per step, the RM 512 pairs per step, PPO 512 prompts per iteration
in mini-batches of 64 (one optimizer step each). A config states them once (``stage.batch_size``,
``stage.pairs_per_step``, ``ppo.mini_batch_size``); this module derives, from the world size (ranks = devices x
nodes), what one rank loads per forward (the micro-batch) and how many micro-batches it accumulates per step, and
refuses, in one line, a size that does not divide. Pure functions (no torch.distributed): the memory planner
calls them with the planned GPU count, ``run.configure_batches`` with the trainer's world size.

    split(64, world=8, micro=4)   # BatchSplit(global_size=64, world=8, per_rank=8, micro=4, accumulate=2)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from llama2_lit.errors import UserError

@dataclass(frozen=True)
class BatchSplit:
    """``global_size`` items per optimizer step = ``world`` ranks x ``accumulate`` micro-batches x ``micro`` items."""
    global_size: int
    world: int
    per_rank: int
    micro: int
    accumulate: int

    def describe(self, unit: str) -> str:
        return (f"{self.global_size} {unit} per step (global) = {self.world} ranks x {self.per_rank} per rank "
                f"({self.accumulate} micro-batch{'es' if self.accumulate != 1 else ''} of {self.micro})")


def split(global_size: int, world: int, micro: int | None = None, accumulate: int | None = None,
          what: str = "stage.batch_size") -> BatchSplit:
    """The per-rank share of ``global_size`` items per step over ``world`` ranks.

    ``micro`` (items per forward on one rank) or ``accumulate`` (micro-batches per step) fixes the split of a
    rank's share; neither: one micro-batch of the whole share. Sizes that do not divide are a :class:`UserError`.
    """
    global_size, world = int(global_size), int(world)
    if global_size < 1 or world < 1:
        raise UserError(f"{what}={global_size} on {world} ranks: both must be >= 1")
    if global_size % world:
        raise UserError(f"{what}={global_size} is global (all ranks together) and does not divide over {world} "
                        f"ranks: choose a multiple of {world}")
    per_rank = global_size // world
    if micro is not None and int(micro) > 0:
        micro = int(micro)
        if per_rank % micro:
            raise UserError(f"{what}={global_size} over {world} ranks is {per_rank} per rank, which micro-batches of "
                            f"{micro} do not divide: choose a micro-batch that divides {per_rank}")
        acc = per_rank // micro
        if accumulate not in (None, 1, acc):
            raise UserError(f"{what}={global_size} over {world} ranks in micro-batches of {micro} accumulates {acc} "
                            f"per step, not trainer.accumulate_grad_batches={accumulate}: set only one of the two")
        return BatchSplit(global_size, world, per_rank, micro, acc)
    acc = int(accumulate or 1)
    if per_rank % acc:
        raise UserError(f"{what}={global_size} over {world} ranks is {per_rank} per rank, which "
                        f"trainer.accumulate_grad_batches={acc} does not divide")
    return BatchSplit(global_size, world, per_rank, per_rank // acc, acc)


def split_pairs(pairs_per_step: int, micro: int, world: int) -> BatchSplit:
    """The reward model: ``pairs_per_step`` (global, paper 512) in micro-batches of ``micro`` pairs per rank."""
    return split(pairs_per_step, world, micro=micro, what="stage.pairs_per_step")


@dataclass(frozen=True)
class PPOSplit:
    """One PPO iteration: ``prompts`` (global) sampled ``per_rank`` per rank; optimizer steps on mini-batches of
    ``mini`` rows (global), ``mini_per_rank`` on each rank; ``steps`` optimizer steps per PPO epoch."""
    prompts: int
    world: int
    per_rank: int
    mini: int
    mini_per_rank: int
    steps: int

    def describe(self) -> str:
        return (f"{self.prompts} prompts per iteration (global) = {self.world} ranks x {self.per_rank}; mini-batches "
                f"of {self.mini} (global) = {self.world} x {self.mini_per_rank}: {self.steps} optimizer steps per "
                f"PPO epoch")


def split_ppo(prompts: int, mini: int, world: int) -> PPOSplit:
    b = split(prompts, world, what="stage.batch_size")
    m = split(mini, world, what="ppo.mini_batch_size")
    if prompts % mini:
        raise UserError(f"ppo.mini_batch_size={mini} does not divide stage.batch_size={prompts} (prompts per "
                        f"iteration): each optimizer step takes one full mini-batch")
    return PPOSplit(prompts, world, b.per_rank, mini, m.per_rank, prompts // mini)


def stage_kind(module_target: str) -> str:
    """``ppo`` | ``pairs`` (reward model, DPO) | ``rows`` (SFT, pretraining, RS fine-tuning) by the stage's module."""
    name = module_target.rsplit(".", 1)[-1]
    return {"PPOModule": "ppo", "RewardModule": "pairs", "DPOModule": "pairs"}.get(name, "rows")


def plan_sizes(stage: Mapping[str, Any], ppo: Mapping[str, Any] | None, world: int, micro: int | None = None,
               accumulate: int | None = None) -> BatchSplit | PPOSplit:
    """The split a stage config implies on ``world`` ranks (``micro``: ``trainer.micro_batch_size``)."""
    kind = stage_kind(str((stage.get("module") or {}).get("_target_", "")))
    if kind == "ppo":
        return split_ppo(int(stage["batch_size"]), int((ppo or {})["mini_batch_size"]), world)
    if kind == "pairs":
        return split_pairs(int(stage.get("pairs_per_step") or stage["batch_size"]), int(stage["batch_size"]), world)
    return split(int(stage["batch_size"]), world, micro=micro, accumulate=accumulate)
