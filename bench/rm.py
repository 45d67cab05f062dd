"""Reward-model benchmarks.

    .venv/bin/python bench/rm.py                      # one forward + length grouping vs two forwards + pad-to-max
    .venv/bin/python bench/rm.py --model smollm2_135m --pairs 32 --max-length 384
    .venv/bin/python bench/rm.py bow-baseline         # bag-of-words Bradley-Terry on HH harmless (train -> dev)

Throughput: the same pairs (the first ``--pairs`` of HH harmless train, or synthetic world pairs) go through
four arms, forward + backward of the ranking loss (no optimizer step, identical in every arm), batch ``--batch-size``:

    A  one forward over cat([chosen, rejected]), length-grouped batches, dynamic padding   (what stage=rm does)
    B  two forwards (chosen, then rejected), random batches, each padded to max_length     (the baseline)
    C  one forward, random batches, pad to max_length              (what the single forward alone buys)
    D  two forwards, length-grouped batches, dynamic padding       (what grouping + dynamic padding alone buy)

and prints pairs/s, real and padded tokens per arm and the headline ratio A / B. The first batch of every
arm is a warm-up and not timed. One CPU thread by default (``--threads 0``: torch's default).
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_modules.pairwise import (LengthGroupedBatchSampler, collate_pairs, concat_pairs,  # noqa: E402
                                   encode_pairs)
from data_modules.preferences import read_pairs  # noqa: E402
from llama2_lit.core.losses import ranking_loss  # noqa: E402
from llama2_lit.models.loading import load_tokenizer  # noqa: E402
from llama2_lit.models.reward import load_reward_model, rewards  # noqa: E402

HH = ROOT.parent / "shared" / "data" / "preferences" / "hh_harmless"
SMOLLM2 = ROOT / "checkpoints" / "smollm2-135m-instruct"
TINY = {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 4, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}


# ---------------------------------------------------------------------------------------- throughput


def _pairs(args, tok):
    if args.data == "hh":
        pairs, _ = read_pairs(HH / "train.jsonl", fmt="hh", on_error="skip", default_is_safety=True)
    else:
        import random

        from data_modules.preferences import to_pair
        from data_modules.synthetic_pairs import make_pairs, sample_perturb
        from llama2_lit.world import oracle as world

        rng = random.Random(0)
        recs, _ = make_pairs(world.generate_tasks(args.pairs * 2, seed=0), lambda ts: sample_perturb(ts, rng), rng)
        pairs = [to_pair(r) for r in recs]
    enc, counts = encode_pairs(pairs[: args.pairs], tok, max_length=args.max_length, margin="small")
    return enc, counts


def _arm(model, rows, pad_id, batches, one_forward: bool, pad_to: int | None) -> dict:
    model.train()
    real = padded = 0
    seconds = 0.0
    for j, idx in enumerate(batches):
        batch = collate_pairs([rows[i] for i in idx], pad_id, pad_to=pad_to)
        t0 = time.perf_counter()
        if one_forward:
            ids, mask = concat_pairs(batch, pad_id)
            r = rewards(model, ids, mask)
            chosen, rejected = r[: len(idx)], r[len(idx):]
        else:
            chosen = rewards(model, batch["chosen_input_ids"], batch["chosen_attention_mask"])
            rejected = rewards(model, batch["rejected_input_ids"], batch["rejected_attention_mask"])
        ranking_loss(chosen, rejected, batch["margin"]).backward()
        model.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if j == 0:
            continue  # warm-up
        seconds += dt
        real += int(batch["attention_mask"].sum())
        padded += int(batch["attention_mask"].numel())
    n = sum(len(b) for b in batches[1:])
    return {"pairs": n, "seconds": seconds, "pairs_per_s": n / seconds, "real_tokens": real, "padded_tokens": padded}


def throughput(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.tokenizer == "auto":
        args.tokenizer = "smollm2" if (SMOLLM2 / "tokenizer.json").exists() else "world"
    if args.tokenizer == "smollm2":
        tok = load_tokenizer(kind="pretrained", path=str(SMOLLM2))
    else:
        tok = load_tokenizer(kind="world_bpe", vocab_size=512, cache_dir=str(ROOT / ".cache"))
    if args.data == "hh" and not (HH / "train.jsonl").exists():
        print(f"{HH} absent: using --data synthetic")
        args.data = "synthetic"
    if args.model == "tiny":
        model_cfg = {"path": None, "config": TINY}
    elif args.model == "smollm2_135m":
        model_cfg = {"path": str(SMOLLM2)}
    else:
        model_cfg = {"path": args.model}
    model = load_reward_model(model_cfg, tok, freeze_layers=args.freeze_layers)
    rows, counts = _pairs(args, tok)
    lengths = [r.length for r in rows]
    bs = args.batch_size
    grouped = list(LengthGroupedBatchSampler(lengths, bs, shuffle=True, mega_batch=args.mega_batch, seed=0))
    rand = list(LengthGroupedBatchSampler(lengths, bs, shuffle=True, seed=0, group_by_length=False))
    print(f"model={args.model} tokenizer={args.tokenizer} data={args.data} pairs={len(rows)} batch={bs} "
          f"max_length={args.max_length} threads={torch.get_num_threads()} "
          f"(truncated pairs: {counts['truncated_pairs']}; mean side length {sum(lengths) / len(lengths):.0f} tokens)")
    arms = {
        "A one forward, length-grouped, dynamic padding": (True, grouped, None),
        "B two forwards, random batches, pad to max_length": (False, rand, args.max_length),
        "C one forward, random batches, pad to max_length": (True, rand, args.max_length),
        "D two forwards, length-grouped, dynamic padding": (False, grouped, None),
    }
    res = {}
    for name, (one, batches, pad_to) in arms.items():
        if not args.all_arms and name[0] in "CD":
            continue
        res[name[0]] = r = _arm(model, rows, tok.pad_token_id, batches, one, pad_to)
        print(f"  {name:52s} {r['pairs_per_s']:8.2f} pairs/s   {r['seconds']:6.1f} s   "
              f"padding {1 - r['real_tokens'] / r['padded_tokens']:5.1%} of {r['padded_tokens']} tokens")
    ratio = res["A"]["pairs_per_s"] / res["B"]["pairs_per_s"]
    print(f"speed-up A / B: {ratio:.2f}x (target >= 1.3x)")
    if "C" in res:
        print(f"  one forward alone C / B: {res['C']['pairs_per_s'] / res['B']['pairs_per_s']:.2f}x; "
              f"grouping + dynamic padding alone D / B: {res['D']['pairs_per_s'] / res['B']['pairs_per_s']:.2f}x")
    return 0


# -------------------------------------------------------------------------------------- BoW baseline

_WORD = re.compile(r"[a-z0-9']+")


def _bow(texts, vocab) -> torch.Tensor:
    x = torch.zeros(len(texts), len(vocab))
    for i, t in enumerate(texts):
        for w, c in Counter(_WORD.findall(t.lower())).items():
            j = vocab.get(w)
            if j is not None:
                x[i, j] = c
    return x


def _fit(x: torch.Tensor, l2: float, steps: int = 200) -> torch.Tensor:
    """Bradley-Terry on feature differences: P(chosen > rejected) = σ(w · (x_c - x_r)); no bias (order-free)."""
    w = torch.zeros(x.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -torch.nn.functional.logsigmoid(x @ w).mean() + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def bow_baseline(args) -> int:
    train, _ = read_pairs(args.train, fmt="hh", on_error="skip")
    train = train[: args.limit] if args.limit else train
    dev, _ = read_pairs(args.dev, fmt="hh", on_error="skip")
    df = Counter(w for p in train for t in (p.chosen, p.rejected) for w in set(_WORD.findall(t.lower())))
    vocab = {w: i for i, w in enumerate(sorted(w for w, c in df.items() if c >= args.min_count))}

    def diff(pairs):
        return _bow([p.chosen for p in pairs], vocab) - _bow([p.rejected for p in pairs], vocab)

    xt, xd = diff(train), diff(dev)
    acc = lambda x, w: float(((x @ w) > 0).float().mean())  # noqa: E731
    folds = 5
    cv = {}
    for l2 in args.l2:
        hits = []
        for k in range(folds):
            held = torch.arange(len(xt)) % folds == k
            w = _fit(xt[~held], l2)
            hits.append(acc(xt[held], w))
        cv[l2] = sum(hits) / folds
    best = max(cv, key=cv.get)
    w = _fit(xt, best)
    print(f"bag-of-words Bradley-Terry: {len(train)} train pairs, {len(dev)} dev pairs, {len(vocab)} words "
          f"(in >= {args.min_count} train answers), features = count(chosen) - count(rejected)")
    print("  5-fold CV accuracy on train by L2: " + ", ".join(f"{k:g}: {v:.3f}" for k, v in cv.items()))
    print(f"  L2 {best:g}: train accuracy {acc(xt, w):.3f}, dev accuracy {acc(xd, w):.3f} (chance 0.5)")
    top = torch.argsort(w)
    words = sorted(vocab, key=vocab.get)
    print("  most 'chosen' words: " + ", ".join(words[i] for i in top[-12:].flip(0)))
    print("  most 'rejected' words: " + ", ".join(words[i] for i in top[:12]))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    b = sub.add_parser("bow-baseline", help="bag-of-words Bradley-Terry on HH harmless, train -> dev")
    b.add_argument("--train", default=str(HH / "train.jsonl"))
    b.add_argument("--dev", default=str(HH / "dev.jsonl"))
    b.add_argument("--limit", type=int, default=0, help="train on the first N pairs only (0: all), as data.limit")
    b.add_argument("--min-count", type=int, default=2)
    b.add_argument("--l2", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1, 1.0])
    for p in (ap,):
        p.add_argument("--model", default="tiny", help="tiny (random init), smollm2_135m, or a checkpoint folder")
        p.add_argument("--tokenizer", default="auto", choices=["auto", "smollm2", "world"],
                       help="auto: SmolLM2's when checkpoints/ has it (realistic lengths for HH), else the world BPE")
        p.add_argument("--data", default="hh", choices=["hh", "synthetic"])
        p.add_argument("--pairs", type=int, default=192)
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--max-length", type=int, default=512)
        p.add_argument("--mega-batch", type=int, default=50)
        p.add_argument("--freeze-layers", type=int, default=0)
        p.add_argument("--threads", type=int, default=1,
                       help="torch threads (0: torch default). 1 by default: on a shared 2-core machine two threads "
                            "ran up to 8x slower under contention, which swamps the comparison")
        p.add_argument("--all-arms", action=argparse.BooleanOptionalAction, default=True,
                       help="also run the two decomposition arms C and D")
    args = ap.parse_args(argv)
    return bow_baseline(args) if args.cmd == "bow-baseline" else throughput(args)


if __name__ == "__main__":
    sys.exit(main())
