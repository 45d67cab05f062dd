"""make bench-gpu: the project's training, scoring and generation paths against plain PyTorch + HF on one GPU.

One command, at most ~5 minutes on one H100/H200, on a random-init ~1.1B Llama (the TinyLlama-1.1B shape:
hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV heads, vocab 32000; fp32 master weights, bf16 compute
through Lightning's ``bf16-mixed`` / ``torch.autocast``). Sections, each written to the JSON as it completes (a run
cut short still leaves the finished ones), in this order:

  sft       tokens/s and MFU of ``SFTModule`` under a Lightning ``Trainer`` against a plain loop over the same
            ``LlamaForCausalLM`` (stock ``sdpa``, ``torch.autocast`` bf16, fp32 AdamW, clip 1.0), same random batches
            (B, seq) with labels = input ids. Target: Lightning / plain >= 1.0x (anchor: plain HF 34.6% MFU, H100).
  rm        pairs/s (and tokens/s, MFU) of ``RewardModule`` against the same plain loop over a
            ``LlamaForSequenceClassification`` (num_labels 1; one forward over cat(chosen, rejected), -log sigmoid).
  generate  generated tokens/s of ``Engine`` (llama backend, bf16 weights) against HF ``generate`` (same bf16 model,
            sampling at temperature 1, top-p 1, no top-k, KV cache) at two batch sizes (64 and 256), 128-token
            prompts + 256 new tokens; EOS is ignored on both sides (every row generates the full length).
            Target: engine >= 5x (anchors: HF generate 995 tokens/s at b64, 4,096 at b256, H100).
  ppo       one PPO iteration's generation / scoring / training split through ``PPOModule`` under a Lightning
            ``Trainer`` (fp32 policy and critic, frozen reference and two reward models in bf16, ``ppo.frozen_dtype``),
            as bench/ppo.py drives it: the module's ``history`` gives ``time/{generation,scoring,training}_s``; the
            first iteration is a warm-up. If it fails under the requested precision it is retried under ``32-true``
            (``--no-ppo-fallback`` to stop that) and the failure is recorded in ``failed_attempts``.
  memory    torch.cuda.max_memory_allocated of each phase (sft, rm, generate at the larger batch, ppo) against the
            memory planner (``llama2_lit.plan.plan_memory`` with the same shape, batch, precision, 1 GPU, no
            activation checkpointing) with the planner's CUDA-context allowance set to 0 (max_memory_allocated does
            not see the context): ratio measured / planned, target 0.8-1.2.
  generate_compiled
            the engine with ``compile=True`` (torch.compile, CUDA graphs via ``mode="reduce-overhead"``) at both batch
            sizes; it has never run on a GPU, so any failure is caught and recorded (``error``) rather than raised.
            Run last, because a failed CUDA graph can leave the device unusable for what follows.

MFU = flops_per_token * tokens/s / peak, flops_per_token = 6 * N + 12 * L * h * S (PaLM appendix B; the attention
term counts the full S x S score matrix, causal masking not discounted), N = parameters that do matmuls (all but the
input embedding: the LM head counts, the lookup does not), L layers, h hidden size, S the row length. Peak: dense
bf16 of the device found by ``torch.cuda.get_device_name`` (H100/H200 SXM 989 TFLOP/s, H100/H200 NVL 835, H100 PCIe
756, A100 312, ...); an unknown device (and the CPU of ``--tiny``) gets a measured matmul rate instead, flagged in
``peak_flops_source``; ``--peak-tflops`` overrides.

    python bench/gpu.py                  # the GPU run: writes bench/results/gpu.json (refuses to run without CUDA)
    python bench/gpu.py --tiny           # CPU smoke run of every section (a 2-layer model, seconds per section),
                                         # written to a temp file, never to bench/results/gpu.json (tests run it)

Imports: torch, transformers, lightning, tokenizers, PyYAML and the project; not hydra, omegaconf or datasets, which
the device machine lacks: nothing needs to be carried (docs/benchmarks-gpu.md has the whole ``run`` command). Budget: ``--budget-s`` (default 280 on GPU) is split over
the sections; each section's timed loop stops early when its share is spent (at least one timed step), and the
compiled engine is skipped when less than 45 s is left (its second batch below 30 s).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "gpu.json"
GIB = 1024 ** 3

# the TinyLlama-1.1B shape (random init) and the --tiny smoke shape
SHAPE_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False)
SHAPE_TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)

# dense bf16 tensor-core peaks (FLOP/s), by a substring of torch.cuda.get_device_name; first match wins
GPU_PEAKS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("GH200", 989e12),
             ("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("A100", 312e12), ("A800", 312e12),
             ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12)]
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
PHASES = ("sft", "rm", "generate", "ppo")


@dataclass
class Settings:
    name: str
    dims: dict
    vocab: int
    seq_len: int
    sft_batch: int
    rm_pairs: int
    warmup: int
    steps: int
    gen_batches: tuple[int, ...]
    prompt_tokens: int
    new_tokens: int
    ppo_prompts: int
    ppo_mini_batch: int
    ppo_new_tokens: int
    ppo_iterations: int          # timed, after one warm-up iteration
    budget_s: float
    shares: dict = field(default_factory=dict)  # section -> share of the budget


# sft: 4 x 2048 tokens a step (fp32 states ~17.6 GB + activations ~20 GB: fits an 80 GB H100 with room; --sft-batch 8
# on an H200); rm: 2 pairs = 4 rows of 2048, the same tokens a step. Shares: of the time left when a section starts
# (what one section does not use flows to the next); the compiled engine's first calls (compile + capture) are long.
GPU = Settings(name="1.1b", dims=SHAPE_1B, vocab=32000, seq_len=2048, sft_batch=4, rm_pairs=2, warmup=2, steps=10,
               gen_batches=(64, 256), prompt_tokens=128, new_tokens=256, ppo_prompts=64, ppo_mini_batch=16,
               ppo_new_tokens=256, ppo_iterations=2, budget_s=280.0,
               shares=dict(sft=0.12, rm=0.10, generate=0.25, ppo=0.20, generate_compiled=0.33))
TINY = Settings(name="tiny", dims=SHAPE_TINY, vocab=512, seq_len=64, sft_batch=2, rm_pairs=2, warmup=1, steps=2,
                gen_batches=(4, 8), prompt_tokens=16, new_tokens=16, ppo_prompts=4, ppo_mini_batch=2,
                ppo_new_tokens=8, ppo_iterations=1, budget_s=150.0,
                shares=dict(sft=0.2, rm=0.2, generate=0.2, ppo=0.3, generate_compiled=0.1))


# ---------------------------------------------------------------------------------------------- helpers


def build_tokenizer(vocab: int):
    """A word-level tokenizer of exactly ``vocab`` entries (``w0``, ``w1``, ...), real pad/bos/eos tokens and the
    world's chat template: text round-trips token for token, so prompts of an exact length are easy to write."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from llama2_lit.world.tokenizer import TINY_CHAT_TEMPLATE

    table = {s: i for i, s in enumerate(SPECIAL)}
    for i in range(vocab - len(SPECIAL)):
        table[f"w{i}"] = len(table)
    tk = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=SPECIAL[4:])
    tok.chat_template = TINY_CHAT_TEMPLATE
    tok.padding_side = "right"
    assert len(tok) == vocab
    return tok


def model_cfg(s: Settings, dtype: str = "float32") -> dict:
    """The ``model`` config node (as conf/model/*.yaml spells it) for random init of the benchmark shape."""
    return {"name": f"bench_{s.name}", "path": None, "config": dict(s.dims, vocab_size=s.vocab), "dtype": dtype,
            "attn_implementation": "sdpa", "gradient_checkpointing": False, "init": "default",
            "lora": {"enabled": False}}


def hf_config(s: Settings, tok, **extra):
    from llama2_lit.models.loading import llama_config

    cfg = llama_config(tok, s.dims)
    cfg._attn_implementation = "sdpa"  # transformers' own sdpa: the plain baseline
    for k, v in extra.items():
        setattr(cfg, k, v)
    return cfg


def random_ids(shape, vocab: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(len(SPECIAL), vocab, shape, generator=gen)  # no pad/eos/role token inside the rows


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in matmuls: all but the input embedding (a lookup)."""
    emb = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters() if p is not emb)


def flops_per_token(n_matmul: int, s: Settings, seq: int) -> float:
    return 6.0 * n_matmul + 12.0 * s.dims["num_hidden_layers"] * s.dims["hidden_size"] * seq


class Clock:
    """Wall time with the device drained first (CUDA work is asynchronous)."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


def release(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device, base: int = 0) -> float | None:
    """Peak allocated GiB since the last reset, less ``base`` (what was allocated before the phase); None on CPU."""
    if device.type != "cuda":
        return None
    return (torch.cuda.max_memory_allocated(device) - base) / GIB


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def measured_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Achieved matmul FLOP/s (best of a few): a stand-in peak where no vendor figure is known."""
    n = 4096 if device.type == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    clock, best = Clock(device), 0.0
    for _ in range(4):
        t0 = clock.now()
        for _ in range(5):
            a @ b
        best = max(best, 5 * 2 * n ** 3 / (clock.now() - t0))
    return best


def peak_flops(device: torch.device, override_tflops: float | None, compute_dtype: torch.dtype) -> tuple[float, str]:
    if override_tflops:
        return override_tflops * 1e12, f"--peak-tflops {override_tflops}"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, val in GPU_PEAKS:
            if key in name:
                return val, f"dense bf16 peak of {key} (matched in '{name}')"
        return measured_peak_flops(device, torch.bfloat16), f"measured bf16 matmul rate on '{name}' (no vendor figure)"
    return (measured_peak_flops(device, compute_dtype),
            f"measured {str(compute_dtype).replace('torch.', '')} matmul rate on the CPU (not a vendor peak)")


def atomic_write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def resolve_out(out: str | None, tiny: bool) -> Path:
    """The output file: ``--out``, else bench/results/gpu.json, or a temp file for ``--tiny`` (whose CPU figures must
    never land in bench/results/gpu.json: asking for it with ``--tiny`` is an error)."""
    if out:
        path = Path(out).expanduser().resolve()
    elif tiny:
        path = Path(tempfile.gettempdir()) / f"llama2_lit_bench_gpu_tiny_{os.getpid()}.json"
    else:
        path = DEFAULT_OUT
    if tiny and path == DEFAULT_OUT.resolve():
        raise SystemExit(f"--tiny writes CPU smoke figures: refusing to write them to {DEFAULT_OUT}")
    return path


def lightning_trainer(device: torch.device, precision: str, max_steps: int, callbacks, clip: float | None = 1.0):
    """``max_steps=-1``: one epoch over the loader (PPO: manual optimization counts every AdamW step as a step)."""
    import lightning as L

    return L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision,
                     max_steps=max_steps, max_epochs=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=clip,
                     num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks)


def window_timer(warmup: int, deadline: float, clock: Clock):
    """A Lightning callback timing the steps after ``warmup`` (device drained at both ends of the window);
    it stops the fit once ``deadline`` (perf_counter) has passed, after at least one timed step."""
    import lightning as L

    class WindowTimer(L.Callback):
        def __init__(self):
            self.t0 = self.t1 = None
            self.steps = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == warmup:
                self.t0 = clock.now()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx < warmup:
                return
            self.steps += 1
            last = trainer.global_step >= trainer.max_steps
            if last or time.perf_counter() > deadline:
                self.t1 = clock.now()
                trainer.should_stop = True

        def finish(self):
            if self.t0 is None or self.steps == 0:
                raise RuntimeError(f"no timed step ran (warm-up {warmup} steps)")
            if self.t1 is None:
                self.t1 = clock.now()

        @property
        def seconds(self) -> float:
            return self.t1 - self.t0

    return WindowTimer()


def loader(items):
    return torch.utils.data.DataLoader(items, batch_size=None, shuffle=False)


# --------------------------------------------------------------------------------------------- sections


class Bench:
    def __init__(self, args, s: Settings, device: torch.device, out: Path):
        self.args, self.s, self.device, self.out = args, s, device, out
        self.clock = Clock(device)
        self.precision = args.precision
        self.compute_dtype = torch.bfloat16 if self.precision.startswith("bf16") else torch.float32
        self.t_start = time.perf_counter()
        self.deadline = self.t_start + s.budget_s
        self.tok = build_tokenizer(s.vocab)
        self.section_deadline = self.deadline
        self.peaks: dict[str, dict] = {}
        self.hf_rates: dict[int, float] = {}
        self.peak, self.peak_source = peak_flops(device, args.peak_tflops, self.compute_dtype)
        cuda = device.type == "cuda"
        cpu_name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)"
        self.result = {
            "device": torch.cuda.get_device_name(device) if cuda else cpu_name,
            "device_type": device.type,
            "tiny": bool(args.tiny),
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "lightning": _version("lightning"),
            "cuda": torch.version.cuda if cuda else None,
            "gpu_memory_gib": torch.cuda.get_device_properties(device).total_memory / GIB if cuda else None,
            "python": platform.python_version(),
            "precision": self.precision,
            "peak_flops": self.peak,
            "peak_flops_source": self.peak_source,
            "mfu_formula": "MFU = (6*N + 12*L*h*S) * tokens/s / peak; N = parameters in matmuls (all but the input "
                           "embedding), L layers, h hidden, S row length (attention not discounted for causality)",
            "settings": {"shape": s.name, "dims": dict(s.dims), "vocab": s.vocab, "seq_len": s.seq_len,
                         "sft_batch": s.sft_batch, "rm_pairs": s.rm_pairs, "warmup_steps": s.warmup,
                         "max_timed_steps": s.steps, "gen_batches": list(s.gen_batches),
                         "prompt_tokens": s.prompt_tokens, "new_tokens": s.new_tokens, "ppo_prompts": s.ppo_prompts,
                         "ppo_mini_batch": s.ppo_mini_batch, "ppo_new_tokens": s.ppo_new_tokens,
                         "ppo_timed_iterations": s.ppo_iterations, "budget_s": s.budget_s,
                         "torch_threads": torch.get_num_threads(), "compile": bool(self.want_compile()),
                         "float32_matmul_precision": torch.get_float32_matmul_precision()},
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "elapsed_s": 0.0,
            "complete": False,
            "sections": {},
            "errors": {},
            "tracebacks": {},
        }
        self.write()

    # -- bookkeeping ------------------------------------------------------------------------------------
    def want_compile(self) -> bool:
        return self.args.compile if self.args.compile is not None else self.device.type == "cuda"

    def write(self):
        self.result["elapsed_s"] = round(time.perf_counter() - self.t_start, 2)
        atomic_write(self.out, self.result)

    def log(self, msg: str):
        print(f"[{time.perf_counter() - self.t_start:6.1f}s] {msg}", flush=True)

    def run(self, name: str, fn):
        left = self.deadline - time.perf_counter()
        shares = {k: v for k, v in self.s.shares.items() if k not in self.result["sections"]
                  and k not in self.result["errors"]}
        share = self.s.shares.get(name, 0.1) / max(1e-9, sum(shares.values()))
        self.section_deadline = time.perf_counter() + max(0.0, left) * share
        self.log(f"--- {name} (budget {max(0.0, left) * share:.0f} s)")
        release(self.device)
        try:
            self.result["sections"][name] = fn()
        except Exception as e:  # a section that fails is recorded; the others still run
            self.result["errors"][name] = f"{type(e).__name__}: {e}"
            self.result["tracebacks"][name] = traceback.format_exc()[-4000:]
            self.log(f"{name} FAILED: {type(e).__name__}: {e}")
        finally:
            release(self.device)
            self.write()

    def target(self, text: str) -> str:
        """`` (text)`` on CUDA; nothing on CPU, whose toy figures are not to be read against GPU targets."""
        return f" ({text})" if self.device.type == "cuda" else ""

    def mfu(self, tokens_per_s: float, fpt: float) -> float:
        return fpt * tokens_per_s / self.peak

    # -- sft --------------------------------------------------------------------------------------------
    def lightning_loop(self, build, batches, units_per_step: float, budget_s: float):
        """Train the module ``build()`` makes (on the device, seed 0) over ``batches`` with a Lightning Trainer;
        ``(units per second in the timed window, timed steps, peak GiB, FLOPs per token)``."""
        s, dev = self.s, self.device
        base = allocated(dev)
        torch.manual_seed(0)
        with torch.device(dev):
            module = build()
        fpt = flops_per_token(matmul_params(module.model), s, s.seq_len)
        timer = window_timer(s.warmup, time.perf_counter() + budget_s, self.clock)
        trainer = lightning_trainer(dev, self.precision, len(batches), [timer])
        trainer.fit(module, train_dataloaders=loader(batches))
        timer.finish()
        out = (timer.steps * units_per_step / timer.seconds, timer.steps, peak_gib(dev, base), fpt)
        del module, trainer, timer
        release(dev)
        return out

    def sft(self) -> dict:
        from llama2_lit.modules.sft import SFTModule

        s, dev, tok = self.s, self.device, self.tok
        gen = torch.Generator().manual_seed(0)
        n = s.warmup + s.steps
        batches = []
        for _ in range(n):
            ids = random_ids((s.sft_batch, s.seq_len), s.vocab, gen)
            batches.append({"input_ids": ids, "labels": ids.clone()})
        tokens_per_step = s.sft_batch * s.seq_len
        half = (self.section_deadline - time.perf_counter()) / 2

        # the project's path: SFTModule (fp32 masters) under a Lightning Trainer with the requested precision
        light, light_steps, light_peak, fpt = self.lightning_loop(
            lambda: SFTModule(model_cfg(s, "float32"), tokenizer=tok, lr=2e-5, weight_decay=0.1), batches,
            tokens_per_step, half)
        self.log(f"sft lightning: {light:,.0f} tokens/s over {light_steps} steps")

        # the plain baseline: the same LlamaForCausalLM, autocast, fp32 AdamW, same batches
        from transformers import LlamaForCausalLM

        base = allocated(dev)
        torch.manual_seed(0)
        with torch.device(dev):
            model = LlamaForCausalLM(hf_config(s, tok)).float().train()
        plain, plain_steps = self.plain_loop(model, batches, self._lm_loss, tokens_per_step,
                                             time.perf_counter() + half)
        plain_peak = peak_gib(dev, base)
        self.log(f"sft plain: {plain:,.0f} tokens/s over {plain_steps} steps")
        del model
        self.peaks["sft"] = {"measured": light_peak, "plain": plain_peak}
        res = {"lightning_tokens_per_s": light, "plain_tokens_per_s": plain, "ratio": light / plain,
               "lightning_mfu": self.mfu(light, fpt), "plain_mfu": self.mfu(plain, fpt), "flops_per_token": fpt,
               "tokens_per_step": tokens_per_step, "timed_steps_lightning": light_steps,
               "timed_steps_plain": plain_steps, "peak_allocated_gib": {"lightning": light_peak, "plain": plain_peak}}
        print(f"SFT  {s.sft_batch}x{s.seq_len}: Lightning SFTModule {light:,.0f} tokens/s "
              f"(MFU {res['lightning_mfu']:.1%}) | plain HF loop {plain:,.0f} tokens/s (MFU {res['plain_mfu']:.1%}) | "
              f"ratio {res['ratio']:.3f}x" + self.target("target >= 1.0; anchor plain HF 34.6% MFU on H100"),
              flush=True)
        return res

    def _lm_loss(self, model, b):
        return model(input_ids=b["input_ids"], labels=b["labels"], use_cache=False).loss

    def _rm_loss(self, model, b):
        ids = torch.cat([b["chosen_input_ids"], b["rejected_input_ids"]])
        mask = torch.cat([b["chosen_attention_mask"], b["rejected_attention_mask"]])
        r = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, 0].float()
        k = b["chosen_input_ids"].shape[0]
        return -torch.nn.functional.logsigmoid(r[:k] - r[k:]).mean()

    def plain_loop(self, model, batches, loss_fn, units_per_step: int, deadline: float) -> tuple[float, int]:
        """Forward (autocast) + backward + clip 1.0 + fp32 AdamW per batch; units/s over the steps after warm-up."""
        dev, s = self.device, self.s
        opt = torch.optim.AdamW(model.parameters(), lr=2e-5, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)
        amp = self.compute_dtype != torch.float32
        t0, steps = None, 0
        for i, b in enumerate(batches):
            if i == s.warmup:
                t0 = self.clock.now()
            b = {k: v.to(dev, non_blocking=True) for k, v in b.items()}
            with torch.autocast(dev.type, dtype=self.compute_dtype, enabled=amp):
                loss = loss_fn(model, b)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= s.warmup:
                steps += 1
                if time.perf_counter() > deadline:
                    break
        seconds = self.clock.now() - t0
        del opt
        return steps * units_per_step / seconds, steps

    # -- rm ---------------------------------------------------------------------------------------------
    def rm(self) -> dict:
        from llama2_lit.modules.reward import RewardModule

        s, dev, tok = self.s, self.device, self.tok
        gen = torch.Generator().manual_seed(1)
        n = s.warmup + s.steps
        batches = []
        for _ in range(n):
            c, r = (random_ids((s.rm_pairs, s.seq_len), s.vocab, gen) for _ in range(2))
            ones = torch.ones_like(c)
            batches.append({"chosen_input_ids": c, "chosen_attention_mask": ones, "rejected_input_ids": r,
                            "rejected_attention_mask": ones.clone(), "margin": torch.zeros(s.rm_pairs)})
        half = (self.section_deadline - time.perf_counter()) / 2

        light, light_steps, light_peak, fpt = self.lightning_loop(
            lambda: RewardModule(model_cfg(s, "float32"), tokenizer=tok, lr=1e-5, warmup_steps=0, warmup_ratio=0.0),
            batches, s.rm_pairs, half)
        self.log(f"rm lightning: {light:,.2f} pairs/s over {light_steps} steps")

        from transformers import LlamaForSequenceClassification

        base = allocated(dev)
        torch.manual_seed(0)
        with torch.device(dev):
            model = LlamaForSequenceClassification(hf_config(s, tok, num_labels=1)).float().train()
        plain, plain_steps = self.plain_loop(model, batches, self._rm_loss, s.rm_pairs, time.perf_counter() + half)
        plain_peak = peak_gib(dev, base)
        self.log(f"rm plain: {plain:,.2f} pairs/s over {plain_steps} steps")
        del model
        self.peaks["rm"] = {"measured": light_peak, "plain": plain_peak}
        tpp = 2 * s.seq_len  # tokens per pair
        res = {"lightning_pairs_per_s": light, "plain_pairs_per_s": plain, "ratio": light / plain,
               "lightning_tokens_per_s": light * tpp, "plain_tokens_per_s": plain * tpp,
               "lightning_mfu": self.mfu(light * tpp, fpt), "plain_mfu": self.mfu(plain * tpp, fpt),
               "flops_per_token": fpt, "pairs_per_step": s.rm_pairs, "row_tokens": s.seq_len,
               "timed_steps_lightning": light_steps, "timed_steps_plain": plain_steps,
               "peak_allocated_gib": {"lightning": light_peak, "plain": plain_peak}}
        print(f"RM   {s.rm_pairs} pairs x 2x{s.seq_len}: Lightning RewardModule {light:,.2f} pairs/s "
              f"(MFU {res['lightning_mfu']:.1%}) | plain loop {plain:,.2f} pairs/s (MFU {res['plain_mfu']:.1%}) | "
              f"ratio {res['ratio']:.3f}x" + self.target("target >= 1.0"), flush=True)
        return res

    # -- generation -------------------------------------------------------------------------------------
    def frozen_policy(self):
        """The policy as a frozen bf16 copy (what rollouts and RS sample from), eval mode, on the device."""
        from llama2_lit.models.loading import load_causal_lm

        torch.manual_seed(0)
        dtype = "bfloat16" if self.device.type == "cuda" or self.compute_dtype == torch.bfloat16 else "float32"
        with torch.device(self.device):
            model = load_causal_lm(model_cfg(self.s, dtype), self.tok)
        return model.to(getattr(torch, dtype)).eval().requires_grad_(False)  # frozen: stored in the compute dtype

    def prompts(self, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        ids = random_ids((batch, self.s.prompt_tokens), self.s.vocab, gen)
        return ids.to(self.device), torch.ones_like(ids).to(self.device)

    def hf_generate(self, model, ids, mask, new_tokens: int) -> int:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                                 top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 pad_token_id=self.tok.pad_token_id, use_cache=True)
        return int(out[:, ids.shape[1]:].numel())

    def engine_generate(self, engine, ids, mask, new_tokens: int, seed: int) -> int:
        from llama2_lit.generation.engine import Sampling

        roll = engine.generate_ids(ids, mask, Sampling(max_new_tokens=new_tokens, temperature=1.0, top_p=1.0,
                                                       seed=seed, stop_ids=()))
        return roll.num_tokens

    def generate(self) -> dict:
        from llama2_lit.generation.engine import Engine

        s, dev = self.s, self.device
        base = allocated(dev)  # peaks below include the frozen model's weights (the planner counts them)
        model = self.frozen_policy()
        rows = []
        per_batch = (self.section_deadline - time.perf_counter()) / len(s.gen_batches)
        for i, b in enumerate(s.gen_batches):
            stop = time.perf_counter() + per_batch
            ids, mask = self.prompts(b, seed=10 + i)
            # engine: warm-up call (short), then timed calls until its share of the batch's time is spent
            release(dev)
            engine = Engine(model, self.tok)  # one per batch, dropped before HF runs (its fused weight copies)
            self.engine_generate(engine, ids, mask, 4, seed=0)
            runs = []
            while True:
                t0 = self.clock.now()
                n = self.engine_generate(engine, ids, mask, s.new_tokens, seed=len(runs) + 1)
                runs.append(n / (self.clock.now() - t0))
                if len(runs) >= 3 or time.perf_counter() > stop - per_batch * 0.6:
                    break
            eng = statistics.median(runs)
            eng_peak = peak_gib(dev, base)
            del engine
            # HF generate: warm-up (short), one timed call (the slow side: ~16 s per call at b64 on an H100)
            release(dev)
            self.hf_generate(model, ids, mask, 2)
            t0 = self.clock.now()
            n = self.hf_generate(model, ids, mask, s.new_tokens)
            hf = n / (self.clock.now() - t0)
            hf_peak = peak_gib(dev, base)
            self.hf_rates[b] = hf
            rows.append({"batch": b, "hf_tokens_per_s": hf, "engine_tokens_per_s": eng, "engine_over_hf": eng / hf,
                         "engine_calls": len(runs), "engine_peak_allocated_gib": eng_peak,
                         "hf_peak_allocated_gib": hf_peak})
            print(f"GEN  batch {b}, {s.prompt_tokens} prompt + {s.new_tokens} new tokens: engine {eng:,.0f} tokens/s"
                  f" | HF generate {hf:,.0f} tokens/s | engine / HF {eng / hf:.2f}x"
                  + self.target("target >= 5; anchors HF 995 tokens/s at b64, 4,096 at b256 on H100"), flush=True)
            self.peaks["generate"] = {"measured": eng_peak, "hf": hf_peak, "batch": b}
        del model
        return {"prompt_tokens": s.prompt_tokens, "new_tokens": s.new_tokens,
                "dtype": "bfloat16" if self.device.type == "cuda" or self.compute_dtype == torch.bfloat16
                else "float32", "batches": rows}

    # -- ppo --------------------------------------------------------------------------------------------
    def ppo_options(self, rm_dirs: dict[str, str]) -> dict:
        """conf/stage/ppo.yaml's ``ppo`` node (read with PyYAML: no omegaconf), interpolations resolved, with the
        benchmark's sizes."""
        import yaml

        s = self.s
        raw = yaml.safe_load((ROOT / "conf" / "stage" / "ppo.yaml").read_text())["ppo"]
        # the Llama-shaped benchmark model takes the paper's values (conf/model/llama2_*.yaml)
        known = {"${model.ppo_kl_coef}": 0.01, "${seed}": 0, "${oc.select:model.safety_threshold,0.15}": 0.15}

        def resolve(x):
            if isinstance(x, dict):
                return {k: resolve(v) for k, v in x.items()}
            if isinstance(x, str) and x.startswith("${"):
                if x in known:
                    return known[x]
                if x.startswith("${ppo.") and x.endswith("}"):
                    v = raw
                    for part in x[6:-1].split("."):
                        v = v.get(part) if isinstance(v, dict) else None
                    return v
                return None
            return x

        o = resolve(raw)
        o.update(iterations=s.ppo_iterations + 1, mini_batch_size=s.ppo_mini_batch, micro_batch_size=None,
                 ppo_epochs=1, max_new_tokens=s.ppo_new_tokens, temperature=1.0, top_p=1.0, scorer="rm",
                 reward_models=dict(rm_dirs), rm_batch_size=s.ppo_prompts, rm_max_length=None,
                 value_init="policy", frozen_dtype="bfloat16", seed=0,
                 early_stopping={"enabled": False, "patience": 1, "min_delta": 0.0},
                 bootstrap={"enabled": False, "dir": None, "sft_overrides": [], "rm_overrides": []},
                 engine={"backend": "auto", "compile": False})
        o["eval"] = {"temperature": 1.0, "greedy": False, "max_new_tokens": s.ppo_new_tokens}
        return o

    def ppo(self) -> dict:
        try:
            import llama2_lit.modules.ppo  # noqa: F401  (before minutes of work)
        except ImportError as e:
            raise ImportError(f"{e}: llama2_lit.modules.ppo could not be imported") from e
        precisions = [self.precision]
        if self.precision != "32-true" and self.args.ppo_fallback:
            precisions.append("32-true")
        failed = []
        with tempfile.TemporaryDirectory(prefix="bench_gpu_rm_") as d:
            rm_dirs = self.export_rms(Path(d))
            for prec in precisions:
                release(self.device)
                try:
                    res = self.ppo_once(prec, rm_dirs)
                except Exception as e:
                    failed.append({"precision": prec, "error": f"{type(e).__name__}: {e}",
                                   "traceback": traceback.format_exc()[-3000:]})
                    self.log(f"ppo under {prec} FAILED: {type(e).__name__}: {e}")
                    continue
                res["failed_attempts"] = failed
                return res
        raise RuntimeError("ppo failed under every precision tried: " + "; ".join(
            f"{f['precision']}: {f['error']}" for f in failed))

    def export_rms(self, tmp: Path) -> dict[str, str]:
        """Two random-init reward models of the policy's shape, exported in bf16 (what stage=rm writes)."""
        from llama2_lit.models.reward import export_reward_model, load_reward_model

        out = {}
        for i, name in enumerate(("helpfulness", "safety")):
            torch.manual_seed(100 + i)
            with torch.device(self.device):
                m = load_reward_model(model_cfg(self.s, "bfloat16"), self.tok).to(torch.bfloat16)
            export_reward_model(m, self.tok, tmp / name)
            out[name] = str(tmp / name)
            del m
        return out

    def ppo_once(self, precision: str, rm_dirs: dict[str, str]) -> dict:
        from llama2_lit.modules.ppo import PPOModule

        s, dev, tok = self.s, self.device, self.tok
        opts = self.ppo_options(rm_dirs)
        words = s.prompt_tokens - 3  # the chat template adds <s>, <|user|> and <|assistant|>
        gen = torch.Generator().manual_seed(3)
        iters = s.ppo_iterations + 1

        @dataclass(frozen=True)
        class Prompt:
            text: str
            is_safety: bool

        batches = []
        for it in range(iters):
            ids = random_ids((s.ppo_prompts, words), s.vocab, gen)
            batches.append([Prompt(" ".join(tok.convert_ids_to_tokens(row.tolist())), bool((it + j) % 2))
                            for j, row in enumerate(ids)])
        base = allocated(dev)
        torch.manual_seed(0)
        with torch.device(dev):
            module = PPOModule(model_cfg(s, "float32"), tokenizer=tok, options=opts)
        trainer = lightning_trainer(dev, precision, -1, [], clip=None)  # one epoch = the iterations' batches
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None,
                                                                          collate_fn=lambda x: x))
        hist = module.history[1:]
        if not hist:
            raise RuntimeError(f"ppo: no timed iteration ({len(module.history)} iterations ran in all)")
        peak = peak_gib(dev, base)
        split = {k: statistics.median(h[f"time/{k}_s"] for h in hist) for k in ("generation", "scoring", "training")}
        total = sum(split.values())
        gen_tps = sum(h["perf/gen_tokens"] for h in hist) / sum(h["time/generation_s"] for h in hist)
        samples = statistics.median(h["perf/samples"] for h in hist)
        del module, trainer
        self.peaks["ppo"] = {"measured": peak, "precision": precision}
        res = {"precision": precision, "prompts_per_iteration": s.ppo_prompts, "mini_batch_size": s.ppo_mini_batch,
               "ppo_epochs": 1, "prompt_tokens": s.prompt_tokens, "max_new_tokens": s.ppo_new_tokens,
               "iterations_timed": len(hist), "seconds": split,
               "share": {k: v / total for k, v in split.items()}, "samples_per_s": samples / total,
               "generation_tokens_per_s": gen_tps,
               "response_tokens_mean": statistics.mean(h["ppo/response_length"] for h in hist),
               "peak_allocated_gib": peak}
        print(f"PPO  {s.ppo_prompts} prompts x <= {s.ppo_new_tokens} new tokens, mini-batch {s.ppo_mini_batch}, "
              f"{precision}: generation {split['generation']:.2f} s ({res['share']['generation']:.0%}), scoring "
              f"{split['scoring']:.2f} s ({res['share']['scoring']:.0%}), training {split['training']:.2f} s "
              f"({res['share']['training']:.0%}); {res['samples_per_s']:.2f} samples/s, generation "
              f"{gen_tps:,.0f} tokens/s", flush=True)
        return res

    # -- memory -----------------------------------------------------------------------------------------
    def plans(self) -> dict[str, dict]:
        """The planner's per-GPU figures (bytes) for each phase, with the CUDA-context allowance at 0."""
        from transformers import LlamaForSequenceClassification

        from llama2_lit.plan import Shape, plan_memory

        s = self.s
        shape = Shape.from_config(dict(s.dims, vocab_size=s.vocab))
        with torch.device("meta"):  # exact count of the scalar-head model (the LM head replaced by 1 x h)
            rm_params = sum(p.numel() for p in LlamaForSequenceClassification(
                hf_config(s, self.tok, num_labels=1)).parameters())
        rm_shape = replace(shape, params=rm_params, vocab=1)
        mem = (torch.cuda.get_device_properties(self.device).total_memory / GIB if self.device.type == "cuda"
               else 80.0)
        common = dict(gpus=1, gpu_memory_gib=mem, checkpointing=False, overhead_gib=0.0, gpus_per_node=1)
        import inspect

        # frozen models are held in bf16 here (PPO: ppo.frozen_dtype; generation: the bf16 copy) whatever the
        # compute precision; planners that take the frozen dtype separately are told so
        frozen = {"frozen_bytes": 2} if "frozen_bytes" in inspect.signature(plan_memory).parameters else {}
        out = {}
        p = plan_memory({"policy": shape}, {}, precision=self.precision, micro_batch=s.sft_batch,
                        seq_len=s.seq_len, **common)
        out["sft"] = {"planned": p.peak, "plan": p}
        p = plan_memory({"reward model": rm_shape}, {}, precision=self.precision, micro_batch=2 * s.rm_pairs,
                        seq_len=s.seq_len, **common)
        out["rm"] = {"planned": p.peak, "plan": p}
        gen_prec = "bf16-mixed" if self.result["sections"].get("generate", {}).get("dtype", "bfloat16") == \
            "bfloat16" else "32-true"
        b = (self.peaks.get("generate") or {}).get("batch", max(s.gen_batches))
        p = plan_memory({}, {"policy": shape}, precision=gen_prec, micro_batch=b,
                        seq_len=s.prompt_tokens + s.new_tokens,
                        generation={"policy": "policy", "batch": b, "length": s.prompt_tokens + s.new_tokens},
                        **common, **(frozen if gen_prec == "bf16-mixed" else {}))
        out["generate"] = {"planned": p.peak, "plan": p}
        ppo_prec = (self.peaks.get("ppo") or {}).get("precision", self.precision)
        p = plan_memory({"policy": shape, "value": rm_shape},
                        {"reference": shape, "helpfulness RM": rm_shape, "safety RM": rm_shape},
                        precision=ppo_prec, micro_batch=s.ppo_mini_batch,
                        seq_len=s.prompt_tokens + s.ppo_new_tokens,
                        generation={"policy": "policy", "batch": s.ppo_prompts,
                                    "length": s.prompt_tokens + s.ppo_new_tokens}, **common, **frozen)
        out["ppo"] = {"planned": p.peak, "plan": p}
        return out

    def memory(self) -> dict:
        plans = self.plans()
        phases = {}
        for name in PHASES:
            planned = plans[name]["planned"] / GIB
            measured = (self.peaks.get(name) or {}).get("measured")
            plan = plans[name]["plan"]
            phases[name] = {"measured_gib": measured, "planned_gib": planned,
                            "ratio": None if measured is None else measured / planned,
                            "planned_train_gib": {k: v / GIB for k, v in plan.components.items()},
                            "planned_generation_gib": {k: v / GIB for k, v in plan.generation.items()}}
            text = (f"measured {measured:.2f} GiB, planned {planned:.2f} GiB, ratio {measured / planned:.2f}"
                    if measured is not None else f"planned {planned * 1024:.2f} MiB, measured: none (no CUDA device)")
            print(f"MEM  {name:9s} {text}" + (self.target("target 0.8-1.2") if measured is not None else ""),
                  flush=True)
        return {"note": "measured = torch.cuda.max_memory_allocated during the phase less what was allocated before "
                        "it (null without CUDA); planned = llama2_lit.plan.plan_memory peak for 1 GPU with the same "
                        "shape, micro-batch, sequence and precision, no activation checkpointing, overhead_gib=0 "
                        "(the CUDA context is not in max_memory_allocated); generate = the engine at the larger batch",
                "phases": phases}

    # -- compiled engine --------------------------------------------------------------------------------
    def generate_compiled(self) -> dict:
        s = self.s
        if not self.want_compile():
            return {"skipped": "compile=True is tried on CUDA only (--compile to force it here)", "batches": []}
        if self.deadline - time.perf_counter() < 45 and not self.args.tiny:
            return {"skipped": "time budget spent (< 45 s left)", "batches": []}
        from llama2_lit.generation.engine import Engine

        model = self.frozen_policy()
        rows = []
        for i, b in enumerate(s.gen_batches):
            row = {"batch": b, "tokens_per_s": None, "over_hf": None, "first_call_s": None, "error": None,
                   "traceback": None}
            rows.append(row)
            if i and self.deadline - time.perf_counter() < 30 and not self.args.tiny:
                row["error"] = "skipped: time budget spent (< 30 s left)"
                continue
            ids, mask = self.prompts(b, seed=10 + i)
            try:
                engine = Engine(model, self.tok, compile=True)
                t0 = self.clock.now()
                self.engine_generate(engine, ids, mask, s.new_tokens, seed=0)  # compiles and captures
                row["first_call_s"] = self.clock.now() - t0
                t0 = self.clock.now()
                n = self.engine_generate(engine, ids, mask, s.new_tokens, seed=1)
                row["tokens_per_s"] = n / (self.clock.now() - t0)
                hf = self.hf_rates.get(b)
                row["over_hf"] = row["tokens_per_s"] / hf if hf else None
                print(f"GEN  compiled engine, batch {b}: {row['tokens_per_s']:,.0f} tokens/s"
                      + (f" ({row['over_hf']:.2f}x HF generate)" if hf else "")
                      + f"; first call (compile + capture) {row['first_call_s']:.1f} s", flush=True)
            except Exception as e:  # expected to be possible: this path has never run on a GPU
                row["error"] = f"{type(e).__name__}: {e}"[:2000]
                row["traceback"] = traceback.format_exc()[-3000:]
                self.log(f"compiled engine at batch {b} FAILED: {type(e).__name__}: {str(e)[:300]}")
            finally:
                engine = None
                with contextlib.suppress(Exception):
                    torch._dynamo.reset()
                release(self.device)
            self.result["sections"]["generate_compiled"] = {"skipped": None, "batches": rows}
            self.write()
        del model
        return {"skipped": None, "batches": rows}


def _version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:
        return None


SECTIONS = ("sft", "rm", "generate", "ppo", "memory", "generate_compiled")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run (2-layer model, short rows, tiny batches)")
    ap.add_argument("--out", default=None, help=f"JSON path (default {DEFAULT_OUT.relative_to(ROOT)}; --tiny: a temp "
                    "file)")
    ap.add_argument("--precision", default=None, help="Lightning precision: default bf16-mixed (GPU), 32-true "
                    "(--tiny on CPU)")
    ap.add_argument("--budget-s", type=float, default=None, help="wall-time budget of all sections (default 280 on "
                    "GPU, 150 for --tiny)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ", ".join(SECTIONS))
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak FLOP/s for MFU (TFLOP/s)")
    ap.add_argument("--compile", dest="compile", action="store_true", default=None,
                    help="try the compiled engine (default: on CUDA only)")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--no-ppo-fallback", dest="ppo_fallback", action="store_false",
                    help="do not retry PPO under 32-true when the requested precision fails")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 for --tiny on CPU)")
    ap.add_argument("--sft-batch", type=int, default=None, help="SFT rows per step (default 4 x 2048; tiny 2 x 64)")
    ap.add_argument("--rm-pairs", type=int, default=None, help="RM pairs per step (default 2)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        raise SystemExit("bench/gpu.py: no CUDA device. The GPU benchmark refuses to run on CPU (its figures would "
                         "land in bench/results/gpu.json); use --tiny for the CPU smoke run.")
    out = resolve_out(args.out, args.tiny)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if args.threads or (args.tiny and not cuda):
        torch.set_num_threads(args.threads or 1)
    if args.precision is None:
        args.precision = "bf16-mixed" if cuda else "32-true"
    s = TINY if args.tiny else GPU
    if args.budget_s:
        s = replace(s, budget_s=args.budget_s)
    if args.sft_batch:
        s = replace(s, sft_batch=args.sft_batch)
    if args.rm_pairs:
        s = replace(s, rm_pairs=args.rm_pairs)
    wanted = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        ap.error(f"--sections: unknown {unknown} (choose from {list(SECTIONS)})")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*`max_epochs` was not set.*")
    import logging

    import lightning  # noqa: F401  (it sets its loggers' levels on import: quiet them after)
    import transformers

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()

    bench = Bench(args, s, device, out)
    if device.type == "cpu":
        print("=" * 100 + f"\nCPU run (--tiny): every figure below is a CPU figure of a {s.dims['num_hidden_layers']}-"
              f"layer toy model, NOT a GPU result. device: {bench.result['device']}\n" + "=" * 100, flush=True)
    else:
        print(f"device: {bench.result['device']} | torch {torch.__version__} | precision {args.precision} | "
              f"shape {s.name} | peak {bench.peak / 1e12:.0f} TFLOP/s ({bench.peak_source})", flush=True)
    print(f"MFU: {bench.result['mfu_formula']}; peak used: {bench.peak / 1e12:.3g} TFLOP/s ({bench.peak_source})",
          flush=True)
    for name in SECTIONS:
        if name in wanted:
            bench.run(name, getattr(bench, name))
    bench.result["complete"] = True
    bench.write()
    print(f"wrote {out} in {bench.result['elapsed_s']:.1f} s" + (f"; FAILED sections: {sorted(bench.result['errors'])}"
                                                                   if bench.result["errors"] else ""), flush=True)
    return bench.result


if __name__ == "__main__":
    res = main()
    sys.exit(1 if res["errors"] else 0)
