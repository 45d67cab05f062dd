"""make bench-dpo: DPO pairs/s, the Lightning stage (DPOModule + Trainer) vs a plain PyTorch loop on the same batches.

    .venv/bin/python bench/dpo.py                              # tiny model (random init), synthetic world pairs
    .venv/bin/python bench/dpo.py --ref cached                 # later epochs: reference log-probs read from the cache
    .venv/bin/python bench/dpo.py --pairs-file pairs.jsonl     # pairs from a file (anything read_pairs reads)
    .venv/bin/python bench/dpo.py --model smollm2_135m --batch-size 8 --max-length 256   # after make fetch-smollm2

The same list of pair batches (the stage's LengthGroupedBatchSampler over encode_pairs/collate_pairs, dynamic padding;
synthetic world pairs with ``policy=perturb`` by default) trains the same model (same init seed, the reference a frozen
copy of the starting weights) with the same AdamW + cosine schedule (``adamw_cosine``: the dpo_tiny settings) and the
trainer's gradient clipping (1.0), one optimizer step per batch, in two arms:

    A  Lightning: DPOModule + lightning.Trainer (CPU, no logger, checkpointing, progress bar or validation;
       max_steps = the number of batches) fitted on a DataLoader over exactly those batches: what stage=dpo runs
    B  plain PyTorch: per batch the reference's answer log-probs, the policy forward over cat([chosen, rejected]),
       dpo_loss, backward, clip, AdamW step, scheduler step, zero_grad

The reference's work is the same in both arms. ``--ref compute`` (default, a first epoch: every pair is new): every
timed step runs the no-grad reference forward over all 2B rows (DPOModule: every pair misses its cache, is scored once
and stored; B: the same forward, no cache needed since no pair repeats). ``--ref cached`` (a later epoch): the
reference log-probs of every pair are computed before the timed run (not timed) and both arms read them (DPOModule:
its ``ref_cache``, filled through its own ``_ref_logps``; B: a list of per-batch tensors).

Timed: the steps after ``--warmup`` warm-up batches, each from on_train_batch_start to on_train_batch_end in A (as
bench/sft.py does) and the same work per batch in B; both arms run ``--repeats`` times in the order A B, B A, A B, ...
(drift in machine load and any first-or-second effect hit both alike) and the medians are reported. Prints pairs/s of
each arm, the ratio A / B (target >= 0.9), the max |loss difference| between the arms over every step (the same work
gives the same losses) and the max |weight difference| after the run. Also prints where A's extra time goes: the
cache-key building (DPOModule._keys) per step and Lightning's time between steps (outside the timed window). One CPU
thread by default (``--threads 0``: torch's default). Writes bench/results/dpo_<model>.json
(``--ref cached``: dpo_<model>_cached.json).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from data_modules.pairwise import LengthGroupedBatchSampler, collate_pairs, concat_pairs, encode_pairs  # noqa: E402
from data_modules.preferences import read_pairs  # noqa: E402
from llama2_lit.core.losses import dpo_loss  # noqa: E402
from llama2_lit.models.loading import load_causal_lm, load_tokenizer, model_dtype  # noqa: E402
from llama2_lit.modules.dpo import DPOModule, answer_logps  # noqa: E402
from llama2_lit.modules.optim import adamw_cosine  # noqa: E402

SMOLLM2 = ROOT / "checkpoints" / "smollm2-135m-instruct"
TINY = {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 4, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
CLIP = 1.0  # the trainer's gradient_clip_val (conf/trainer/default.yaml), which stage=dpo keeps


# ---------------------------------------------------------------------------------------------- data


def load_pairs(args, tok):
    """Encoded pairs (duplicates by token ids dropped: DPOModule's cache would score a repeat once, B twice)."""
    if args.pairs_file:
        pairs, _ = read_pairs(args.pairs_file, on_error="skip", default_is_safety=False)
    else:
        from data_modules.synthetic_pairs import build_synthetic_pairs

        files, _ = build_synthetic_pairs(tok, seed=0, cache_dir=str(ROOT / ".cache"), policy="perturb",
                                         num_train=args.prompts, num_val=16)
        pairs, _ = read_pairs(files["train"])
    enc, counts = encode_pairs(pairs, tok, max_length=args.max_length, margin="small")
    seen, rows = set(), []
    for e in enc:
        key = (tuple(e.chosen), tuple(e.rejected))
        if key not in seen:
            seen.add(key)
            rows.append(e)
    return rows, counts


def make_batches(rows, args, pad_id, n):
    """The stage's batches: length-grouped (mega-batches of 50), dynamic padding, the longest batch first."""
    sampler = LengthGroupedBatchSampler([r.length for r in rows], args.batch_size, shuffle=True, mega_batch=50, seed=0)
    idx = [b for b in sampler if len(b) == args.batch_size][:n]
    if len(idx) < n:
        raise SystemExit(f"only {len(idx)} full batches of {args.batch_size} pairs from {len(rows)} pairs; "
                         f"lower --steps or --batch-size, or raise --prompts")
    return [collate_pairs([rows[i] for i in b], pad_id) for b in idx]


def n_pairs(batch) -> int:
    return int(batch["chosen_input_ids"].shape[0])


def module_kwargs(args) -> dict:
    """DPOModule's settings (conf/stage/dpo.yaml + conf/scale/dpo_tiny.yaml); B uses the same."""
    return dict(beta=args.beta, loss_type="sigmoid", use_margin=False, average_logps=False, lr=args.lr,
                weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8, warmup_steps=0, warmup_ratio=0.1, min_lr_ratio=0.0,
                kl_prompts=0)


# ---------------------------------------------------------------------------------------------- arm B


def plain_loop(model_cfg, tok, batches, args, ref_cache=None) -> dict:
    """B: the same model (same seed), reference, optimizer, schedule and clipping as DPOModule, in a bare loop."""
    kw = module_kwargs(args)
    torch.manual_seed(args.seed)
    model = load_causal_lm(model_cfg, tok)
    ref = copy.deepcopy(model).eval().requires_grad_(False).to(model_dtype(model_cfg, trainable=False))
    cfg = adamw_cosine(model, len(batches), lr=kw["lr"], weight_decay=kw["weight_decay"], betas=kw["betas"],
                       eps=kw["eps"], warmup_steps=kw["warmup_steps"], warmup_ratio=kw["warmup_ratio"],
                       min_lr_ratio=kw["min_lr_ratio"])
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    pad = tok.pad_token_id
    model.train()
    pairs, seconds, losses = 0, 0.0, []
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        ids, mask = concat_pairs(b, pad)
        amask = torch.cat([b["chosen_answer_mask"], b["rejected_answer_mask"]])
        n = n_pairs(b)
        if ref_cache is not None:
            rc, rr = ref_cache[i]
        else:
            with torch.no_grad():
                lr_ = answer_logps(ref, ids, mask, amask)
            rc, rr = lr_[:n], lr_[n:]
        lp = answer_logps(model, ids, mask, amask)
        loss, _, _ = dpo_loss(lp[:n], lp[n:], rc, rr, beta=kw["beta"], loss_type=kw["loss_type"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        losses.append(float(loss.detach()))
        if i >= args.warmup:
            pairs += n
            seconds += dt
    return {"pairs": pairs, "seconds": seconds, "pairs_per_s": pairs / seconds, "losses": losses, "model": model}


def reference_cache(model_cfg, tok, batches, args) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``--ref cached``: B's per-batch reference log-probs, from the same starting weights (not timed)."""
    torch.manual_seed(args.seed)
    ref = load_causal_lm(model_cfg, tok).eval().requires_grad_(False)
    out = []
    with torch.no_grad():
        for b in batches:
            ids, mask = concat_pairs(b, tok.pad_token_id)
            lp = answer_logps(ref, ids, mask, torch.cat([b["chosen_answer_mask"], b["rejected_answer_mask"]]))
            out.append((lp[:n_pairs(b)], lp[n_pairs(b):]))
    return out


# ---------------------------------------------------------------------------------------------- arm A


class _Timer(L.Callback):
    """Times on_train_batch_start -> on_train_batch_end after the warm-up (as bench/sft.py), records each step's loss
    and the gap from one step's end to the next one's start (the loop's own time, outside the timed window)."""

    def __init__(self, warmup):
        self.warmup, self.pairs, self.seconds, self.t0 = warmup, 0, 0.0, 0.0
        self.losses, self.gaps, self.t_end = [], [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.t0 = time.perf_counter()
        if self.t_end is not None and batch_idx > self.warmup:
            self.gaps.append(self.t0 - self.t_end)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        t1 = time.perf_counter()
        if batch_idx >= self.warmup:
            self.pairs += n_pairs(batch)
            self.seconds += t1 - self.t0
        self.losses.append(float(outputs["loss"]))
        self.t_end = time.perf_counter()


def lightning_loop(model_cfg, tok, batches, args, cached: bool) -> dict:
    """A: DPOModule + Trainer, as stage=dpo runs it (logging on); the same batches and timing window."""
    torch.manual_seed(args.seed)
    module = DPOModule(model_cfg, tokenizer=tok, **module_kwargs(args))
    if cached:  # a later epoch: every pair's reference log-probs already in the module's cache (not timed)
        for b in batches:
            module._ref_logps(b, module._keys(b))
    scored_before = module.ref_forwards
    timer = _Timer(args.warmup)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=len(batches), max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=CLIP, callbacks=[timer], num_sanity_val_steps=0, limit_val_batches=0)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    if trainer.global_step != len(batches):
        raise SystemExit(f"Lightning ran {trainer.global_step} optimizer steps, expected {len(batches)}")
    return {"pairs": timer.pairs, "seconds": timer.seconds, "pairs_per_s": timer.pairs / timer.seconds,
            "losses": timer.losses, "model": module.model, "gap_s": statistics.mean(timer.gaps) if timer.gaps else 0.0,
            "ref_pairs_scored_in_fit": module.ref_forwards - scored_before}


def keys_cost(batches, warmup) -> float:
    """Mean seconds per timed step of DPOModule._keys (the cache keys: each row's ids as a tuple)."""
    t0 = time.perf_counter()
    for b in batches[warmup:]:
        DPOModule._keys(b)
    return (time.perf_counter() - t0) / max(1, len(batches) - warmup)


def max_weight_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    with torch.no_grad():
        return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


# ---------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", choices=["tiny", "smollm2_135m"],
                    help="tiny: random init, the world BPE; smollm2_135m: checkpoints/smollm2-135m-instruct")
    ap.add_argument("--pairs-file", default=None, help="a pair file (default: synthetic world pairs, policy=perturb)")
    ap.add_argument("--prompts", type=int, default=1600, help="world prompts for the synthetic pairs")
    ap.add_argument("--batch-size", type=int, default=32, help="pairs per step (conf/scale/dpo_tiny.yaml)")
    ap.add_argument("--max-length", type=int, default=128, help="tokens per side (dpo_tiny seq_len)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per arm (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up batches per arm, not timed")
    ap.add_argument("--repeats", type=int, default=6,
                    help="repeats of both arms, in the order A B, then B A, ...; medians reported")
    ap.add_argument("--ref", default="compute", choices=["compute", "cached"],
                    help="compute: every step runs the reference (a first epoch); cached: both arms read it")
    ap.add_argument("--lr", type=float, default=1e-5, help="conf/scale/dpo_tiny.yaml")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0, help="the init seed of both arms' model")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch default). 1 by default: the machine is shared with other jobs")
    ap.add_argument("--out", default=None, help="default: bench/results/dpo_<model>[_cached].json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.model == "smollm2_135m":
        if not (SMOLLM2 / "config.json").exists():
            print(f"bench-dpo: skipping smollm2_135m: {SMOLLM2}/config.json absent (run make fetch-smollm2 first)")
            return 0
        tok = load_tokenizer(kind="pretrained", path=str(SMOLLM2))
        model_cfg = {"path": str(SMOLLM2), "dtype": "float32", "attn_implementation": "sdpa"}
    else:
        tok = load_tokenizer(kind="world_bpe", vocab_size=512, cache_dir=str(ROOT / ".cache"))
        model_cfg = {"path": None, "config": TINY, "dtype": "float32", "attn_implementation": "sdpa"}
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):  # "GPU available: False" etc., once per fit
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*validation_step.*but have no .val_dataloader.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")

    rows, counts = load_pairs(args, tok)
    batches = make_batches(rows, args, tok.pad_token_id, args.warmup + args.steps)
    cached = args.ref == "cached"
    b_cache = reference_cache(model_cfg, tok, batches, args) if cached else None
    timed = batches[args.warmup:]
    real = sum(int(b["attention_mask"].sum()) for b in timed)
    padded = sum(int(b["attention_mask"].numel()) for b in timed)
    answer = sum(int(b["chosen_answer_mask"].sum() + b["rejected_answer_mask"].sum()) for b in timed)
    print(f"model={args.model} data={args.pairs_file or 'synthetic (perturb)'} pairs={len(rows)} "
          f"batch={args.batch_size} pairs ({2 * args.batch_size} rows/forward) max_length={args.max_length} "
          f"ref={args.ref} threads={torch.get_num_threads()} (truncated pairs: {counts['truncated_pairs']})")
    print(f"timed per arm: {len(timed)} batches = {sum(n_pairs(b) for b in timed)} pairs after {args.warmup} warm-up "
          f"batches; {real} real tokens of {padded} ({1 - real / padded:.1%} padding), {answer} answer tokens; "
          f"median of {args.repeats}")

    runs = {"lightning": [], "plain": []}
    loss_diff, weight_diff, ref_scored, gaps = 0.0, 0.0, [], []
    first = None
    for rep in range(args.repeats):  # alternate the arms, A B then B A, so drift in machine load hits both alike
        if rep % 2 == 0:
            a = lightning_loop(model_cfg, tok, batches, args, cached)
            b = plain_loop(model_cfg, tok, batches, args, b_cache)
        else:
            b = plain_loop(model_cfg, tok, batches, args, b_cache)
            a = lightning_loop(model_cfg, tok, batches, args, cached)
        runs["lightning"].append(a["pairs_per_s"])
        runs["plain"].append(b["pairs_per_s"])
        loss_diff = max(loss_diff, max(abs(x - y) for x, y in zip(a["losses"], b["losses"])))
        weight_diff = max(weight_diff, max_weight_diff(a["model"], b["model"]))
        ref_scored.append(a["ref_pairs_scored_in_fit"])
        gaps.append(a["gap_s"])
        first = first or (a["losses"], b["losses"])
        print(f"  repeat {rep + 1} ({'A B' if rep % 2 == 0 else 'B A'}): Lightning {a['pairs_per_s']:7.2f} pairs/s "
              f"({a['seconds']:.2f} s), plain {b['pairs_per_s']:7.2f} pairs/s ({b['seconds']:.2f} s), "
              f"ratio {a['pairs_per_s'] / b['pairs_per_s']:.3f}")
    pps = {k: statistics.median(v) for k, v in runs.items()}
    ratio = pps["lightning"] / pps["plain"]
    keys_s = keys_cost(batches, args.warmup)
    step_s = {k: sum(n_pairs(b) for b in timed) / v / len(timed) for k, v in pps.items()}
    expected_scored = 0 if cached else sum(n_pairs(bt) for bt in batches)

    print(f"\n{'arm':44s} {'pairs/s':>9s} {'s/step':>8s}")
    print(f"{'A Lightning (DPOModule + Trainer)':44s} {pps['lightning']:9.2f} {step_s['lightning']:8.3f}")
    print(f"{'B plain PyTorch loop':44s} {pps['plain']:9.2f} {step_s['plain']:8.3f}")
    per_repeat = statistics.median(x / y for x, y in zip(runs["lightning"], runs["plain"]))
    print(f"\nLightning / plain loop on the same pair batches: {ratio:.3f}x (target >= 0.9); "
          f"median of the per-repeat ratios {per_repeat:.3f}x")
    w = args.warmup
    print(f"same work: max |loss A - loss B| over all {len(batches)} steps x {args.repeats} repeats = {loss_diff:.3g} "
          f"(first timed losses A {first[0][w]:.6f} / B {first[1][w]:.6f}, last A {first[0][-1]:.6f} / "
          f"B {first[1][-1]:.6f}); max |weight A - weight B| after the run = {weight_diff:.3g}")
    print(f"reference: pairs DPOModule scored during fit {ref_scored[0]} (expected {expected_scored}: "
          f"{'every pair once' if not cached else 'none, all cached'})")
    print(f"A's overhead: DPOModule._keys {keys_s * 1e3:.2f} ms/step "
          f"({keys_s / step_s['plain']:.1%} of B's step); between steps (outside the timed window) "
          f"{statistics.median(gaps) * 1e3:.2f} ms/step")
    out = {"pairs_per_s": pps, "runs": runs, "lightning_over_plain": ratio,
           "median_repeat_ratio": per_repeat, "seconds_per_step": step_s,
           "max_loss_diff": loss_diff, "max_weight_diff": weight_diff, "ref_pairs_scored_in_fit": ref_scored,
           "keys_ms_per_step": keys_s * 1e3, "between_steps_ms": statistics.median(gaps) * 1e3,
           "timed_batches": len(timed), "timed_pairs": sum(n_pairs(b) for b in timed), "real_tokens": real,
           "padded_tokens": padded, "pairs_available": len(rows), "threads": torch.get_num_threads(),
           "args": vars(args)}
    path = Path(args.out or ROOT / "bench" / "results" / f"dpo_{args.model}{'_cached' if cached else ''}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
