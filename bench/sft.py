"""make bench-sft: packing efficiency and training tokens/s, measured in one run on the same data and model.

Compared, on the synthetic SFT data with model=tiny (override with --model-cfg / --seq-len):
  1. packing=isolated, packing=concat and a pad-to-longest baseline (packing=none), each training the same
     examples per optimizer step with a bare PyTorch loop: efficiency = non-pad tokens / all tokens,
     tokens/s = non-pad tokens per second of forward+backward+AdamW.
     Isolated rows run as the project runs them (attn_implementation sdpa -> sdpa_packed: per-document attention);
     "isolated, dense mask" runs the same batches through transformers' own sdpa (a (B, 1, T, T) block-diagonal
     mask over whole rows) to show what the per-document path buys.
  2. the Lightning path (SFTModule + Trainer, as `python -m llama2_lit` runs it) against the bare loop on the
     same packed batches: the framework's overhead.
Prints a table and ratios against the baselines; writes bench/results/sft.json.
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

import lightning as L  # noqa: E402
import torch  # noqa: E402

from data_modules.packing import pack  # noqa: E402
from data_modules.records import tokenize_chat  # noqa: E402
from data_modules.sft import collate_rows  # noqa: E402
from llama2_lit.world import oracle as world  # noqa: E402
from llama2_lit.core.losses import masked_lm_loss  # noqa: E402
from llama2_lit.models.loading import load_causal_lm  # noqa: E402
from llama2_lit.modules.sft import SFTModule  # noqa: E402


def batches_for(rows, batch_size, pad_id):
    return [collate_rows(rows[i:i + batch_size], pad_id) for i in range(0, len(rows) - batch_size + 1, batch_size)]


def non_pad(batch, pad_id):
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int((batch["input_ids"] != pad_id).sum())


def make_model(model_cfg, tok, seed=0, attn=None):
    torch.manual_seed(seed)
    model = load_causal_lm(model_cfg, tok)
    if attn:
        model.config._attn_implementation = attn  # every layer reads the shared config
    return model


def bare_loop(model, batches, pad_id, warmup):
    """Forward + backward + clip + AdamW step per batch; returns non-pad tokens/s over the timed steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    tokens, seconds = 0, 0.0
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        inputs = {k: b[k] for k in ("input_ids", "attention_mask", "position_ids") if k in b}
        loss = masked_lm_loss(model(**inputs, use_cache=False).logits, b["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if i >= warmup:
            tokens += non_pad(b, pad_id)
            seconds += dt
    return tokens / seconds


class _Timer(L.Callback):
    def __init__(self, pad_id, warmup):
        self.pad_id, self.warmup, self.tokens, self.seconds, self.t0 = pad_id, warmup, 0, 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.tokens += non_pad(batch, self.pad_id)
            self.seconds += time.perf_counter() - self.t0


def lightning_loop(model_cfg, tok, batches, pad_id, warmup):
    """The framework path: SFTModule + Trainer (logging on, as in a real run); same batches, same timing window."""
    torch.manual_seed(0)
    module = SFTModule(model_cfg, tokenizer=tok, lr=1e-3, weight_decay=0.1)
    timer = _Timer(pad_id, warmup)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=len(batches), max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=1.0, callbacks=[timer], num_sanity_val_steps=0, limit_val_batches=0)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    return timer.tokens / timer.seconds


def framework_only(args, model_cfg, tok, examples, n_steps):
    """Lightning vs a bare loop on the same packed batches (the smollm2 acceptance check)."""
    pad = tok.pad_token_id
    rows, stats = pack(examples, args.seq_len, pad, packing="isolated")
    batches = batches_for(rows, args.batch_rows, pad)[:n_steps]
    if len(batches) < n_steps:
        raise SystemExit(f"only {len(batches)} batches of {args.batch_rows}x{args.seq_len}; lower --steps")
    bare = bare_loop(make_model(model_cfg, tok), batches, pad, args.warmup)
    light = lightning_loop(model_cfg, tok, batches, pad, args.warmup)
    print(f"\nmodel={args.model} data={args.data}: {args.batch_rows}x{args.seq_len} packed rows/step "
          f"(efficiency {stats.efficiency:.4f}), {args.steps} timed steps, {torch.get_num_threads()} threads")
    print(f"bare PyTorch loop: {bare:.1f} tokens/s; Lightning SFTModule: {light:.1f} tokens/s; ratio {light / bare:.3f}x")
    out = {"bare_tokens_per_s": bare, "lightning_tokens_per_s": light, "ratio": light / bare, "args": vars(args)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=3000)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-rows", type=int, default=16, help="packed rows per step")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per variant (after warm-up)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="alternating repeats; the median is reported")
    ap.add_argument("--model", default="tiny", help="a conf/model option (its tokenizer too)")
    ap.add_argument("--data", default="synthetic", help="'synthetic' or an Alpaca JSONL file")
    ap.add_argument("--only-framework", action="store_true",
                    help="skip the packing comparison: Lightning vs bare loop only (for large models)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/sft.json"))
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's; use 1 on a machine shared with other jobs)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from llama2_lit.config import compose

    cfg = compose([f"model={args.model}", "paths.output_dir=/tmp"])
    tok = instantiate(cfg.model.tokenizer)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if args.data == "synthetic":
        convs = [(t.prompt, t.answer) for t in world.generate_tasks(args.examples, seed=0)]
    else:
        from data_modules.records import to_messages
        from data_modules.sources import iter_records

        convs = [tuple(m["content"] for m in to_messages(r, "alpaca", args.data, i)) for i, r in iter_records(args.data)]
    examples = [tokenize_chat([{"role": "user", "content": p}, {"role": "assistant", "content": a}], tok)
                for p, a in convs]
    pad = tok.pad_token_id
    n_steps = args.steps + args.warmup
    if args.only_framework:
        return framework_only(args, model_cfg, tok, examples, n_steps)
    n_steps = args.steps + args.warmup

    results, per_step_examples = {}, None
    data = {}
    for mode in ("isolated", "concat"):
        rows, stats = pack(examples, args.seq_len, pad, packing=mode)
        data[mode] = (batches_for(rows, args.batch_rows, pad)[:n_steps], stats)
        if mode == "isolated":
            per_step_examples = round(args.batch_rows * len(examples) / len(rows))
    # the baseline: the same examples per optimizer step, each padded to the longest in its batch
    rows, stats = pack(examples, args.seq_len, pad, packing="none")
    padded = batches_for(rows, per_step_examples, pad)[:n_steps]
    real = sum(non_pad(b, pad) for b in padded)
    total = sum(b["input_ids"].numel() for b in padded)
    stats.capacity, stats.tokens = total, real  # efficiency of padded batches, not of rows
    data["pad-to-longest"] = (padded, stats)

    dense = "isolated, dense mask"
    runs = {name: [] for name in list(data) + [dense, "lightning (isolated)"]}
    for _ in range(args.repeats):  # alternate variants so drift in machine load hits all of them alike
        for name, (batches, _) in data.items():
            runs[name].append(bare_loop(make_model(model_cfg, tok), batches, pad, args.warmup))
        runs[dense].append(bare_loop(make_model(model_cfg, tok, attn="sdpa"), data["isolated"][0], pad, args.warmup))
        runs["lightning (isolated)"].append(lightning_loop(model_cfg, tok, data["isolated"][0], pad, args.warmup))

    tps = {k: statistics.median(v) for k, v in runs.items()}
    base = tps["pad-to-longest"]
    print(f"\nSFT packing benchmark: model={args.model}, seq_len={args.seq_len}, "
          f"{args.batch_rows} packed rows/step (~{per_step_examples} examples/step), {args.steps} timed steps, "
          f"median of {args.repeats}, {torch.get_num_threads()} threads")
    print(f"{'layout':24s} {'efficiency':>10s} {'tokens/s':>10s} {'vs padded':>10s}")
    for name, (_, stats) in data.items():
        print(f"{name:24s} {stats.efficiency:10.4f} {tps[name]:10.0f} {tps[name] / base:9.2f}x")
    ratio = tps["lightning (isolated)"] / tps["isolated"]
    print(f"{dense:24s} {data['isolated'][1].efficiency:10.4f} {tps[dense]:10.0f} {tps[dense] / base:9.2f}x")
    print(f"{'lightning (isolated)':24s} {data['isolated'][1].efficiency:10.4f} {tps['lightning (isolated)']:10.0f} "
          f"{tps['lightning (isolated)'] / base:9.2f}x")
    print(f"\nLightning / bare loop on the same packed batches: {ratio:.3f}x (target >= 0.9)")
    print(f"packed isolated / padded: {tps['isolated'] / base:.2f}x (target >= 1.5); "
          f"efficiency isolated {data['isolated'][1].efficiency:.4f}, concat {data['concat'][1].efficiency:.4f} (target >= 0.99)")
    out = {"tokens_per_s": tps, "runs": runs, "efficiency": {k: v[1].efficiency for k, v in data.items()},
           "lightning_over_bare": ratio, "packed_over_padded": tps["isolated"] / base,
           "args": vars(args)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
