"""Typed stage options: one dataclass per option group users type (``stage``, ``ppo``, ``rs``, ``collect``,
``pipeline``, ``bootstrap``), and :func:`validate`, which checks a composed config against them.

The YAML files under ``conf/`` hold the values; the dataclasses here say which keys exist and what each one takes.
``llama2_lit.run.run`` calls :func:`validate` before anything loads, so that an unknown key or a wrong type or value
stops the run with one line naming the key and the valid ones, wherever it came from: the command line
(``+ppo.clipp=0.3``), an experiment or scale YAML, or ``llama2_lit.config.compose`` from Python. Ranges (``>= 1``,
``[0, 0.5]``) are checked where the value is used. A field without a default must be present; ``Literal`` lists the
accepted values (the code that reads a value checks the same set: tests/test_stages.py compares them).

Entry layer: imports only ``llama2_lit.errors`` and third-party packages.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llama2_lit.errors import UserError

Scorer = Literal["rm", "gold"]  # rm: the reward models | gold: the synthetic world's gold oracle


# -- pieces shared by several groups ---------------------------------------------------------------------------
@dataclass(kw_only=True)
class Engine:
    """``<group>.engine``: the generation engine (``llama2_lit.generation``)."""
    backend: Literal["auto", "llama", "hf"]
    compile: bool


@dataclass(kw_only=True)
class RewardModels:
    """``<group>.reward_models``: stage=rm runs' ``hf/`` folders (null: none, or trained by the bootstrap)."""
    helpfulness: str | None
    safety: str | None


@dataclass(kw_only=True)
class Scoring:
    """How sampled answers are scored (``llama2_lit.scoring``): RS and PPO."""
    scorer: Scorer
    reward_models: RewardModels
    safety_threshold: float
    rm_batch_size: int
    rm_max_length: int | None


@dataclass(kw_only=True)
class Sampling:
    """How answers are sampled: RS and PPO."""
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    engine: Engine


@dataclass(kw_only=True)
class PPOBootstrap:
    """``ppo.bootstrap``: the keys PPO users type; each defaults to the top-level ``bootstrap`` node's."""
    enabled: bool
    dir: str
    sft_overrides: list[str]
    rm_overrides: list[str]


@dataclass(kw_only=True)
class Bootstrap(PPOBootstrap):
    """``bootstrap``: what a stage lacks on the synthetic world is trained first (``llama2_lit.stages.bootstrap``)."""
    rs_overrides: list[str]


# -- the stage node --------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class Stage:
    """``stage``: the keys every stage has, then the ones a few stages set (None: absent)."""
    name: str
    data_mode: Literal["sft", "pretrain"]
    seq_len: int
    batch_size: int
    max_epochs: int
    module: dict[str, Any] | None = None  # the LightningModule's options: its constructor's arguments (checked)
    pairs_per_step: int | None = None  # rm
    use_distributed_sampler: bool | None = None  # rm
    val_check_interval: int | float | None = None  # ppo
    check_val_every_n_epoch: int | None = None  # ppo
    log_every_n_steps: int | None = None  # ppo
    gradient_clip_val: float | None = None  # ppo


# -- ppo -------------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class PPOEval:
    """``ppo.eval``: the held-out evaluation's sampling (``greedy``: also greedy answers, ``val/*_greedy``)."""
    temperature: float
    greedy: bool
    max_new_tokens: int


@dataclass(kw_only=True)
class EarlyStopping:
    """``ppo.early_stopping``: stop when ``val/reward`` has not improved by ``min_delta`` in ``patience`` evaluations."""
    enabled: bool
    patience: int
    min_delta: float


@dataclass(kw_only=True)
class PPO(Sampling, Scoring):
    """``ppo`` (conf/stage/ppo.yaml documents each key)."""
    iterations: int
    mini_batch_size: int
    micro_batch_size: int | None
    ppo_epochs: int
    lr: float
    value_lr: float | None
    weight_decay: float
    betas: list[float]
    eps: float
    grad_clip: float
    clip: float
    value_clip: float
    vf_coef: float
    kl_coef: float
    kl_estimator: Literal["k1", "k3"]
    kl_level: Literal["token", "sequence"]
    gamma: float
    lam: float
    whiten_rewards: Literal["batch", "running", "none"]
    whiten_advantages: bool
    logit_eps: float
    value_init: Literal["auto", "reward", "policy"]
    frozen_dtype: str
    max_bad_batches: int
    eval: PPOEval
    early_stopping: EarlyStopping
    bootstrap: PPOBootstrap
    gather_for_generation: bool


# -- rs --------------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class TemperatureSweep:
    """``rs.temperature_sweep``: pick the run's temperature among ``candidates`` by max@K on held-out prompts
    (null: ``rs.temperature``); values checked in ``llama2_lit.stages.rs.sweep_options``."""
    candidates: list[float] | None
    prompts: int
    num_samples: int | None


@dataclass(kw_only=True)
class RS(Sampling, Scoring):
    """``rs`` (conf/stage/rs.yaml)."""
    iteration: int
    num_samples: int
    temperature_sweep: TemperatureSweep
    selection: Literal["all_iterations", "previous_iteration"]
    rescore: Literal["auto", "always", "never"]
    bag_dir: str
    device: str
    num_threads: int | None


# -- collect ---------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class Source:
    """One of ``collect.sources``: a model (null: the policy) at a temperature."""
    temperature: float
    model: str | None = None
    name: str | None = None


@dataclass(kw_only=True)
class Collect:
    """``collect`` (conf/stage/collect.yaml)."""
    sources: list[Source]
    max_new_tokens: int
    top_p: float
    seed: int
    max_tries: int
    batch_size: int
    annotator: Literal["simulated", "none"]
    label_noise: float
    thresholds: dict[Literal["significantly_better", "better", "slightly_better"], float]  # smallest gold gap per rating
    ties: Literal["drop", "keep"]
    safe_threshold: float
    device: str
    num_threads: int | None
    engine: Engine


# -- gatt, context_distill -------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class PromptSampling(Scoring):
    """What stage=gatt and stage=context_distill share: answers sampled from the policy, then scored."""
    num_samples: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    batch_size: int
    device: str
    num_threads: int | None
    engine: Engine


@dataclass(kw_only=True)
class GAtt(PromptSampling):
    """``gatt`` (conf/stage/gatt.yaml): Ghost Attention's dialogues and their sampling."""
    scorer: Literal["gold", "rm", "rm_rule"]  # rm_rule: the world's rule check plus the reward model
    dialogues: str
    num_dialogues: int
    turns: int
    rows: Literal["every_turn", "last_turn"]
    drop_broken: bool
    replay: float


# -- context_distill -------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class ContextDistill(PromptSampling):
    """``context_distill`` (conf/stage/context_distill.yaml): safety context distillation's prompts, sampling and
    keep-rule."""
    prompts: str
    prompt_field: str
    num_prompts: int | None
    keep_rule: Literal["better", "all"]
    bootstrap_sft_overrides: list[str]
    anchor_prompts: str | None
    anchor_num_prompts: int | None
    anchor_prompt_field: str


# -- pipeline --------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class Student:
    """One of ``pipeline.students``: a smaller policy fine-tuned on the teacher's RS selections."""
    name: str
    overrides: list[str] = dataclasses.field(default_factory=list)


@dataclass(kw_only=True)
class Pipeline:
    """``pipeline`` (conf/stage/pipeline.yaml); ``<kind>_overrides``: Hydra overrides per step kind."""
    name: str
    root: str
    iterations: int
    ppo_from: int
    seed: int
    collect_previous_policy: bool
    scorer: Scorer
    rm_init: Literal["policy", "previous", "rm_sft"]
    method: Literal["rs_ppo", "dpo"]
    common_overrides: list[str]
    sft_overrides: list[str]
    rm_sft_overrides: list[str]    # rm_init=rm_sft: the RMs' own SFT run
    collect_overrides: list[str]
    rm_overrides: list[str]
    rm_helpfulness_overrides: list[str]
    rm_safety_overrides: list[str]
    rs_overrides: list[str]
    rs_distill_overrides: list[str]
    ppo_overrides: list[str]
    dpo_overrides: list[str]
    rs_bag_all_from: int | None    # RS selects over all iterations' samples from this iteration on (paper: 4)
    rs_temperature: float | str | list[float | str] | None   # null | T | sweep | one per iteration
    rs_temperature_candidates: list[float]
    students: list[Student]
    gatt_after: int | None         # Ghost Attention after this iteration (paper: V3); null: none
    gatt_overrides: list[str]
    context_distill_at: int | None  # safety context distillation in this iteration, after its RL steps; null: none
    context_distill_overrides: list[str]
    evaluate: bool                 # world prompts: the held-out checks after the last iteration (eval/, overopt)
    compare_prompts: int
    compare_seed: int
    rm_check_prompts: int
    rm_check_k: int
    overopt_n: int
    overopt_prompts: int


# a stage's own option group: present only under that stage (conf/stage/<name>.yaml, package _global_)
GROUPS: dict[str, type] = {"ppo": PPO, "rs": RS, "collect": Collect, "pipeline": Pipeline, "gatt": GAtt,
                           "context_distill": ContextDistill}


# -- checking --------------------------------------------------------------------------------------------------
def _names(tp: type) -> str:
    return ", ".join(sorted(f.name for f in dataclasses.fields(tp)))


def _kind(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, get_args(tp)))
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_kind(a) for a in get_args(tp))
    if dataclasses.is_dataclass(tp):
        return f"a mapping of options ({_names(tp)})"
    if get_origin(tp) in (list, dict):
        return "a list" if get_origin(tp) is list else "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}.get(
        tp, str(tp))


def _is(value: Any, tp: Any) -> bool:
    """Whether ``value`` has the plain type ``tp`` (bool is not a number here; an integer is a float)."""
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def check(where: str, value: Any, tp: Any) -> Any:
    """``value`` (plain containers) checked against the annotation ``tp``; dataclasses come back built.
    Raises :class:`UserError` naming ``where`` (e.g. ``ppo.eval.greedy``) and what is valid there."""
    origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise UserError(f"{where}: expected {_kind(tp)}, got {value!r}")
        hints, names = get_type_hints(tp), sorted(f.name for f in dataclasses.fields(tp))
        for key in value:
            if key not in names:
                near = difflib.get_close_matches(str(key), names, n=1)
                hint = f"did you mean {near[0]}? " if near else ""
                raise UserError(f"{where}.{key}: unknown option ({hint}valid: {', '.join(names)})")
        for f in dataclasses.fields(tp):
            if f.name not in value and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UserError(f"{where}.{f.name}: missing (the options of {where}: {', '.join(names)})")
        return tp(**{k: check(f"{where}.{k}", v, hints[k]) for k, v in value.items()})
    if origin is Literal:
        if value not in args or isinstance(value, bool) != isinstance(args[0], bool):
            raise UserError(f"{where}: unknown {value!r} (choose {', '.join(map(str, args))})")
        return value
    if origin in (Union, types.UnionType):
        for a in args:  # plain types first: a dataclass or a Literal explains itself better when nothing matches
            if not (dataclasses.is_dataclass(a) or get_origin(a) in (Literal, list, dict)) and _is(value, a):
                return value
        for a in args:
            if dataclasses.is_dataclass(a) or get_origin(a) in (Literal, list, dict):
                if value is not None:
                    return check(where, value, a)
        raise UserError(f"{where}: expected {_kind(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list, got {value!r}")
        return [check(f"{where}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:  # dict[<key type>, <value type>]: a Literal key type lists the keys allowed
        if not isinstance(value, Mapping):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        keys, values = args or (Any, Any)
        if get_origin(keys) is Literal and any(k not in get_args(keys) for k in value):
            bad = next(k for k in value if k not in get_args(keys))
            raise UserError(f"{where}.{bad}: unknown option (valid: {', '.join(map(str, get_args(keys)))})")
        return {k: check(f"{where}.{k}", v, values) for k, v in value.items()}
    if not _is(value, tp):
        raise UserError(f"{where}: expected {_kind(tp)}, got {value!r}")
    return value


def _plain(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.to_container(cfg[key], resolve=True)
    except OmegaConfBaseException as e:
        raise UserError(f"{key}: {str(e).splitlines()[0]}") from None


def check_module_options(options: Mapping[str, Any], module: type) -> None:
    """``stage.module`` builds ``module`` (its ``_target_`` names that class, the one ``llama2_lit.run.STAGES``
    gives the stage, by its name: a module may be reached through an alias), and its other keys are arguments of
    the constructor."""
    target = str(options.get("_target_", module.__qualname__))
    if target.rsplit(".", 1)[-1] != module.__qualname__:
        raise UserError(f"stage.module._target_: '{target}', but this stage's module is {module.__module__}."
                        f"{module.__qualname__} (llama2_lit.run.STAGES)")
    params = inspect.signature(module.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    valid = sorted(n for n in params if n not in ("self", "model_cfg", "tokenizer"))
    for key in options:
        if key != "_target_" and key not in valid:
            near = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"did you mean {near[0]}? " if near else ""
            raise UserError(f"stage.module.{key}: unknown option of {module.__name__} ({hint}valid: {', '.join(valid)})")


def validate(cfg: DictConfig, module: type | None = None) -> dict[str, Any]:
    """Check the option groups of a composed config; return them typed (``{"stage": Stage(...), "ppo": PPO(...),
    ...}``, the groups present). ``module``: the stage's LightningModule class, whose constructor ``stage.module``'s
    keys must match. Raises :class:`UserError` (one line) at the first unknown key or wrong type or value."""
    out: dict[str, Any] = {"stage": check("stage", _plain(cfg, "stage"), Stage)}
    name = out["stage"].name
    for group, tp in GROUPS.items():
        if cfg.get(group) is None:
            continue
        if group != name:
            raise UserError(f"{group}: options of stage={group}, but this run is stage={name} (drop the {group}.* "
                            f"overrides)")
        out[group] = check(group, _plain(cfg, group), tp)
    if cfg.get("bootstrap") is not None:
        out["bootstrap"] = check("bootstrap", _plain(cfg, "bootstrap"), Bootstrap)
    if module is not None and out["stage"].module is not None:
        check_module_options(out["stage"].module, module)
    return out
