"""make bench-gen: generated tokens/s of the project's engine and of HF generate, measured in one run.

Same model, prompts (synthetic-world prompts in the model's chat template), batch, length and sampling settings
(temperature, top-p, no top-k, stop at EOS, KV cache) for every variant; the variants alternate, each
`--repeats` times, after a warm-up, and the median is reported with the ratio to HF generate measured in the
same run (and the best repeat of each, since contention only slows a repeat down). Tokens = generated tokens
up to and including the stop token. One torch thread by default (stable on a shared machine).

    .venv/bin/python bench/gen.py                               # model=tiny (random init), batch 64
    .venv/bin/python bench/gen.py --model smollm2_135m          # the real checkpoint (make fetch-smollm2)
    .venv/bin/python bench/gen.py --model-path outputs/runs/sft_tiny_for_rs/hf   # a trained tiny policy

Writes bench/results/gen_<model>.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from llama2_lit.world import oracle as world  # noqa: E402
from llama2_lit.config import compose  # noqa: E402
from llama2_lit.generation.engine import Engine, Sampling, encode_prompts, left_pad  # noqa: E402
from llama2_lit.models.loading import load_causal_lm  # noqa: E402


def generated(new: torch.Tensor, stops: list[int]) -> int:
    """Tokens up to and including the first stop token of each row of ``new`` (B, T)."""
    hit = torch.isin(new, torch.tensor(stops))
    first = torch.where(hit.any(1), hit.int().argmax(1) + 1, torch.full((new.shape[0],), new.shape[1]))
    return int(first.sum())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="a conf/model option (default tiny: random init)")
    ap.add_argument("--model-path", default=None, help="a checkpoint folder for the model option")
    ap.add_argument("--batch", type=int, default=64, help="sequences per generate call")
    ap.add_argument("--num-samples", type=int, default=1, help="K per prompt (batch = prompts x K)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 48 (tiny), 32 (others)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=None, help="alternating repeats (default 9 for tiny, 2 "
                    "otherwise); the median and the best are reported (contention only ever slows a repeat down)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default); 1 by default: on "
                    "a shared 2-core machine one thread per process gives stable timings")
    ap.add_argument("--compile", action="store_true", help="also time the engine with a compiled decode step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tiny = args.model == "tiny"
    t_new = args.max_new_tokens or (48 if tiny else 32)
    repeats = args.repeats or (9 if tiny else 2)
    if args.batch % args.num_samples:
        ap.error("--batch must be a multiple of --num-samples")

    over = [f"model={args.model}", "paths.output_dir=/tmp/bench_gen"]
    if args.model_path:
        over.append(f"model.path={args.model_path}")
    cfg = compose(over)
    tok = instantiate(cfg.model.tokenizer)
    torch.manual_seed(args.seed)
    model = load_causal_lm(OmegaConf.to_container(cfg.model, resolve=True), tok).eval()
    n_prompts = args.batch // args.num_samples
    prompts = [t.prompt for t in world.generate_tasks(n_prompts, seed=args.seed, split="train")]
    ids, mask = left_pad(encode_prompts(tok, prompts), tok.pad_token_id)
    stops = [tok.eos_token_id]
    settings = dict(max_new_tokens=t_new, temperature=args.temperature, top_p=args.top_p)

    def hf(max_new=t_new):
        rid, rmask = ids.repeat_interleave(args.num_samples, 0), mask.repeat_interleave(args.num_samples, 0)
        with torch.no_grad():
            out = model.generate(input_ids=rid, attention_mask=rmask, do_sample=args.temperature > 0,
                                 temperature=args.temperature if args.temperature > 0 else None, top_p=args.top_p,
                                 top_k=0, max_new_tokens=max_new, pad_token_id=tok.pad_token_id, eos_token_id=stops,
                                 use_cache=True)
        return generated(out[:, ids.shape[1]:], stops)

    def engine(**kw):
        eng = Engine(model, tok, **kw)

        def f(max_new=t_new, seed=[args.seed]):
            seed[0] += 1
            s = Sampling(**{**settings, "max_new_tokens": max_new}, num_samples=args.num_samples, seed=seed[0],
                         stop_ids=tuple(stops))
            return eng.generate_ids(ids, mask, s).num_tokens
        return f

    variants = {"hf generate": hf, "engine": engine(), "engine, hf backend": engine(backend="hf")}
    if args.compile:
        variants["engine, compiled"] = engine(compile=True)
    for name, f in variants.items():  # warm-up (and compilation)
        t0 = time.perf_counter()
        f(max_new=t_new if "compiled" in name else 4)
        print(f"warm-up {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    runs: dict[str, list[float]] = {k: [] for k in variants}
    tokens: dict[str, list[int]] = {k: [] for k in variants}
    for r in range(repeats):
        for name, f in variants.items():
            t0 = time.perf_counter()
            n = f()
            dt = time.perf_counter() - t0
            runs[name].append(n / dt)
            tokens[name].append(n)
        print(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in runs.items()), flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    best = {k: max(v) for k, v in runs.items()}
    base, base_best = med["hf generate"], best["hf generate"]
    print(f"\ngeneration: model={args.model}{' (' + args.model_path + ')' if args.model_path else ''}, "
          f"batch {args.batch} ({n_prompts} prompts x K={args.num_samples}), prompt {ids.shape[1]} tokens "
          f"(left-padded), max_new_tokens {t_new}, temperature {args.temperature}, top_p {args.top_p}, "
          f"torch threads {torch.get_num_threads()}, device cpu, median of {repeats}")
    print(f"{'variant':22s} {'tokens/s':>10s} {'vs HF':>7s} {'best tok/s':>11s} {'vs HF':>7s} {'tokens/call':>12s}")
    for k in variants:
        print(f"{k:22s} {med[k]:10.0f} {med[k] / base:6.2f}x {best[k]:11.0f} {best[k] / base_best:6.2f}x "
              f"{statistics.mean(tokens[k]):12.0f}")
    print(f"\nengine / HF generate: {med['engine'] / base:.2f}x median, {best['engine'] / base_best:.2f}x best "
          f"(target >= 1.5 on CPU for model=tiny at batch 64)")
    out = {"tokens_per_s": med, "best_tokens_per_s": best, "runs": runs, "tokens_per_call": tokens,
           "engine_over_hf": med["engine"] / base, "engine_over_hf_best": best["engine"] / base_best,
           "args": vars(args), "max_new_tokens": t_new, "prompt_tokens": ids.shape[1],
           "threads": torch.get_num_threads()}
    path = Path(args.out or ROOT / f"bench/results/gen_{args.model}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
