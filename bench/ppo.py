"""make bench-ppo: one PPO iteration's time split (generation / scoring / training) and samples/s, and the
generation inside PPO against the engine alone on the same policy, prompts and settings, in one run.

The PPO iterations run through the real stage (``PPOModule`` under a Lightning ``Trainer``, as
``python -m llama2_lit stage=ppo`` runs it). The engine baseline calls ``Engine.generate`` on the same prompt batches
with the same sampling settings before and after the PPO iterations. Generation is compared in generated tokens per
second (sampled lengths differ run to run); target: PPO's generation takes at most 1.1x the engine's own time per
token (no duplicate forward hidden in the loop).

    .venv/bin/python bench/ppo.py                          # model=tiny (a trained policy if one is given, else random)
    .venv/bin/python bench/ppo.py --model smollm2_135m     # the real checkpoint (make fetch-smollm2)

Reward models and the critic are random-init models of the policy's shape unless --rm-helpfulness/--rm-safety
point at trained ones (the timings do not depend on the weights). Writes bench/results/ppo_<model>.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from llama2_lit.config import compose  # noqa: E402
from llama2_lit.generation.engine import Sampling  # noqa: E402


def random_rms(policy_path: str | None, model: str, tmp: Path, cache_dir: str) -> tuple[str, str, str]:
    """A policy folder and two reward-model folders of the policy's shape (random heads)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from llama2_lit.models.loading import load_causal_lm
    from llama2_lit.models.reward import export_reward_model, load_reward_model

    cfg = compose([f"model={model}", f"paths.cache_dir={cache_dir}"] + ([f"model.path={policy_path}"] if policy_path
                                                                        else []))
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    tok = instantiate(cfg.model.tokenizer)
    if not policy_path:
        torch.manual_seed(0)
        load_causal_lm(model_cfg, tok).save_pretrained(tmp / "policy")
        tok.save_pretrained(tmp / "policy")
        policy_path = str(tmp / "policy")
    out = []
    for i, name in enumerate(("helpfulness", "safety")):
        torch.manual_seed(100 + i)
        export_reward_model(load_reward_model({**model_cfg, "path": policy_path}, tok), tok, tmp / name)
        out.append(str(tmp / name))
    return policy_path, out[0], out[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--model-path", default=None, help="policy checkpoint (default: tiny random init; smollm2: "
                    "the converted checkpoint)")
    ap.add_argument("--rm-helpfulness", default=None)
    ap.add_argument("--rm-safety", default=None)
    ap.add_argument("--iterations", type=int, default=None, help="PPO iterations timed (default 6 tiny, 2 others)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides (e.g. stage.batch_size=32)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tiny = args.model == "tiny"
    iters = args.iterations or (6 if tiny else 2)
    from llama2_lit.run import build

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cache = str(ROOT / ".cache")
        policy = args.model_path or (None if tiny else str(ROOT / "checkpoints" / "smollm2-135m-instruct"))
        if args.rm_helpfulness and args.rm_safety and policy:
            rm_h, rm_s = args.rm_helpfulness, args.rm_safety
        else:
            policy, rm_h, rm_s = random_rms(policy, args.model, tmp, cache)
        cfg = compose(["stage=ppo", f"model={args.model}", f"model.path={policy}", f"ppo.reward_models.helpfulness={rm_h}",
                       f"ppo.reward_models.safety={rm_s}", f"ppo.iterations={iters + 1}", "logger=none",
                       "callbacks=none", "initial_validation=false", "final_validation=false",
                       "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
                       "trainer.enable_model_summary=false", "ppo.early_stopping.enabled=false",
                       f"paths.output_dir={tmp / 'run'}", f"paths.cache_dir={cache}", *args.overrides])
        dm, module, trainer = build(cfg)
        dm.setup("fit")
        batches = list(dm.train_dataloader())
        o = cfg.ppo
        sampling = Sampling(max_new_tokens=int(o.max_new_tokens), temperature=float(o.temperature),
                            top_p=float(o.top_p))

        def engine_alone() -> list[tuple[float, int]]:
            out = []
            for b in batches[1:]:  # the first batch is PPO's warm-up iteration
                t0 = time.perf_counter()
                roll = module.engine.generate([p.text for p in b], sampling)
                module.engine.decode(roll)
                out.append((time.perf_counter() - t0, roll.num_tokens))
            return out

        module._prepare_frozen()
        module.engine.generate([p.text for p in batches[0]], sampling)  # warm-up
        before = engine_alone()
        trainer.fit(module, datamodule=dm)
        after = engine_alone()
        hist = module.history[1:]  # iteration 1 is the warm-up
    eng = before + after
    eng_tps = sum(n for _, n in eng) / sum(t for t, _ in eng)
    ppo_tps = sum(h["perf/gen_tokens"] for h in hist) / sum(h["time/generation_s"] for h in hist)
    split = {k: statistics.median(h[f"time/{k}_s"] for h in hist) for k in ("generation", "scoring", "training")}
    total = sum(split.values())
    samples = statistics.median(h["perf/samples"] for h in hist)
    res = {"model": args.model, "policy": policy, "prompts_per_iteration": int(cfg.stage.batch_size),
           "mini_batch_size": int(o.mini_batch_size), "ppo_epochs": int(o.ppo_epochs),
           "max_new_tokens": int(o.max_new_tokens), "iterations_timed": len(hist), "threads": args.threads,
           "seconds_per_iteration": split, "samples_per_s": samples / total,
           "ppo_generation_tokens_per_s": ppo_tps, "engine_tokens_per_s": eng_tps,
           "generation_time_ratio_ppo_over_engine": eng_tps / ppo_tps,
           "response_tokens_mean": statistics.mean(h["ppo/response_length"] for h in hist)}
    print(f"PPO iteration on model={args.model}: {res['prompts_per_iteration']} prompts, mini-batch "
          f"{res['mini_batch_size']} x {res['ppo_epochs']} epochs, <= {res['max_new_tokens']} new tokens, "
          f"{args.threads} thread(s), median of {len(hist)} iterations")
    print(f"{'part':<12s}{'seconds':>10s}{'share':>8s}")
    for k, v in split.items():
        print(f"{k:<12s}{v:>10.3f}{v / total:>8.1%}")
    print(f"{'total':<12s}{total:>10.3f}   -> {res['samples_per_s']:.2f} samples/s")
    print(f"generation: {ppo_tps:.1f} tokens/s inside PPO vs {eng_tps:.1f} tokens/s engine alone (same prompts and "
          f"settings) -> PPO/engine time per token {res['generation_time_ratio_ppo_over_engine']:.3f}x (target <= 1.1x)")
    out = Path(args.out or ROOT / "bench" / "results" / f"ppo_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
