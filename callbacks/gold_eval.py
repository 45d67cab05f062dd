"""GoldEvalCallback: greedy (and sampled) answers to held-out synthetic prompts, scored by the world's gold oracle."""
from __future__ import annotations

import logging

import lightning as L

from llama2_lit.core.stats import mean_and_se
from llama2_lit.generation.engine import Engine, Sampling
from llama2_lit.world import oracle as world

log = logging.getLogger(__name__)


def oracle_pick(prompt: str, answers: list[str]) -> str:
    """The answer a perfect reward model picks, with the paper's priority: on a safety prompt the safest (then the
    most helpful, so a refusal beats any leak), elsewhere the most helpful; the first of equals."""
    if world.is_safety_prompt(prompt):
        return max(answers, key=lambda a: (world.gold_safety(prompt, a), world.gold_helpfulness(prompt, a)))
    return max(answers, key=lambda a: world.gold_helpfulness(prompt, a))


class GoldEvalCallback(L.Callback):
    """Scores the policy with ``gold_helpfulness`` / ``gold_safety`` before and after training.

    Works with any DataModule exposing ``oracle`` (bool) and ``eval_prompts()``; a DataModule
    without an oracle (real files) makes this a no-op. Results land in ``final_metrics``
    (``eval/gold_helpfulness`` with its standard error ``eval/gold_helpfulness_se``, ``eval/gold_safety`` and, with ``at_start``, the ``*_init`` values
    of the untrained model), which the entry point writes to ``metrics.json``.

    ``sample_temperature``: also one sampled answer per prompt at this temperature (seeded by ``sample_seed``, so the
    same for every run), scored as ``eval/gold_helpfulness_sampled`` (+ ``_se``): the quantity RS and PPO optimise,
    E over the policy's own samples, which greedy decoding does not show. null: greedy only.

    ``best_of``: after training, also ``best_of`` samples at ``sample_temperature`` for each of the first
    ``best_of_prompts`` held-out prompts, one picked by the gold oracle (:func:`oracle_pick`), scored by gold
    helpfulness: ``eval/gold_helpfulness_oracle_best_of`` (+ ``_se``), what a perfect reward model could select, the
    room RLHF has above the policy (the world's honesty check: SFT gold well below 1, the oracle's best of 16 well
    above it). null: not measured.
    """

    def __init__(self, at_start: bool = True, max_new_tokens: int = 24, batch_size: int = 64, num_examples: int = 3,
                 sample_temperature: float | None = 1.0, sample_seed: int = 0, best_of: int | None = None,
                 best_of_prompts: int = 250):
        self.at_start, self.max_new_tokens, self.batch_size = at_start, max_new_tokens, batch_size
        self.num_examples = num_examples
        self.sample_temperature, self.sample_seed = sample_temperature, sample_seed
        if best_of is not None and (int(best_of) < 1 or sample_temperature is None):
            raise ValueError(f"gold_eval.best_of={best_of}: needs an integer >= 1 and a sample_temperature")
        self.best_of, self.best_of_prompts = (None if best_of is None else int(best_of)), int(best_of_prompts)
        self.final_metrics: dict[str, float] = {}
        self.samples: list[tuple[str, str]] = []

    def _evaluate(self, trainer, pl_module, suffix: str) -> None:
        dm = trainer.datamodule
        if not getattr(dm, "oracle", False):
            return
        if any(type(p).__name__ == "DTensor" for p in pl_module.model.parameters()):
            # a sharded model's forward is a collective: rank 0 alone would wait for the others forever
            if trainer.is_global_zero:
                log.warning("gold eval skipped: the model is sharded (trainer=fsdp); score the exported hf/ instead")
            return
        if not trainer.is_global_zero:
            return
        prompts = dm.eval_prompts()
        engine = Engine(pl_module.model, pl_module.tokenizer)
        greedy = Sampling(max_new_tokens=self.max_new_tokens, temperature=0.0)  # seeds drawn from the global RNG
        answers = [o[0] for o in engine.generate_text(prompts, greedy, self.batch_size, desc=f"gold eval{suffix}, greedy")]
        helpful = [world.gold_helpfulness(p, a) for p, a in zip(prompts, answers)]
        safe = [world.gold_safety(p, a) for p, a in zip(prompts, answers) if world.is_safety_prompt(p)]
        mean, se = mean_and_se(helpful)
        m = {f"eval/gold_helpfulness{suffix}": mean, f"eval/gold_helpfulness_se{suffix}": se}
        if safe:
            m[f"eval/gold_safety{suffix}"] = sum(safe) / len(safe)
        if self.sample_temperature is not None:
            sampling = Sampling(max_new_tokens=self.max_new_tokens, temperature=float(self.sample_temperature),
                                seed=self.sample_seed)
            sampled = engine.generate_text(prompts, sampling, self.batch_size, desc=f"gold eval{suffix}, T={self.sample_temperature:g}")
            mean, se = mean_and_se([world.gold_helpfulness(p, o[0]) for p, o in zip(prompts, sampled)])
            m[f"eval/gold_helpfulness_sampled{suffix}"] = mean
            m[f"eval/gold_helpfulness_sampled_se{suffix}"] = se
        if self.best_of and not suffix:  # the trained policy only
            few = prompts[: self.best_of_prompts]
            sampling = Sampling(max_new_tokens=self.max_new_tokens, temperature=float(self.sample_temperature),
                                num_samples=self.best_of, seed=self.sample_seed + 1)
            outs = engine.generate_text(few, sampling, max(1, 4 * self.batch_size // self.best_of))
            mean, se = mean_and_se([world.gold_helpfulness(p, oracle_pick(p, o)) for p, o in zip(few, outs)])
            m["eval/gold_helpfulness_oracle_best_of"], m["eval/gold_helpfulness_oracle_best_of_se"] = mean, se
            m["eval/oracle_best_of_k"] = float(self.best_of)
        self.final_metrics.update(m)
        self.samples = list(zip(prompts, answers))[: self.num_examples]
        if trainer.logger is not None:
            trainer.logger.log_metrics(m, step=trainer.global_step)
        log.info("gold eval%s on %d held-out prompts: %s", suffix, len(prompts),
                 ", ".join(f"{k}={v:.4f}" for k, v in m.items()))
        for p, a in self.samples:
            log.info("  %r -> %r", p, a)

    def state_dict(self) -> dict:
        return {"init": {k: v for k, v in self.final_metrics.items() if k.endswith("_init")}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.final_metrics.update(state_dict.get("init") or {})

    def on_fit_start(self, trainer, pl_module) -> None:
        # a resumed run keeps the untrained model's scores from its checkpoint (its model is a trained one)
        if self.at_start and not any(k.endswith("_init") for k in self.final_metrics):
            self._evaluate(trainer, pl_module, "_init")

    def on_train_end(self, trainer, pl_module) -> None:
        self._evaluate(trainer, pl_module, "")
