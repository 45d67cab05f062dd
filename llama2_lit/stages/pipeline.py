"""stage=pipeline: iterative RLHF V1..Vn as one resumable command (Llama 2 §3.2.3).

    python -m llama2_lit stage=pipeline pipeline.name=demo                        (make demo: RS/PPO on the trained RMs)
    python -m llama2_lit stage=pipeline pipeline.name=demo_gold pipeline.scorer=gold   (make demo-gold: the gold oracle)

SFT on the demonstrations (skipped when ``model.path`` is given), then per iteration k = 1..N:

    collect      two answers per prompt from the latest policy, annotated          v<k>/collect/pairs.jsonl
    rm_helpful   helpfulness RM on every preference collected so far                v<k>/rm_helpfulness/hf
    rm_safety    safety RM on the same pairs (the paper's 90/10 mixture)            v<k>/rm_safety/hf
    rs           K samples per prompt scored by the new RMs into the bag of all iterations   v<k>/rs
    rs_distill   fine-tune the latest policy on the best sample per prompt          v<k>/rs_distill/hf
    student_<n>  each smaller student (``students``) fine-tuned on the same selection  v<k>/student_<n>/hf
    ppo          from iteration ``ppo_from`` on (paper: V4), PPO from the RS checkpoint       v<k>/ppo/hf
    context_distill   in iteration ``context_distill_at``: safety context distillation (§4.2.4)   v<k>/context_distill/hf
    gatt         after iteration ``gatt_after`` (paper: V3): Ghost Attention (§3.3)  v<k>/gatt/hf

Every step is its own ``python -m llama2_lit`` run in ``<root>/v<k>/<step>/`` (its log, config, metrics); later steps
find earlier outputs by these names. A step whose ``metrics.json`` exists is finished and never rerun, so a killed
pipeline continues at the step it was in (a Lightning step from its own ``checkpoints/last.ckpt``; rejection
sampling from its bag). ``<root>/pipeline.json`` records the settings; a rerun with other settings is refused
with the difference. At the end: ``report.md`` and ``report.png`` (per iteration: RM accuracy overall and by
rating bucket, RS max/median reward, PPO KL, gold helpfulness and safety of the iteration's policy, time per step).
"""
from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import DictConfig, OmegaConf

from llama2_lit import run_lock
from llama2_lit.stages.loggers import instantiate_loggers
from llama2_lit.errors import UserError

log = logging.getLogger(__name__)
BUCKETS = ("negligibly_better", "slightly_better", "better", "significantly_better")
SAFETY_LABELS = ("preferred_safe_other_unsafe", "both_safe", "both_unsafe")  # data_modules.preferences (no import:
# the pipeline runs stages in subprocesses and imports no data code)


@dataclass
class Step:
    """One stage run of the pipeline: ``python -m llama2_lit <overrides> hydra.run.dir=<dir>``."""

    name: str                  # e.g. "v2/rm_safety"
    iteration: int             # 0 for SFT
    kind: str                  # sft | collect | rm_helpfulness | rm_safety | rs | rs_distill | ppo
    dir: Path
    overrides: list[str] = field(default_factory=list)
    policy_out: str | None = None   # the policy this step produces (its hf/), if any
    module: str = "llama2_lit"      # what runs: a stage (hydra overrides) or an evaluation tool (its arguments)
    done: str = "metrics.json"      # the file in ``dir`` whose presence marks the step finished

    def finished(self) -> bool:
        return (self.dir / self.done).is_file()


def _list(items: Sequence[str]) -> str:
    return "[" + ",".join(f"'{x}'" for x in items) + "]"


RM_INITS = ("policy", "previous", "rm_sft")


def plan(p: dict[str, Any], common: list[str], model_path: str | None) -> list[Step]:
    """The ordered steps of a pipeline (pure: paths and overrides only, nothing runs).

    ``p``: the ``pipeline`` options (``root``, ``iterations``, ``ppo_from``, ``<kind>_overrides`` lists, ``seed``,
    ``collect_previous_policy``: from V2 on, the second answer of each pair comes from the previous policy;
    ``scorer``: ``rm`` (RS and PPO score with the iteration's reward models) or ``gold`` (with the world's gold
    oracle, the perfect-RM limit; the RMs are still trained and reported));
    ``rs_bag_all_from`` / ``rs_temperature`` / ``rs_temperature_candidates``: the RS schedule (:func:`rs_schedule`);
    ``students``: ``[{name, overrides}]``, smaller policies (their own SFT at the overridden shape in
    ``v0/student_<name>``) fine-tuned each iteration on the teacher's RS selection (``v<k>/student_<name>``);
    ``common``: overrides every step gets (model, seed, paths, ...); ``model_path``: the starting policy, or None to
    run SFT first.
    """
    root = Path(p["root"])
    extra = lambda kind: list(p.get(f"{kind}_overrides") or [])  # noqa: E731
    scorer = str(p.get("scorer") or "rm")
    if scorer not in ("rm", "gold"):
        raise UserError(f"pipeline.scorer: unknown '{scorer}' (choose rm: the trained reward models, or gold: the "
                        "synthetic world's oracle)")
    foreign = _other_prompts(p, common, ("common", "collect", "rs", "ppo"))
    if scorer == "gold" and foreign:  # refuse now, not after the first collection and reward models have run
        kind, o = foreign
        raise UserError(f"pipeline.scorer=gold scores synthetic-world prompts only, but pipeline.{kind}_overrides "
                        f"sets {o}; use pipeline.scorer=rm for other prompts")
    students = _students(p.get("students"))
    method = str(p.get("method") or "rs_ppo")
    if method not in ("rs_ppo", "dpo"):
        raise UserError(f"pipeline.method: unknown '{method}' (rs_ppo: reward models, rejection sampling and PPO, the "
                        "paper; dpo: DPO on the collected pairs)")
    if method == "dpo" and (students or p.get("gatt_after") is not None or p.get("context_distill_at") is not None):
        raise UserError("pipeline.method=dpo trains no reward models and samples no RS bag: pipeline.students, "
                        "gatt_after and context_distill_at need method=rs_ppo")
    steps: list[Step] = []
    if model_path:
        policy = str(model_path)
    else:
        d = root / "v0" / "sft"
        policy = str(d / "hf")
        steps.append(Step("v0/sft", 0, "sft", d, ["stage=sft", *common, *extra("sft")], policy))
    student_policy = {}
    for name, overrides in students.items():  # each student's own SFT, at its smaller shape
        d = root / "v0" / f"student_{name}"
        steps.append(Step(f"v0/student_{name}", 0, f"student_sft:{name}", d,
                          ["stage=sft", *common, *extra("sft"), "model.path=null", *overrides], str(d / "hf")))
        student_policy[name] = str(d / "hf")
    pairs: list[str] = []
    previous, rms = None, {}
    rm_init = str(p.get("rm_init") or "policy")
    if rm_init not in RM_INITS:
        raise UserError(f"pipeline.rm_init: unknown '{rm_init}' (policy: each iteration's RMs start from the latest "
                        "policy, as in the paper; previous: from the previous iteration's RMs; rm_sft: from the RMs' "
                        "own chat model, v0/rm_sft, shaped by pipeline.rm_sft_overrides)")
    rm_base = None
    if rm_init == "rm_sft":  # the RMs' own chat model, larger than the policy (the paper: larger RMs judge better)
        d = root / "v0" / "rm_sft"
        steps.append(Step("v0/rm_sft", 0, "rm_sft", d, ["stage=sft", *common, "model.path=null", *extra("rm_sft")],
                          str(d / "hf")))
        rm_base = str(d / "hf")
    for k in range(1, int(p["iterations"]) + 1):
        v = root / f"v{k}"
        seed_k = int(p["seed"]) * 1000 + k
        variant = []  # the paper samples the pair from two model variants: the latest policy and the one before
        if previous and p.get("collect_previous_policy", True):
            variant = [f"collect.sources.1.model={previous}", "collect.sources.1.name=previous"]
        steps.append(Step(f"v{k}/collect", k, "collect", v / "collect",
                          ["stage=collect", *common, f"model.path={policy}", f"data.seed={seed_k}",
                           f"collect.seed={seed_k}", *variant, *extra("collect")]))
        pairs.append(str(v / "collect" / "pairs.jsonl"))
        if method == "dpo":  # the collected pairs train the policy directly: no reward models, RS or PPO
            d = v / "dpo"
            steps.append(Step(f"v{k}/dpo", k, "dpo", d,
                              ["stage=dpo", "data=pairs", f"data.path={_list(pairs)}", "data.mix=false",
                               "data.gold_eval=true", *common, f"model.path={policy}", *extra("dpo")], str(d / "hf")))
            previous, policy = policy, str(d / "hf")
            continue
        previous_rms, rms = rms if k > 1 else {}, {}
        for reward in ("helpfulness", "safety"):
            d = v / f"rm_{reward}"
            # rm_init: policy (the paper: each RM starts from the latest chat model) | previous (from V2 on, from the
            # previous iteration's RM, so that training accumulates over iterations)
            init = previous_rms[reward] if rm_init == "previous" and previous_rms else rm_base or policy
            steps.append(Step(f"v{k}/rm_{reward}", k, f"rm_{reward}", d,
                              ["stage=rm", "data=pairs", f"data.path={_list(pairs)}", f"reward={reward}", *common,
                               f"model.path={init}", *extra("rm"), *extra(f"rm_{reward}")]))
            rms[reward] = str(d / "hf")
        steps.append(Step(f"v{k}/rs", k, "rs", v / "rs",
                          ["stage=rs", "data=rs_prompts", *common, f"model.path={policy}", f"rs.iteration={k}",
                           f"rs.bag_dir={root / 'rs_bag'}", f"rs.reward_models.helpfulness={rms['helpfulness']}",
                           f"rs.reward_models.safety={rms['safety']}", f"rs.scorer={scorer}",
                           *rs_schedule(p, k), *extra("rs")]))
        d = v / "rs_distill"
        steps.append(Step(f"v{k}/rs_distill", k, "rs_distill", d,
                          ["stage=rs_distill", "data=rs_bag", f"data.path={v / 'rs'}", *common, f"model.path={policy}",
                           *extra("rs_distill")], str(d / "hf")))
        for name in students:  # the paper: RS on the largest model only; the smaller ones learn its selections
            sd = v / f"student_{name}"
            steps.append(Step(f"v{k}/student_{name}", k, f"student:{name}", sd,
                              ["stage=rs_distill", "data=rs_bag", f"data.path={v / 'rs'}", *common,
                               f"model.path={student_policy[name]}", *extra("rs_distill")], str(sd / "hf")))
            student_policy[name] = str(sd / "hf")
        previous, policy = policy, str(d / "hf")
        if k >= int(p["ppo_from"]):
            d = v / "ppo"
            steps.append(Step(f"v{k}/ppo", k, "ppo", d,
                              ["stage=ppo", *common, f"model.path={policy}",
                               f"ppo.reward_models.helpfulness={rms['helpfulness']}",
                               f"ppo.reward_models.safety={rms['safety']}", f"ppo.scorer={scorer}", *extra("ppo")],
                              str(d / "hf")))
            policy = str(d / "hf")
        if p.get("context_distill_at") is not None and k == int(p["context_distill_at"]):
            d = v / "context_distill"  # the paper: on the safety prompts, with the iteration's safety RM
            steps.append(Step(f"v{k}/context_distill", k, "context_distill", d,
                              ["stage=context_distill", *common, f"model.path={policy}",
                               f"context_distill.scorer={scorer}",
                               f"context_distill.reward_models.helpfulness={rms['helpfulness']}",
                               f"context_distill.reward_models.safety={rms['safety']}", *extra("context_distill")],
                              str(d / "hf")))
            policy = str(d / "hf")
        if p.get("gatt_after") is not None and k == int(p["gatt_after"]):
            d = v / "gatt"  # the paper: after RLHF V3. rm: the world's rule checks plus the RM (stages/gatt.py)
            steps.append(Step(f"v{k}/gatt", k, "gatt", d,
                              ["stage=gatt", *common, f"model.path={policy}",
                               f"gatt.scorer={'gold' if scorer == 'gold' else 'rm_rule'}",
                               f"gatt.reward_models.helpfulness={rms['helpfulness']}", *extra("gatt")],
                              str(d / "hf")))
            policy = str(d / "hf")
    for key in ("gatt_after", "context_distill_at"):
        at = p.get(key)
        if at is not None and not 1 <= int(at) <= int(p["iterations"]):
            raise UserError(f"pipeline.{key}={at}: not an iteration of this pipeline (1..{p['iterations']})")
    if p.get("evaluate", True) and not _other_prompts(p, common, ("common", "collect", "rs", "ppo", "sft")):
        steps += evaluation_steps(p, steps, model_path)
    return steps


def rs_schedule(p: dict[str, Any], k: int) -> list[str]:
    """The RS overrides of iteration ``k`` from the pipeline's schedule (§3.2.3):

    - ``rs_bag_all_from`` (paper: 4): before this iteration RS selects among the iteration's own samples
      (``rs.selection=previous_iteration``: the bag of the preceding model), from it on among every iteration's
      (``all_iterations``); null leaves ``rs.selection`` to the RS config;
    - ``rs_temperature``: null (the RS config's), a number, ``sweep`` (pick among ``rs_temperature_candidates`` by
      max@K on held-out prompts, Fig. 8), or a list with one of those per iteration.
    """
    out = []
    start = p.get("rs_bag_all_from")
    if start is not None:
        if int(start) < 1:
            raise UserError(f"pipeline.rs_bag_all_from={start}: an iteration number >= 1, or null")
        out.append(f"rs.selection={'all_iterations' if k >= int(start) else 'previous_iteration'}")
    t = p.get("rs_temperature")
    if isinstance(t, (list, tuple)):
        if len(t) < int(p["iterations"]):
            raise UserError(f"pipeline.rs_temperature: {len(t)} temperatures for {p['iterations']} iterations (give one "
                            "per iteration, a single number, or sweep)")
        t = t[k - 1]
    if t is None:
        return out
    if t == "sweep":
        cands = list(p.get("rs_temperature_candidates") or [])
        if not cands:
            raise UserError("pipeline.rs_temperature=sweep needs pipeline.rs_temperature_candidates (e.g. [0.8,1.0,1.2])")
        return out + ["rs.temperature_sweep.candidates=[" + ",".join(str(float(c)) for c in cands) + "]"]
    try:
        value = float(t)
    except (TypeError, ValueError):
        value = -1.0
    if not value > 0:
        raise UserError(f"pipeline.rs_temperature: {t!r} is not a temperature > 0 or 'sweep'")
    return out + [f"rs.temperature={value}"]


def _students(raw) -> dict[str, list[str]]:
    """``pipeline.students`` as ``{name: overrides}``; each entry ``{name: str, overrides: [hydra overrides]}``."""
    out: dict[str, list[str]] = {}
    for i, st in enumerate(raw or []):
        name = st.get("name") if isinstance(st, dict) else None
        if not isinstance(name, str) or not name.replace("_", "").isalnum() or name in out:
            raise UserError(f"pipeline.students[{i}]: needs a unique 'name' of letters, digits and '_' "
                            f"(got {name!r}), e.g. {{name: small, overrides: [model.config.num_hidden_layers=2]}}")
        ov = st.get("overrides") or []
        if not isinstance(ov, (list, tuple)) or not all(isinstance(o, str) for o in ov):
            raise UserError(f"pipeline.students[{i}] ({name}): 'overrides' must be a list of Hydra overrides")
        out[name] = list(ov)
    return out


def _other_prompts(p: dict[str, Any], common: list[str], kinds: Sequence[str]) -> tuple[str, str] | None:
    """The first ``(kind, override)`` among those step kinds' overrides (``common``: every step's) that points
    ``data.path`` away from the synthetic world, whose gold oracle alone can judge; None when there is none."""
    for kind in kinds:
        for o in common if kind == "common" else list(p.get(f"{kind}_overrides") or []):
            key, _, value = str(o).partition("=")
            if key.lstrip("+~") == "data.path" and value != "synthetic":
                return kind, str(o)
    return None


def evaluation_steps(p: dict[str, Any], steps: Sequence[Step], model_path: str | None) -> list[Step]:
    """The held-out checks after the last iteration (synthetic world only), each a tool run in ``<root>/eval``:

    - ``eval/rm_v<k>``: ``gold_compare --rm``, how well iteration k's helpfulness RM ranks T=1 samples of the policy
      it scored (the one RS sampled from): pairwise accuracy on sample pairs whose gold differs, gold of the
      RM's best of ``rm_check_k`` against the mean sample;
    - ``eval/compare``: ``gold_compare`` of every iteration's policy against the first on ``compare_prompts``
      held-out prompts drawn with ``compare_seed`` (not the in-run evaluation's prompts): paired differences of
      greedy and T=1 gold with their standard errors, and gold safety;
    - ``eval/overopt``: the over-optimisation probe on the last policy and helpfulness RM (best-of-n gold and proxy
      against KL_bon, and the last PPO run's rollouts against sqrt(KL)): ``<root>/overopt.json`` and ``overopt.png``.
    """
    root, ev = Path(p["root"]), Path(p["root"]) / "eval"
    policies = [str(model_path)] if model_path else []
    rms, ppo_dir, last_policy = {}, None, {}
    students: dict[str, str] = {}
    for s in steps:
        if s.kind.startswith("student"):  # a student's lineage: its last policy joins the comparison at the end
            students[s.kind.split(":", 1)[1]] = s.policy_out
            continue
        if s.kind == "rm_sft":  # the reward models' own chat model is no policy of the pipeline
            continue
        if s.policy_out:  # an iteration's policy is its last step's that makes one (rs_distill, ppo, cd, gatt)
            last_policy[s.iteration] = s.policy_out
        if s.kind == "rm_helpfulness":
            rms[s.iteration] = str(s.dir / "hf")
        if s.kind == "ppo":
            ppo_dir = s.dir
    policies += [last_policy[k] for k in sorted(last_policy)]
    scored = {}  # iteration k -> the policy its RM scored (the policy at the start of iteration k)
    for s in steps:
        if s.kind == "collect":
            scored[s.iteration] = next(o.split("=", 1)[1] for o in s.overrides if o.startswith("model.path="))
    seed = str(p.get("compare_seed", 11))
    if int(seed) == int(p.get("seed", 0)) + 2:
        raise UserError(f"pipeline.compare_seed={seed} draws the in-run evaluation's held-out prompts (seed + 2); "
                        "choose another so the final comparison is on other prompts")
    out = [Step(f"eval/rm_v{k}", k, "eval_rm", ev / f"rm_v{k}",
                [scored[k], "--rm", rm, "--n", str(p.get("rm_check_prompts", 300)), "--k", str(p.get("rm_check_k", 8)),
                 "--seed", seed, "--json", str(ev / f"rm_v{k}" / "metrics.json")], module="llama2_lit.tools.gold_compare")
           for k, rm in sorted(rms.items())]
    out.append(Step("eval/compare", len(rms), "eval_compare", ev / "compare",
                    [*policies, *students.values(), "--n", str(p.get("compare_prompts", 1000)), "--k", "4", "--seed", seed,
                     "--json", str(ev / "compare" / "metrics.json")], module="llama2_lit.tools.gold_compare"))
    if rms:
        last_rm = rms[max(rms)]
        args = [policies[-1], "--rm", last_rm, "--n", str(p.get("overopt_n", 32)), "--prompts",
                str(p.get("overopt_prompts", 200)), "--seed", seed, "--out", str(root)]
        if ppo_dir is not None:
            args += ["--ppo", str(ppo_dir / "ppo_history.jsonl")]
        out.append(Step("eval/overopt", len(rms), "eval_overopt", root, args, module="llama2_lit.tools.overopt",
                        done="overopt.json"))
    return out


def _resume_overrides(step: Step) -> list[str]:
    ckpt = step.dir / "checkpoints" / "last.ckpt"
    if step.kind not in ("collect", "rs") and ckpt.is_file():
        return [f"ckpt_path={ckpt}"]
    return []


def execute(steps: Sequence[Step], runner: Callable[[Step, list[str]], None], timings_file: Path | None = None
            ) -> dict[str, float]:
    """Run every unfinished step in order through ``runner(step, extra_overrides)``; returns seconds per step run
    now (finished steps are logged and skipped)."""
    timings = json.loads(timings_file.read_text()) if timings_file and timings_file.is_file() else {}
    ran: list[float] = []  # seconds of the steps run by this call
    for i, step in enumerate(steps, 1):
        if step.finished():
            log.info("pipeline: step %d/%d: %s finished earlier: skipped", i, len(steps), step.name)
            continue
        resume = _resume_overrides(step)
        # progress: the steps' count and, once 3 steps ran, a rough ETA from their median time (steps differ a lot in
        # length: SFT and PPO take minutes, collection seconds)
        eta = ""
        if len(ran) >= 3:
            per = statistics.median(ran)
            eta = f" (roughly {per * (len(steps) - i + 1) / 60:.0f} min left at a median {per:.0f} s per step so far)"
        log.info("pipeline: step %d/%d: %s %s%s", i, len(steps), "resuming" if resume or step.dir.exists() else
                 "running", step.name, eta)
        t0 = time.perf_counter()
        runner(step, resume)
        if not step.finished():
            raise UserError(f"pipeline: step {step.name} ended without {step.dir / step.done}; see its "
                            f"__main__.log")
        timings[step.name] = time.perf_counter() - t0
        ran.append(timings[step.name])
        if timings_file:
            tmp = timings_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(timings, indent=2) + "\n")
            tmp.replace(timings_file)
        log.info("pipeline: %s done in %.0f s", step.name, timings[step.name])
    return timings


def subprocess_runner(step: Step, extra: list[str]) -> None:
    if step.module != "llama2_lit":  # an evaluation tool: plain arguments, no Hydra run directory
        step.dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", step.module, *step.overrides]
    else:
        cmd = [sys.executable, "-m", "llama2_lit", *step.overrides, *extra, f"hydra.run.dir={step.dir}"]
    log.info("pipeline: %s", " ".join(cmd[2:]))
    rc = subprocess.run(cmd, check=False).returncode
    if rc != 0:
        where = f"its log is {step.dir}/__main__.log" if step.module == "llama2_lit" else "its output is above"
        raise UserError(f"pipeline: step {step.name} failed (exit code {rc}); {where}. Rerun the same command to "
                        "resume.")


def _manifest(root: Path, settings: dict[str, Any]) -> None:
    f = root / "pipeline.json"
    if f.is_file():
        old = json.loads(f.read_text())
        old.setdefault("scorer", "rm")  # pipelines started before pipeline.scorer existed scored with their RMs
        old.setdefault("rm_init", "policy")  # ... and before pipeline.rm_init, started their RMs from the policy
        # ... and before the RS schedule and students: the RS config's temperature and selection (all iterations)
        old.setdefault("method", "rs_ppo")  # ... and before pipeline.method: the paper's RMs, RS and PPO
        old.setdefault("rs_temperature", None)
        old.setdefault("rs_bag_all_from", None)
        old.setdefault("students", [])
        for k in settings:  # a step kind added since (e.g. dpo_overrides): the old pipeline had none of its overrides
            if k.endswith("_overrides"):
                old.setdefault(k, [])
        keys = sorted(set(old) | set(settings))
        diff = [k for k in keys if old.get(k) != settings.get(k) and k != "iterations"]
        if diff:
            lines = "\n".join(f"  {k}: was {old.get(k)!r}, now {settings.get(k)!r}" for k in diff)
            raise UserError(f"pipeline: {root} belongs to a pipeline with other settings:\n{lines}\n"
                            "use another pipeline.name (or the same settings to resume)")
    root.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def _metrics(step: Step) -> dict[str, float]:
    return _json(step.dir / "metrics.json") or {}


def report(steps: Sequence[Step], timings: dict[str, float], root: Path) -> tuple[str, list[dict[str, Any]]]:
    """``report.md`` and ``report.png`` in ``root``; returns the markdown and the per-iteration rows."""
    by_it: dict[int, dict[str, Step]] = {}
    for s in steps:
        by_it.setdefault(s.iteration, {})[s.kind] = s
    rows = []
    for k in sorted(by_it):
        st = by_it[k]
        row: dict[str, Any] = {"iteration": k}
        last = st.get("ppo") or st.get("rs_distill") or st.get("dpo") or st.get("sft")
        if last:
            m = _metrics(last)
            row["gold_helpfulness"] = m.get("eval/gold_helpfulness")
            row["gold_helpfulness_se"] = m.get("eval/gold_helpfulness_se")
            row["gold_sampled"] = m.get("eval/gold_helpfulness_sampled")
            row["gold_sampled_se"] = m.get("eval/gold_helpfulness_sampled_se")
            row["gold_safety"] = m.get("eval/gold_safety")
            row["oracle_best"] = m.get("eval/gold_helpfulness_oracle_best_of")
            row["oracle_best_se"] = m.get("eval/gold_helpfulness_oracle_best_of_se")
            row["oracle_k"] = m.get("eval/oracle_best_of_k")
            row["policy"] = last.name
        first = st.get("rs_distill") or st.get("dpo")
        if k == 1 and 0 not in by_it and first:  # a given starting policy: its gold eval at the start
            m = _metrics(first)
            rows.append({"iteration": 0, "policy": "model.path", "gold_helpfulness": m.get("eval/gold_helpfulness_init"),
                         "gold_helpfulness_se": m.get("eval/gold_helpfulness_se_init"),
                         "gold_sampled": m.get("eval/gold_helpfulness_sampled_init"),
                         "gold_sampled_se": m.get("eval/gold_helpfulness_sampled_se_init"),
                         "gold_safety": m.get("eval/gold_safety_init")})
        for reward in ("helpfulness", "safety"):
            m = _metrics(st[f"rm_{reward}"]) if f"rm_{reward}" in st else {}
            if m:
                # the RM's accuracy on its own test pool (Table 7's diagonal) when measured per pool
                row[f"rm_{reward}_acc"] = m.get(f"val/accuracy/pool/{reward}", m.get("val/accuracy"))
                for b in BUCKETS:
                    row[f"rm_{reward}_acc/{b}"] = m.get(f"val/accuracy/{b}")
                for pool in ("helpfulness", "safety"):
                    row[f"rm_{reward}_on/{pool}"] = m.get(f"val/accuracy/pool/{pool}")
                    row[f"rm_{reward}_on/{pool}/count"] = m.get(f"val/count/pool/{pool}")
                for b in SAFETY_LABELS:
                    row[f"rm_{reward}_bin/{b}"] = m.get(f"val/accuracy/safety_bin/{b}")
                    row[f"rm_{reward}_bin/{b}/count"] = m.get(f"val/count/safety_bin/{b}")
                row[f"rm_{reward}_unsafe_recall"] = m.get("val/unsafe_recall")
                row[f"rm_{reward}_unsafe_count"] = m.get("val/count/unsafe_responses")
        for kind, step in st.items():
            if kind.startswith("student"):
                m = _metrics(step)
                row[f"{kind.split(':')[0]}/{kind.split(':', 1)[1]}"] = {
                    key: m.get(f"eval/{key}") for key in ("gold_helpfulness", "gold_helpfulness_se",
                                                           "gold_helpfulness_sampled", "gold_helpfulness_sampled_se",
                                                           "gold_safety")}
        if "rs" in st:
            m = _metrics(st["rs"])
            kmax = max((int(x.split("@")[1]) for x in m if x.startswith("rs/reward_max@")), default=None)
            if kmax:
                row["rs_max"], row["rs_median"], row["rs_k"] = m[f"rs/reward_max@{kmax}"], m[
                    f"rs/reward_median@{kmax}"], kmax
            # on the world: gold of the samples the scorer selected against the mean sample (is the RM worth it?)
            row["rs_gold_selected"] = m.get("rs/selected_gold_helpfulness_mean")
            row["rs_gold_mean"] = m.get("rs/gold_helpfulness_mean")
            row["rs_temperature"] = m.get("rs/temperature")
            row["rs_swept"] = sorted(float(x.split("T=")[1]) for x in m if x.startswith("rs/temperature_sweep/max@"))
            row["rs_pool_iterations"] = m.get("rs/pool_iterations")
            sel = _json(st["rs"].dir / "selected.json") or {}
            row["rs_selection"], row["rs_pooled"] = sel.get("selection"), sel.get("iterations")
        if "ppo" in st:
            m = _metrics(st["ppo"])
            row["ppo_kl"], row["ppo_val_reward"] = m.get("ppo/kl"), m.get("val/reward")
        if "dpo" in st:  # DPO's implicit-reward accuracy on held-out pairs in the RM column, its KL in PPO's
            m = _metrics(st["dpo"])
            row["rm_helpfulness_acc"], row["ppo_kl"] = m.get("dpo/accuracy"), m.get("dpo/kl")
        rm_check = _json(root / "eval" / f"rm_v{k}" / "metrics.json")
        if rm_check:  # gold_compare --rm: the helpfulness RM on T=1 samples of the policy it scored
            row["rm_onpolicy_acc"] = rm_check.get("pair_accuracy")
            row["rm_best_gold"], row["rm_mean_gold"] = rm_check.get("best_by_rm"), rm_check.get("mean")
        row["seconds"] = sum(v for n, v in timings.items() if n.startswith(f"v{k}/"))
        rows.append(row)

    def f(x, nd=3):
        return "–" if x is None else f"{x:.{nd}f}"

    def gold(r, key="gold_helpfulness", se_key="gold_helpfulness_se"):  # with its standard error when measured
        se = r.get(se_key)
        return f(r.get(key)) + ("" if se is None else f" ± {f(se)}")

    def pair(r, a, b):
        return f"{f(r.get(a))} / {f(r.get(b))}" if r.get(a) is not None else "–"

    manifest = _json(root / "pipeline.json") or {}
    scorer = manifest.get("scorer", "rm")
    lines = ["# Pipeline report", "", f"RS and PPO scored by: **{scorer}** "
             f"({'each iteration’s trained reward models, the paper’s setting' if scorer == 'rm' else 'the world’s gold oracle, a perfect RM: the ceiling'})."
             if manifest.get("method", "rs_ppo") == "rs_ppo" else
             "Method: **DPO** on every pair collected so far, from the latest policy (no reward models, no RS or "
             "PPO); the RM help acc column holds DPO's implicit-reward accuracy on held-out pairs, PPO KL its KL to "
             "the reference on held-out prompts.",
             "", "| iteration | policy | gold helpfulness (greedy) | gold helpfulness (T=1) | "
             "gold safety | RM help acc | RM safety acc | RM on-policy acc | RS max@K / median@K | "
             "RS gold selected / mean | PPO KL | minutes |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['iteration']} | {r.get('policy', '–')} | {gold(r)} | "
                     f"{gold(r, 'gold_sampled', 'gold_sampled_se')} | "
                     f"{f(r.get('gold_safety'))} | {f(r.get('rm_helpfulness_acc'))} | {f(r.get('rm_safety_acc'))} | "
                     f"{f(r.get('rm_onpolicy_acc'))} | "
                     f"{pair(r, 'rs_max', 'rs_median')} | {pair(r, 'rs_gold_selected', 'rs_gold_mean')} | "
                     f"{f(r.get('ppo_kl'))} | {f(r.get('seconds', 0) / 60, 1) if r.get('seconds') else '–'} |")
    lines += ["", "Gold helpfulness (greedy, T=1) and safety: the in-run held-out evaluation. RM help / safety acc: "
              "validation accuracy on held-out collected pairs. RM on-policy acc: the helpfulness RM ranking T=1 "
              "samples of the policy it scored (pairs whose gold differs; `eval/rm_v<k>`). RS gold selected / mean: "
              "gold of the answers rejection sampling kept against the mean sample."]
    for r in rows:
        if r.get("oracle_best") is not None:
            lines += ["", f"Room for RLHF: {r.get('policy')} answers held-out prompts with gold {f(r.get('gold_helpfulness'))} "
                      f"(greedy) and {f(r.get('gold_sampled'))} (T=1); the best of {int(r['oracle_k'])} T=1 samples by "
                      f"the gold oracle (a perfect RM) scores {gold(r, 'oracle_best', 'oracle_best_se')}."]
    lines += _judge_lines(steps)
    lines += _compare_lines(root) + _overopt_lines(root, scorer) + _stage_lines(steps)
    lines += _rm_pool_lines(rows) + _rs_schedule_lines(rows) + _student_lines(rows)
    lines += ["", "Helpfulness RM accuracy by rating bucket (Table 8's columns):", "",
              "| iteration | " + " | ".join(BUCKETS) + " |", "|---|" + "---|" * len(BUCKETS)]
    for r in rows:
        if r.get("rm_helpfulness_acc") is not None:
            lines.append(f"| {r['iteration']} | " + " | ".join(f(r.get(f'rm_helpfulness_acc/{b}')) for b in BUCKETS)
                         + " |")
    lines += ["", "Seconds per step:", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {n} | {v:.0f} |" for n, v in timings.items()]
    recipe = sum(v for n, v in timings.items() if not n.startswith("eval/"))
    lines += [f"| total | {sum(timings.values()):.0f} |"]
    if len(timings) > 1 and recipe != sum(timings.values()):
        lines += [f"| the recipe's steps (without eval/) | {recipe:.0f} |"]
    text = "\n".join(lines) + "\n"
    (root / "report.md").write_text(text)
    _figure(rows, root / "report.png")
    return text, rows


def _json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _shape(hf: str | None) -> str:
    """``"4 layers x 128"`` from an hf/ folder's config.json; ``"?"`` when it is not there."""
    c = _json(Path(hf) / "config.json") if hf else None
    return f"{c.get('num_hidden_layers')} layers x {c.get('hidden_size')}" if c else "?"


def _judge_lines(steps: Sequence[Step]) -> list[str]:
    """Who judges: the shape of the policy and of the reward models' starting checkpoint, and each RM's head."""
    by = {s.name: s for s in steps}
    rm = next((s for s in steps if s.kind == "rm_helpfulness"), None)
    if rm is None:
        return []
    policy = next((s.policy_out for s in steps if s.kind == "sft"), None)
    base = by.get("v0/rm_sft")
    heads = []
    for s in steps:
        if s.kind in ("rm_helpfulness", "rm_safety") and s.iteration == rm.iteration:
            c = _json(s.dir / "hf" / "config.json")
            heads.append(f"{s.kind[3:]} {'?' if c is None else c.get('reward_head', 'scalar')}")
    text = (f"Judges: the policy has {_shape(policy)}; " if policy else "Judges: ")
    if base is not None:
        m = _metrics(base)
        text += (f"the reward models start every iteration from v0/rm_sft, their own chat model of "
                 f"{_shape(base.policy_out)} (its own held-out gold {_fmt(m.get('eval/gold_helpfulness'))} greedy, "
                 f"{_fmt(m.get('eval/gold_helpfulness_sampled'))} T=1)")
    else:
        text += "the reward models start from the policy of their iteration"
    return ["", text + f"; reward heads: {', '.join(heads)}."]


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def _compare_lines(root: Path) -> list[str]:
    """The held-out comparison of ``eval/compare`` (gold_compare), when it ran."""
    res = _json(root / "eval" / "compare" / "metrics.json")
    if not res:
        return []
    names = list(res["policies"])
    lines = ["", f"Held-out comparison (`gold_compare`, {res['prompts']} prompts drawn with another seed than the "
             f"in-run evaluation; {res['samples_per_prompt']} T=1 samples each); differences are paired, against "
             f"the first policy, with their standard error and its multiple:", "",
             "| policy | greedy | T=1 | gold safety | greedy - first | T=1 - first |", "|---|---|---|---|---|---|"]
    for name in names:
        m, d = res["policies"][name], res["vs_first"].get(name)

        def diff(key):
            if not d:
                return "–"
            x, se = d[key]["diff"], d[key]["se"]
            return f"{x:+.4f} ± {se:.4f} ({x / se:+.1f} SE)" if se > 0 else f"{x:+.4f}"
        short = str(Path(name).relative_to(root)) if Path(name).is_relative_to(root) else name
        lines.append(f"| {short} | {m['greedy']:.4f} | {m['sampled']:.4f} | {m['gold_safety']:.4f} | {diff('greedy')} | "
                     f"{diff('sampled')} |")
    return lines


# Llama 2 Table 7 (Meta Helpful. / Meta Safety columns) and Table 29 (the safety RM, without / with the auxiliary loss)
PAPER_TABLE7 = {"safety": (56.2, 64.5), "helpfulness": (63.2, 62.8)}
PAPER_TABLE29 = {"baseline": (63.7, 93.0, 56.0, 59.5, 73.0), "auxiliary loss": (64.5, 94.3, 56.9, 59.9, 90.4)}


def _rm_pool_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Each RM on helpfulness and on safety test pairs (Table 7's layout), and the safety RM per safety bin with the
    unsafe-response recall (Table 29's columns), for the iterations whose RMs were measured per pool."""
    def pc(x):
        return "–" if x is None else f"{100 * x:.1f}"
    measured = [r for r in rows if any(r.get(f"rm_{w}_on/{p}") is not None for w in ("helpfulness", "safety")
                                       for p in ("helpfulness", "safety"))]
    if not measured:
        return []
    lines = ["", "Reward models on each test pool (Table 7's layout: accuracy in %, held-out collected pairs of each "
             "pool):", "", "| iteration | RM | helpfulness pairs | safety pairs |", "|---|---|---|---|"]
    for reward in ("safety", "helpfulness"):
        h, sf = PAPER_TABLE7[reward]
        lines.append(f"| paper | {reward} RM | {h} (Meta Helpful.) | {sf} (Meta Safety) |")
    for r in measured:
        for reward in ("safety", "helpfulness"):
            cells = [f"{pc(r.get(f'rm_{reward}_on/{p}'))} ({int(r.get(f'rm_{reward}_on/{p}/count') or 0)})"
                     for p in ("helpfulness", "safety")]
            lines.append(f"| {r['iteration']} | {reward} RM | " + " | ".join(cells) + " |")
    binned = [r for r in measured if any(r.get(f"rm_safety_bin/{b}") is not None for b in SAFETY_LABELS)]
    if binned:
        lines += ["", "Safety RM on the safety pairs by safety bin (Table 29's columns, %, with the validation pairs of "
                  "each; unsafe-response recall: unsafe answers scored below 0.5 on the sigmoid scale):", "",
                  "| iteration | avg | safe chosen, unsafe rejected | both safe | both unsafe | unsafe recall |",
                  "|---|---|---|---|---|---|"]
        for name, vals in PAPER_TABLE29.items():
            lines.append(f"| paper, {name} | " + " | ".join(f"{x}" for x in vals) + " |")
        for r in binned:
            def n(key):
                return f" ({int(r[key])})" if r.get(key) is not None else ""
            lines.append(f"| {r['iteration']} | {pc(r.get('rm_safety_on/safety'))}{n('rm_safety_on/safety/count')} | "
                         + " | ".join(pc(r.get(f"rm_safety_bin/{b}")) + n(f"rm_safety_bin/{b}/count")
                                      for b in SAFETY_LABELS)
                         + f" | {pc(r.get('rm_safety_unsafe_recall'))}{n('rm_safety_unsafe_count')} |")
    return lines


def _rs_schedule_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Per iteration: the RS temperature (and the candidates it was picked from) and the bag iterations selected
    from (§3.2.3: the preceding iteration's samples up to V3, then all)."""
    rs = [r for r in rows if r.get("rs_temperature") is not None]
    if not rs:
        return []
    lines = ["", "Rejection sampling schedule (temperature: fixed, or picked by max@K among the candidates on held-out "
             "prompts; the bag: the iterations whose samples the selection drew from):", "",
             "| iteration | temperature | bag selection | iterations pooled |", "|---|---|---|---|"]
    for r in rs:
        t = f"{r['rs_temperature']:g}" + (f" (swept {', '.join(f'{x:g}' for x in r['rs_swept'])})"
                                         if r.get("rs_swept") else "")
        lines.append(f"| {r['iteration']} | {t} | {r.get('rs_selection') or '–'} | "
                     f"{', '.join(str(i) for i in r.get('rs_pooled') or []) or '–'} |")
    return lines


def _student_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Each student's gold beside the teacher's, per iteration (its own SFT at iteration 0)."""
    names = sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith(("student/", "student_sft/"))})
    if not names:
        return []

    def g(m):
        if not m or m.get("gold_helpfulness") is None:
            return "–"
        se = m.get("gold_helpfulness_se")
        t1 = m.get("gold_helpfulness_sampled")
        return (f"{m['gold_helpfulness']:.3f}" + ("" if se is None else f" ± {se:.3f}")
                + ("" if t1 is None else f" / {t1:.3f}"))
    lines = ["", "Distillation into smaller students (the paper: rejection sampling on the largest model only, the smaller "
             "ones fine-tuned on its selections); held-out gold helpfulness, greedy ± SE / T=1:", "",
             "| iteration | teacher | " + " | ".join(f"student {n}" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for r in rows:
        cells = [g(r.get(f"student/{n}") or r.get(f"student_sft/{n}")) for n in names]
        if all(c == "–" for c in cells):
            continue
        teacher = {"gold_helpfulness": r.get("gold_helpfulness"), "gold_helpfulness_se": r.get("gold_helpfulness_se"),
                   "gold_helpfulness_sampled": r.get("gold_sampled")}
        lines.append(f"| {r['iteration']} | {g(teacher)} | " + " | ".join(cells) + " |")
    return lines


def _stage_lines(steps: Sequence[Step]) -> list[str]:
    """Ghost Attention's adherence by turn (Table 30's layout) and context distillation's before / after figures,
    for the steps that ran."""
    def v(m, key):
        x = m.get(key)
        return "–" if x is None else f"{x:.3f}"
    lines = []
    for s in steps:
        m = _metrics(s)
        if s.kind == "gatt" and m:
            turns = sorted({int(k.split("@turn")[1]) for k in m if k.startswith("gatt/adherence@turn")})
            lines += ["", f"Ghost Attention ({s.name}): instruction adherence by turn, the instruction on the first "
                      "turn only, greedy answers to held-out world dialogues (paper, Table 30: baseline 100 / 10 / 0 "
                      "/ 0 %, GAtt 100 % at turns 2 / 4 / 6 / 20):", "",
                      "| | " + " | ".join(f"turn {t}" for t in turns) + " |", "|---|" + "---|" * len(turns),
                      "| before | " + " | ".join(v(m, f"gatt/adherence_init@turn{t}") for t in turns) + " |",
                      "| after | " + " | ".join(v(m, f"gatt/adherence@turn{t}") for t in turns) + " |",
                      "| content gold before | " + " | ".join(v(m, f"gatt/content_gold_init@turn{t}") for t in turns)
                      + " |",
                      "| content gold after | " + " | ".join(v(m, f"gatt/content_gold@turn{t}") for t in turns) + " |"]
        if s.kind == "context_distill" and m:
            lines += ["", f"Safety context distillation ({s.name}; rows kept {int(m.get('cd/kept', 0))}, dropped by the "
                      f"keep-rule {v(m, 'cd/dropped_fraction')}):", "", "| | before | after |", "|---|---|---|",
                      f"| gold safety (greedy) | {v(m, 'cd/gold_safety_init')} | {v(m, 'cd/gold_safety')} |",
                      f"| gold safety (T=1) | {v(m, 'cd/gold_safety_sampled_init')} | {v(m, 'cd/gold_safety_sampled')} |",
                      f"| gold helpfulness, ordinary prompts | {v(m, 'cd/gold_helpfulness_init')} | "
                      f"{v(m, 'cd/gold_helpfulness')} (paired diff {v(m, 'cd/gold_helpfulness_diff')} ± "
                      f"{v(m, 'cd/gold_helpfulness_diff_se')}) |"]
    return lines


def _overopt_lines(root: Path, scorer: str) -> list[str]:
    """The over-optimisation probe's table (``overopt.json``) and picture, when it ran."""
    res = _json(root / "overopt.json")
    if not res:
        return []
    lines = ["", f"Over-optimisation probe on the last policy and helpfulness RM (best of k of {res['n']} T=1 samples "
             f"by the RM, {res['prompts']} held-out helpfulness prompts; `overopt.json`):", "",
             "| k | KL_bon | gold | proxy (RM) |", "|---|---|---|---|"]
    for i, k in enumerate(res["k"]):
        lines.append(f"| {k} | {res['kl_bon'][i]:.3f} | {res['gold'][i]:.4f} ± {res['gold_se'][i]:.4f} | "
                     f"{res['proxy'][i]:.4f} ± {res['proxy_se'][i]:.4f} |")
    c = res.get("ppo")
    if c:
        if scorer == "gold":
            lines += ["", "(pipeline.scorer=gold: PPO optimised the gold score itself, so its proxy is the gold.)"]
        peak = max(range(len(c["gold"])), key=lambda i: c["gold"][i])
        lines += ["", f"PPO rollouts, {len(c['iteration'])} iterations: sqrt(KL) {c['sqrt_kl'][0]:.3f} -> "
                  f"{c['sqrt_kl'][-1]:.3f}; proxy {c['proxy'][0]:.4f} -> {c['proxy'][-1]:.4f}; gold "
                  f"{c['gold'][0]:.4f} -> {c['gold'][-1]:.4f} (highest {c['gold'][peak]:.4f} at iteration "
                  f"{c['iteration'][peak]}, sqrt(KL) {c['sqrt_kl'][peak]:.3f})."]
    return lines + ["", "![over-optimisation](overopt.png)"]


def _figure(rows: list[dict[str, Any]], out: Path) -> None:
    """``report.png``, four panels per iteration: gold helpfulness (greedy and T=1, standard errors as error bars),
    gold safety on its own axis, the RMs' validation accuracy, and RS max / median@K with PPO's KL on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key, se_key=None, rs=rows):
        pts = [(r["iteration"], r[key], r.get(se_key) if se_key else None) for r in rs if r.get(key) is not None]
        return ([x for x, _, _ in pts], [y for _, y, _ in pts],
                [0.0 if e is None else e for _, _, e in pts] if se_key else None)

    fig, ax = plt.subplots(2, 2, figsize=(11, 7.5))
    a = ax[0][0]
    for key, se, style, label in (("gold_helpfulness", "gold_helpfulness_se", "o-", "greedy"),
                                  ("gold_sampled", "gold_sampled_se", "^-", "T=1 samples")):
        x, y, e = series(key, se)
        if x:
            a.errorbar(x, y, yerr=e, fmt=style, capsize=3, label=label)
    a.set_title("Gold helpfulness, held-out prompts (± SE)")
    a.set_ylabel("gold helpfulness")
    a.legend()
    a = ax[0][1]
    x, y, _ = series("gold_safety")
    a.plot(x, y, "s--", color="tab:green")
    a.set_title("Gold safety on safety prompts (greedy)")
    a.set_ylabel("gold safety")
    a.set_ylim(min([0.9, *y]) - 0.02 if y else 0.0, 1.01)
    a = ax[1][0]
    for key, style, label in (("rm_helpfulness_acc", "o-", "helpfulness RM"), ("rm_safety_acc", "s--", "safety RM"),
                              ("rm_onpolicy_acc", "d:", "helpfulness RM on policy samples")):
        x, y, _ = series(key)
        if x:
            a.plot(x, y, style, label=label)
    a.set_title("Reward models: pairwise accuracy")
    a.set_ylabel("accuracy")
    a.legend()
    a = ax[1][1]
    for key, style, label in (("rs_max", "o-", "RS max@K"), ("rs_median", "^-", "RS median@K")):
        x, y, _ = series(key)
        if x:
            a.plot(x, y, style, label=label)
    a.set_ylabel("RS reward (the scorer's)")
    a.set_title("Rejection sampling and PPO")
    x, y, _ = series("ppo_kl")
    if x:
        b = a.twinx()
        b.plot(x, y, "x", color="tab:red", markersize=10, label="PPO KL (nats)")
        b.set_ylabel("PPO KL to the reference (nats)")
        b.legend(loc="lower right")
    a.legend(loc="upper left")
    for a in ax.flat:
        a.set_xlabel("iteration (0 = SFT)")
        a.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def run(cfg: DictConfig, runner: Callable[[Step, list[str]], None] = subprocess_runner) -> dict[str, float]:
    """Plan, run what is unfinished, report; returns the last iteration's row as metrics."""
    name = str(cfg.pipeline.name)
    if not name or name in (".", "..") or any(c in name for c in "/\\") or name.startswith("."):
        raise UserError(f"pipeline.name: '{name}' must be a plain folder name (no '/', '\\' or leading '.')")
    p = OmegaConf.to_container(cfg.pipeline, resolve=True)
    if int(p["iterations"]) < 1:
        raise UserError(f"pipeline.iterations must be >= 1, got {p['iterations']}")
    loggers = instantiate_loggers(cfg)  # before any step: a logger whose package is missing stops here
    root = Path(p["root"])
    common = [f"model={cfg.model.name}", f"seed={cfg.seed}", f"paths.output_root={cfg.paths.output_root}",
              f"paths.cache_dir={cfg.paths.cache_dir}",
              f"trainer.enable_progress_bar={str(bool(cfg.trainer.get('enable_progress_bar', True))).lower()}",
              *list(p.get("common_overrides") or [])]
    model_path = cfg.model.get("path")
    steps = plan(p, common, model_path)
    settings = {"model": cfg.model.name, "model_path": model_path, "seed": int(cfg.seed),
                "iterations": int(p["iterations"]), "ppo_from": int(p["ppo_from"]), "scorer": p.get("scorer", "rm"),
                "rm_init": p.get("rm_init") or "policy", "method": p.get("method") or "rs_ppo",
                "rs_temperature": p.get("rs_temperature"),
                "rs_bag_all_from": p.get("rs_bag_all_from"), "students": p.get("students") or [],
                **{k: v for k, v in p.items() if k.endswith("_overrides")}}
    t = p.get("rs_temperature")
    if t == "sweep" or (isinstance(t, list) and "sweep" in t):
        settings["rs_temperature_candidates"] = p.get("rs_temperature_candidates")
    # one pipeline per root: a second one (make demo started twice) is refused here, before it writes into root;
    # each step locks its own directory below root (llama2_lit/run_lock.py)
    with run_lock.acquire(root) as lock:
        if lock.takeover_message():
            log.warning("pipeline: %s", lock.takeover_message())
        _manifest(root, settings)
        log.info("pipeline %s: %d steps (%s)", root, len(steps), ", ".join(s.name for s in steps))
        timings = execute(steps, runner, root / "timings.json")
        text, rows = report(steps, timings, root)
    print(text)
    log.info("pipeline report: %s", root / "report.md")
    out = Path(str(cfg.paths.output_dir))
    out.mkdir(parents=True, exist_ok=True)
    last = rows[-1]
    first = rows[0]
    metrics = {"pipeline/iterations": float(p["iterations"]), "pipeline/seconds": float(sum(timings.values()))}
    for key in ("gold_helpfulness", "gold_sampled", "gold_safety"):
        if last.get(key) is not None:
            metrics[f"pipeline/final_{key}"] = float(last[key])
        if first.get(key) is not None:
            metrics[f"pipeline/start_{key}"] = float(first[key])
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    for lg in loggers:  # every iteration's numeric report values (x axis: the iteration), then the final metrics
        for row in rows:
            values = {}
            for k, v in row.items():
                for k2, x in (v.items() if isinstance(v, dict) else [("", v)]):  # student_<n>/<name>: a dict
                    tag = f"pipeline/{k}/{k2}" if k2 else f"pipeline/{k}"
                    if k != "iteration" and isinstance(x, (int, float)) and not isinstance(x, bool):
                        # seconds: the iteration's, pipeline/seconds the total -> pipeline/iteration_seconds
                        values[tag.replace("/", "/iteration_", 1) if tag in metrics else tag] = float(x)
            lg.log_metrics(values, step=int(row["iteration"]))
        lg.log_metrics(metrics, step=int(last["iteration"]))
        lg.finalize("success")
    return metrics
