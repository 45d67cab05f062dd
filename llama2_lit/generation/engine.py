"""The generation engine: batched sampling of K responses per prompt, for evaluation, RS, PPO and pair collection.

    engine = Engine(model, tokenizer)
    out = engine.generate(["What is 2 + 3?"], Sampling(max_new_tokens=24, temperature=1.0, num_samples=4, seed=0))
    out.response_ids      # (N, T), N = prompts x K: rows i*K .. i*K + K - 1 answer prompt i
    engine.decode(out)    # N strings, special tokens stripped

What makes it faster than ``model.generate`` at the same settings:

* a static KV cache (prompt + max_new_tokens columns), allocated once per call and written in place
  (no ``torch.cat`` growth per step);
* a ``llama`` backend that runs the decoder as a handful of tensor ops straight from the model's own
  parameters (q/k/v and gate/up projections fused into one matmul each, RoPE on q and k at once from a
  precomputed table, one additive key mask per step, batched-matmul attention for the single-token step on
  CPU), instead of the module tree, mask builders, logits processors and stopping criteria HF runs every step;
* each prompt is prefilled once and its keys/values copied to its K sample rows;
* rows that stopped are dropped from the batch once they are half of it (eager mode), so short answers
  stop costing compute;
* with ``compile=True`` the decode step has a fixed shape ``(N, 1)`` against the whole static cache, held in
  buffers that keep their addresses across calls, so ``torch.compile`` (CUDA graphs with
  ``mode="reduce-overhead"`` on GPU) captures it once;
* the per-step Python work is a constant number of tensor ops, independent of batch size; finished
  rows are checked every ``check_every`` steps (one host sync each).

Sampling follows HF exactly: temperature, then top-p (HF's ``TopPLogitsWarper`` rule: drop the tokens
whose ascending cumulative probability is <= 1 - top_p, keep at least one), no top-k; temperature 0 is
greedy. Draws come from a ``torch.Generator`` seeded by ``Sampling.seed`` (None: drawn from the global
torch RNG, so ``seed_everything`` still makes a run reproducible), one uniform per row per step through the
inverse CDF (``searchsorted`` on the cumulative probabilities), without a host sync. Row n's draws depend on
the seed and n only, so dropping finished rows from the batch changes no sample.

Log-probs: ``logprobs[n, t]`` = log softmax(logits / T)[token] (T = 1 for greedy), the tempered, untruncated
policy a training forward recomputes as ``log_softmax(logits / T)``; top-p's renormalisation is not in it.
Computed from the logits the step already has, so no second forward pass.

The ``hf`` backend (any causal LM; ``backend="auto"`` picks it for non-Llama architectures or RoPE types whose
table depends on the sequence length) runs ``model(...)`` with a ``DynamicCache`` under the same loop,
sampler and outputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from llama2_lit.errors import UserError


@dataclass(frozen=True)
class Sampling:
    """How to sample. ``temperature=0``: greedy. ``num_samples``: K responses per prompt."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    num_samples: int = 1
    seed: int | None = None
    stop_ids: tuple[int, ...] | None = None  # None: the tokenizer's EOS plus the model's generation_config EOS

    def __post_init__(self):
        if self.num_samples < 1:
            raise UserError(f"sampling: num_samples (K) must be >= 1, got {self.num_samples}")
        if self.max_new_tokens < 1:
            raise UserError(f"sampling: max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise UserError(f"sampling: temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"sampling: top_p must be in (0, 1], got {self.top_p}")


class Rollout(NamedTuple):
    """Generated responses, N = prompts x K rows; row ``n`` answers prompt ``prompt_index[n]``."""

    prompt_ids: torch.Tensor     # (N, P) left-padded prompt tokens
    prompt_mask: torch.Tensor    # (N, P) 1 on prompt tokens, 0 on left padding
    response_ids: torch.Tensor   # (N, T) generated tokens, pad after the stop token
    response_mask: torch.Tensor  # (N, T) 1 on generated tokens (the stop token included)
    logprobs: torch.Tensor       # (N, T) float32 log softmax(logits / T)[token] of the sampling policy; 0 off the mask
    prompt_index: torch.Tensor   # (N,) long
    finished: torch.Tensor       # (N,) bool: the response ended with a stop token

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids (N, P + T), attention_mask (N, P + T))``: prompt and response, for a training forward."""
        return (torch.cat([self.prompt_ids, self.response_ids], 1),
                torch.cat([self.prompt_mask, self.response_mask], 1))

    @property
    def num_tokens(self) -> int:
        """Generated tokens (stop tokens included)."""
        return int(self.response_mask.sum())


# ----------------------------------------------------------------------------------------------- sampling


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """``scores`` (N, V) with the tokens outside the top-p nucleus set to -inf (HF's ``TopPLogitsWarper``)."""
    if top_p >= 1.0:
        return scores
    sorted_scores, sorted_idx = torch.sort(scores, descending=False)
    cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - top_p)
    remove[..., -1:] = False
    remove = remove.scatter(1, sorted_idx, remove)
    return scores.masked_fill(remove, float("-inf"))


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                  uniform: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens (N,), logprobs (N,))`` from ``logits`` (N, V) float32; see the module docstring.

    ``uniform`` (N, 1): one U[0, 1) draw per row (required unless ``temperature == 0``); the token is found by
    inverse CDF (``searchsorted`` on the cumulative probabilities): one random number per row, not per token.
    """
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(1, tok[:, None])[:, 0]
    scaled = logits / temperature
    logp = torch.log_softmax(scaled, -1)
    probs = logp.exp() if top_p >= 1.0 else torch.softmax(top_p_filter(scaled, top_p), -1)
    cdf = probs.cumsum(-1)
    tok = torch.searchsorted(cdf, uniform.to(cdf.dtype) * cdf[:, -1:], right=True)[:, 0]
    tok = tok.clamp_(max=probs.shape[-1] - 1)
    return tok, logp.gather(1, tok[:, None])[:, 0]


# ------------------------------------------------------------------------------------------ the backends


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm exactly as ``LlamaRMSNorm`` (float32 statistics, then the weight in the input dtype)."""
    dtype = x.dtype
    if dtype == torch.float32 and w.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), w, eps)  # one call, bit-identical to the ops below in float32
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class _LlamaLayer(NamedTuple):
    ln1: torch.Tensor
    wqkv: torch.Tensor | None  # fused (q; k; v) rows, or None when not fused
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    ln2: torch.Tensor
    wgu: torch.Tensor | None   # fused (gate; up) rows, or None
    wg: torch.Tensor
    wu: torch.Tensor
    wd: torch.Tensor
    biases: dict | None        # attention / MLP biases, if the config has them


_STATIC_ROPE = ("default", "linear", "llama3", "yarn", "longrope", None)


def llama_supported(model) -> str | None:
    """None if the ``llama`` backend can run ``model``; else the reason it cannot."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) != "llama":
        return f"model_type {getattr(cfg, 'model_type', None)!r} is not llama (the hf backend runs it)"
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers") or not hasattr(base, "rotary_emb"):
        return "no model.layers / model.rotary_emb"
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        return "sharded (DTensor) parameters"
    rope = getattr(base.rotary_emb, "rope_type", "default")
    if rope not in _STATIC_ROPE:
        return f"RoPE type {rope!r} depends on the sequence length"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    return None


class _LlamaRunner:
    """The decoder as tensor ops over the model's own parameters (no copies, except the fused projections)."""

    def __init__(self, model, fuse: bool = True, dtype: torch.dtype | None = None):
        """``dtype``: run in this dtype over copies of the weights (one per parameter version; e.g. a float32
        policy sampled in bf16 under bf16-mixed); None: the parameters' own dtype, no copies."""
        base, cfg = model.model, model.config
        copies: dict[int, torch.Tensor] = {}

        def c(t):  # the weight itself, or its copy in ``dtype`` (tied weights share one copy)
            if t is None or dtype is None or t.dtype == dtype:
                return t
            if t.data_ptr() not in copies:
                copies[t.data_ptr()] = t.detach().to(dtype)
            return copies[t.data_ptr()]

        self.cfg = cfg
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        self.scale = self.head_dim ** -0.5
        self.embed = c(base.embed_tokens.weight)
        self.norm = c(base.norm.weight)
        self.lm_head = c(model.get_output_embeddings().weight)
        self.lm_bias = c(getattr(model.get_output_embeddings(), "bias", None))
        self.rotary = base.rotary_emb
        self.layers = []
        for layer in base.layers:
            a, m = layer.self_attn, layer.mlp
            biases = None
            if any(getattr(x, "bias", None) is not None for x in (a.q_proj, a.k_proj, a.v_proj, a.o_proj,
                                                                   m.gate_proj, m.up_proj, m.down_proj)):
                biases = {n: c(getattr(x, "bias", None)) for n, x in (("q", a.q_proj), ("k", a.k_proj), ("v", a.v_proj),
                                                                    ("o", a.o_proj), ("g", m.gate_proj),
                                                                    ("u", m.up_proj), ("d", m.down_proj))}
            fuse_here = fuse and biases is None
            wq, wk, wv, wg, wu = (c(x.weight) for x in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj))
            self.layers.append(_LlamaLayer(
                ln1=c(layer.input_layernorm.weight),
                wqkv=torch.cat([wq, wk, wv]) if fuse_here else None,
                wq=wq, wk=wk, wv=wv, wo=c(a.o_proj.weight),
                ln2=c(layer.post_attention_layernorm.weight),
                wgu=torch.cat([wg, wu]) if fuse_here else None,
                wg=wg, wu=wu, wd=c(m.down_proj.weight), biases=biases))
        self.dtype = self.embed.dtype
        self.device = self.embed.device
        self.matmul_decode = self.device.type == "cpu"
        self.cos = self.sin = None

    def rope_table(self, length: int) -> None:
        """cos/sin for positions 0..length-1, exactly as the model's rotary module computes them."""
        pos = torch.arange(length, device=self.device)[None]
        dummy = torch.empty(1, 1, dtype=self.dtype, device=self.device)
        cos, sin = self.rotary(dummy, pos)
        self.cos, self.sin = cos[0], sin[0]  # (S, D)

    def new_cache(self, rows: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = (rows, self.n_kv, length, self.head_dim)
        return [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                 torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in self.layers]

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, cache, slots: torch.Tensor, kv_len: int,
                mask: torch.Tensor, last_only: bool = True) -> torch.Tensor:
        """Logits (B, V) float32 of the last position (or (B, T, V)) for ``ids`` (B, T) at positions ``pos`` (B, T).

        The new keys/values are written to cache columns ``slots`` (T,); attention reads columns
        ``[0, kv_len)`` under ``mask`` (B, 1, T, kv_len): boolean (True = attend) or additive float (0 / -inf).
        A single-token step on CPU attends with two batched matmuls (GQA heads grouped, no key repeat),
        which beats SDPA's kernel at these shapes; elsewhere SDPA.
        """
        b, t = ids.shape
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        x = F.embedding(ids, self.embed)
        cos, sin = self.cos[pos][:, :, None], self.sin[pos][:, :, None]  # (B, T, 1, D)
        gqa = nh != nkv
        for w, (kc, vc) in zip(self.layers, cache):
            h = _rms(x, w.ln1, self.eps)
            if w.wqkv is not None:
                qkv = F.linear(h, w.wqkv).view(b, t, nh + 2 * nkv, hd)
            else:
                bs = w.biases or {}
                qkv = torch.cat([F.linear(h, w.wq, bs.get("q")), F.linear(h, w.wk, bs.get("k")),
                                 F.linear(h, w.wv, bs.get("v"))], -1).view(b, t, nh + 2 * nkv, hd)
            qk = qkv[:, :, :nh + nkv]
            qk = qk * cos + _rotate_half(qk) * sin  # RoPE on q and k heads at once, elementwise as HF
            q, k = qk[:, :, :nh].transpose(1, 2), qk[:, :, nh:].transpose(1, 2)
            v = qkv[:, :, nh + nkv:].transpose(1, 2)
            kc.index_copy_(2, slots, k)
            vc.index_copy_(2, slots, v)
            keys, values = kc[:, :, :kv_len], vc[:, :, :kv_len]
            if t == 1 and self.matmul_decode and mask.dtype != torch.bool:
                sc = torch.matmul(q.reshape(b, nkv, nh // nkv, hd), keys.transpose(-1, -2)) * self.scale
                o = torch.matmul((sc + mask).softmax(-1), values).reshape(b, nh, 1, hd)
            else:
                o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
            o = o.transpose(1, 2).reshape(b, t, nh * hd)
            x = x + F.linear(o, w.wo, (w.biases or {}).get("o"))
            h = _rms(x, w.ln2, self.eps)
            if w.wgu is not None:
                g, u = F.linear(h, w.wgu).chunk(2, dim=-1)
            else:
                bs = w.biases or {}
                g, u = F.linear(h, w.wg, bs.get("g")), F.linear(h, w.wu, bs.get("u"))
            x = x + F.linear(F.silu(g) * u, w.wd, (w.biases or {}).get("d"))
        if last_only:
            x = x[:, -1]
        x = _rms(x, self.norm, self.eps)
        return F.linear(x, self.lm_head, self.lm_bias).float()


class _DecodeStep(torch.nn.Module):
    """One fixed-shape decode step over the whole static cache (what ``compile=True`` compiles).

    Inputs ``tok`` (N,), ``pos`` (N,), ``slot`` (1,); the cache and the additive key mask ``bias`` (N, S) are
    tensors owned by the step and mutated in place, so a CUDA graph sees the same addresses every step.
    """

    def __init__(self, runner: _LlamaRunner, cache, bias: torch.Tensor):
        super().__init__()
        self.runner, self.cache = runner, cache
        self.register_buffer("bias", bias, persistent=False)
        for i, (kc, vc) in enumerate(cache):
            self.register_buffer(f"k{i}", kc, persistent=False)
            self.register_buffer(f"v{i}", vc, persistent=False)

    def forward(self, tok: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        self.bias.index_fill_(1, slot, 0.0)
        return self.runner.forward(tok[:, None], pos[:, None], self.cache, slot, self.bias.shape[1],
                                   self.bias[:, None, None, :])


# --------------------------------------------------------------------------------------------- the engine


def _stop_ids(model, tokenizer, sampling: Sampling) -> list[int]:
    if sampling.stop_ids is not None:
        return list(sampling.stop_ids)
    ids = []
    for src in (getattr(tokenizer, "eos_token_id", None), getattr(getattr(model, "generation_config", None),
                                                                 "eos_token_id", None)):
        for i in (src if isinstance(src, (list, tuple)) else [src]):
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids


def encode_prompts(tokenizer, prompts: Sequence[str | list[dict]]) -> list[list[int]]:
    """Token ids of chat prompts (a user string, or messages ending with a user turn) with a generation prompt."""
    out = []
    for p in prompts:
        msgs = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        if not msgs or (isinstance(p, str) and not p.strip()):
            raise UserError("generation: empty prompt")
        if getattr(tokenizer, "chat_template", None) is None:
            raise UserError("generation: the tokenizer has no chat template")
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids (B, P), mask (B, P))`` left-padded to the longest sequence."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, n - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, n - len(s):] = 1
    return ids, mask


class Engine:
    """Batched generation from a causal LM (see the module docstring).

    Args:
        model: a transformers causal LM (its current parameters are used at every call).
        tokenizer: its tokenizer (chat template, pad and EOS tokens).
        backend: ``auto`` (``llama`` when supported, else ``hf``), ``llama`` or ``hf``.
        compile: ``torch.compile`` the fixed-shape decode step (``mode="reduce-overhead"``, i.e. CUDA graphs,
            on GPU); attention then always spans the whole static cache.
        fuse: fuse q/k/v and gate/up projections into one matmul each (a copy of those weights per call).
        check_every: steps between checks that every row has stopped (each check is a host sync).
        compact: drop stopped rows from the batch (eager ``llama`` backend; not with ``compile``).

    Under autocast (Lightning's ``bf16-mixed``: float32 master weights, bf16 compute) the ``llama`` backend samples
    in the autocast dtype over a copy of the weights made once per parameter version (a PPO iteration), with
    autocast off inside: the KV cache, RoPE tables and matmuls are then all in that dtype.
    """

    def __init__(self, model, tokenizer, backend: str = "auto", compile: bool = False, fuse: bool = True,
                 check_every: int = 1, compact: bool = True):
        if backend not in ("auto", "llama", "hf"):
            raise UserError(f"engine.backend: unknown '{backend}' (choose auto, llama, hf)")
        why = llama_supported(model)
        if backend == "llama" and why:
            raise UserError(f"engine.backend=llama cannot run this model: {why}")
        self.model, self.tokenizer = model, tokenizer
        self.backend = "hf" if (backend == "hf" or (backend == "auto" and why)) else "llama"
        self.compile, self.fuse, self.check_every = compile, fuse, max(1, int(check_every))
        self.compact = compact
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else tokenizer.eos_token_id)
        self._runner_cache = None
        self._static = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- public ------------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str | list[dict]], sampling: Sampling = Sampling()) -> Rollout:
        """Sample ``sampling.num_samples`` responses to each chat prompt (one batch: chunk large sets)."""
        if len(prompts) == 0:
            raise UserError("generation: no prompts")
        ids, mask = left_pad(encode_prompts(self.tokenizer, prompts), self.pad_id)
        return self.generate_ids(ids, mask, sampling)

    def decode(self, rollout: Rollout) -> list[str]:
        """The responses as text, special tokens stripped and ends trimmed."""
        rows = [r[m.bool()].tolist() for r, m in zip(rollout.response_ids, rollout.response_mask)]
        return [t.strip() for t in self.tokenizer.batch_decode(rows, skip_special_tokens=True)]

    @torch.inference_mode()
    def generate_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     sampling: Sampling = Sampling()) -> Rollout:
        """Sample from left-padded prompt tokens ``input_ids`` (B, P) with ``attention_mask`` (B, P)."""
        if input_ids.ndim != 2 or input_ids.shape[0] == 0:
            raise UserError("generation: no prompts")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("generate_ids: prompts must be left-padded (a row ends with padding)")
        if bool((attention_mask.sum(1) == 0).any()):
            raise UserError("generation: empty prompt")
        model = self.model
        was_training = model.training
        model.eval()
        try:
            gen = torch.Generator(device=self.device)
            seed = sampling.seed if sampling.seed is not None else int(torch.randint(0, 2 ** 62, (1,)).item())
            gen.manual_seed(int(seed))
            ids, mask = input_ids.to(self.device), attention_mask.to(self.device)
            if self.backend == "llama":
                dev = self.device.type
                dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
                with torch.autocast(dev, enabled=False):
                    return self._run_llama(ids, mask, sampling, gen, dtype)
            return self._run_hf(ids, mask, sampling, gen)
        finally:
            model.train(was_training)

    # -- the loop ----------------------------------------------------------------------------------------
    def _loop(self, first_logits: torch.Tensor, step, n: int, sampling: Sampling, gen, compact: bool) -> tuple:
        """Sample up to ``max_new_tokens`` tokens for ``n`` rows.

        ``step(tokens (A,), t, keep)`` feeds the tokens sampled at step ``t`` and returns the next logits
        (A', V); ``keep`` (A',) is None, or the active rows to keep (``compact``: rows that stopped are dropped
        from the batch once they are half of it, so finished rows cost little).
        """
        t_max = sampling.max_new_tokens
        dev = first_logits.device
        out = torch.full((n, t_max), self.pad_id, dtype=torch.long, device=dev)
        lps = torch.zeros((n, t_max), dtype=torch.float32, device=dev)
        live = torch.zeros((n, t_max), dtype=torch.long, device=dev)
        stops = torch.tensor(_stop_ids(self.model, self.tokenizer, sampling) or [-1], device=dev)
        finished = torch.zeros(n, dtype=torch.bool, device=dev)
        active = None                                   # output rows of the batch rows; None = all, in order
        done = torch.zeros(n, dtype=torch.bool, device=dev)  # per batch row: emitted a stop token
        logits, steps = first_logits, 0
        for t in range(t_max):
            u = None
            if sampling.temperature > 0:  # one draw per output row, so dropping finished rows changes no sample
                u = torch.rand((n, 1), generator=gen, device=dev)
                u = u if active is None else u[active]
            tok, lp = sample_tokens(logits, sampling.temperature, sampling.top_p, u)
            tok = tok.masked_fill(done, self.pad_id)
            lp = lp.masked_fill(done, 0.0)
            if active is None:
                out[:, t], lps[:, t], live[:, t] = tok, lp, (~done).long()
            else:
                out[active, t], lps[active, t], live[active, t] = tok, lp, (~done).long()
            done = done | (tok == stops[0] if stops.numel() == 1 else torch.isin(tok, stops))
            steps = t + 1
            if t + 1 == t_max:
                break
            keep = None
            if (t + 1) % self.check_every == 0:
                n_done = int(done.sum())  # the one host sync per check
                if n_done == done.numel():
                    break
                if compact and 2 * n_done >= done.numel():  # halving: copies cost at most ~2 caches in all
                    keep = (~done).nonzero()[:, 0]
                    rows = torch.arange(n, device=dev) if active is None else active
                    finished[rows[done]] = True
                    active, done, tok = rows[keep], done[keep], tok[keep]
            logits = step(tok, t, keep)
        rows = torch.arange(n, device=dev) if active is None else active
        finished[rows[done]] = True
        return out[:, :steps], live[:, :steps], lps[:, :steps], finished

    def _finish(self, ids, mask, k, out, live, lps, done) -> Rollout:
        b = ids.shape[0]
        return Rollout(prompt_ids=ids.repeat_interleave(k, 0), prompt_mask=mask.repeat_interleave(k, 0),
                       response_ids=out, response_mask=live, logprobs=lps,
                       prompt_index=torch.arange(b, device=ids.device).repeat_interleave(k), finished=done)

    def _run_llama(self, ids, mask, sampling: Sampling, gen, dtype: torch.dtype | None = None) -> Rollout:
        b, p = ids.shape
        k, t_max = sampling.num_samples, sampling.max_new_tokens
        n, s = b * k, p + t_max
        dev = ids.device
        r = self._runner(dtype)
        r.rope_table(s)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, P) as HF generate (pad positions are never attended)
        valid = mask.bool()
        # prefill once per prompt: causal, real keys only; every query also sees itself (no empty rows)
        causal = torch.ones(p, p, dtype=torch.bool, device=dev).tril()
        pmask = (causal[None] & valid[:, None, :]) | torch.eye(p, dtype=torch.bool, device=dev)[None]
        # additive key mask: 0 on prompt tokens and generated columns, -inf on padding and unwritten columns
        if self.compile:  # the compiled step owns static buffers (same addresses every call: CUDA-graph safe)
            step_mod, fn = self._static_step(r, n, s)
            cache, bias = step_mod.cache, step_mod.bias
            for kc, vc in cache:
                kc.zero_()
                vc.zero_()
            bias.fill_(float("-inf"))
        else:
            cache = r.new_cache(n, s)
            bias = torch.full((n, s), float("-inf"), dtype=r.dtype, device=dev)
        bias[:, :p].masked_fill_(valid.repeat_interleave(k, 0), 0.0)
        if k == 1:  # the prompt's keys/values go straight into the cache
            logits = r.forward(ids, pos, [(kc[:, :, :p], vc[:, :, :p]) for kc, vc in cache],
                               torch.arange(p, device=dev), p, pmask[:, None])
        else:  # prefill each prompt once, then copy its keys/values to its K rows
            pcache = r.new_cache(b, p)
            logits = r.forward(ids, pos, pcache, torch.arange(p, device=dev), p, pmask[:, None])
            for (kc, vc), (pk, pv) in zip(cache, pcache):
                kc[:, :, :p] = pk.repeat_interleave(k, 0)
                vc[:, :, :p] = pv.repeat_interleave(k, 0)
            del pcache
        state = {"pos": pos[:, -1].repeat_interleave(k, 0) + 1, "cache": cache, "bias": bias}  # next position (N,)
        logits = logits.repeat_interleave(k, 0)

        if self.compile:
            def step(tok, t, keep):
                return fn(tok, state["pos"] + t, torch.tensor([p + t], device=dev))
        else:
            slots = torch.arange(p, s, device=dev)

            def step(tok, t, keep):  # attention reads the columns written so far only
                if keep is not None:
                    state["cache"] = [(kc.index_select(0, keep), vc.index_select(0, keep)) for kc, vc in state["cache"]]
                    state["bias"], state["pos"] = state["bias"].index_select(0, keep), state["pos"][keep]
                col = p + t
                state["bias"][:, col] = 0.0
                m = state["bias"][:, None, None, :col + 1]
                return r.forward(tok[:, None], (state["pos"] + t)[:, None], state["cache"], slots[t:t + 1], col + 1, m)

        out, live, lps, done = self._loop(logits, step, n, sampling, gen, compact=not self.compile and self.compact)
        return self._finish(ids, mask, k, out, live, lps, done)

    def _runner(self, dtype: torch.dtype | None = None) -> _LlamaRunner:
        """The decoder over the model's parameters (``dtype``: over copies in that dtype); rebuilt only when a
        parameter changed (the fused projections are copies: an optimizer step, which bumps the parameters'
        versions, refreshes them)."""
        sig = (dtype, *((p.data_ptr(), p._version) for p in self.model.parameters()))
        if self._runner_cache is None or self._runner_cache[0] != sig:
            self._runner_cache = None  # free the previous copies first
            self._runner_cache = (sig, _LlamaRunner(self.model, fuse=self.fuse, dtype=dtype))
        return self._runner_cache[1]

    def _static_step(self, r: _LlamaRunner, n: int, s: int):
        """``(step module, compiled step)`` for N rows and S cache columns, kept across calls for this runner."""
        key = (id(r), n, s)
        if self._static is None or self._static[0] != key:
            self._static = None  # free the previous buffers first
            step_mod = _DecodeStep(r, r.new_cache(n, s), torch.full((n, s), float("-inf"), dtype=r.dtype,
                                                                     device=r.device))
            mode = "reduce-overhead" if r.device.type == "cuda" else None
            self._static = (key, step_mod, torch.compile(step_mod, mode=mode, fullgraph=True, dynamic=False))
        return self._static[1], self._static[2]

    def _run_hf(self, ids, mask, sampling: Sampling, gen) -> Rollout:
        from transformers import DynamicCache

        k = sampling.num_samples
        rid, rmask = ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
        n = rid.shape[0]
        cache = DynamicCache(config=self.model.config)
        pos = (rmask.cumsum(-1) - 1).clamp(min=0)
        state = {"mask": rmask, "pos": pos[:, -1:]}

        import inspect

        keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self.model.forward).parameters else {}

        def fwd(x, m, position):  # the LM head on the last position only, where the model allows it
            o = self.model(input_ids=x, attention_mask=m, position_ids=position, cache=cache, use_cache=True, **keep)
            return o.logits[:, -1].float()

        logits = fwd(rid, rmask, pos)

        def step(tok, t, keep):
            state["mask"] = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], 1)
            state["pos"] = state["pos"] + 1
            return fwd(tok[:, None], state["mask"], state["pos"])

        out, live, lps, done = self._loop(logits, step, n, sampling, gen, compact=False)
        return self._finish(ids, mask, k, out, live, lps, done)


# ------------------------------------------------------------------------- llama2_lit.generation.engine.generate


def generate(model, tokenizer, prompts: Sequence[str | list[dict]], max_new_tokens: int = 32,
             batch_size: int = 32, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             num_return_sequences: int = 1, seed: int | None = None, **engine_kwargs) -> list[list[str]]:
    """``llama2_lit.generation.engine.generate`` on the engine: one list of ``num_return_sequences`` strings per prompt.

    ``batch_size`` counts prompts per engine call (each with its ``num_return_sequences`` samples).
    ``seed`` None draws each batch's seed from the global torch RNG.
    """
    if len(prompts) == 0:
        return []
    engine = Engine(model, tokenizer, **engine_kwargs)
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0, top_p=top_p,
                    num_samples=num_return_sequences)
    out: list[list[str]] = []
    for i, s in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[s:s + batch_size]
        roll = engine.generate(chunk, Sampling(**sampling, seed=None if seed is None else seed + i))
        texts = engine.decode(roll)
        k = num_return_sequences
        out += [texts[j * k:(j + 1) * k] for j in range(len(chunk))]
    return out
