"""The generation engine: batched sampling of K responses per prompt, for evaluation, RS, PPO and pair collection.

    engine = Engine(model, tokenizer)
    out = engine.generate(["What is 2 + 3?"], Sampling(max_new_tokens=24, temperature=1.0, num_samples=4, seed=0))
    out.response_ids      # (N, T), N = prompts x K: rows i*K .. i*K + K - 1 answer prompt i
    engine.decode(out)    # N strings, special tokens stripped
    engine.generate_text(prompts, Sampling(temperature=0.0), batch_size=64)  # many prompts: [[text] per prompt]

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

Sampling rules, log-probs and prompt encoding: ``sampling.py``; the ``llama`` backend's decoder: ``llama_decode.py``.

The ``hf`` backend (any causal LM; ``backend="auto"`` picks it for non-Llama architectures or RoPE types whose
table depends on the sequence length) runs ``model(...)`` with a ``DynamicCache`` under the same loop,
sampler and outputs.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Sequence

import torch
from transformers import DynamicCache

from llama2_lit.errors import UserError
from llama2_lit.generation.llama_decode import DecodeStep, LlamaRunner, llama_supported
from llama2_lit.core.progress import progress
from llama2_lit.generation.sampling import (Rollout, Sampling, encode_prompts, left_pad,  # noqa: F401 (re-exported)
                                            sample_tokens, top_p_filter)


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

    def generate_text(self, prompts: Sequence[str | list[dict]], sampling: Sampling = Sampling(),
                      batch_size: int = 32, desc: str | None = None) -> list[list[str]]:
        """The decoded responses, ``num_samples`` per prompt, generated ``batch_size`` prompts per call.

        Call ``i`` is seeded ``sampling.seed + i``; with ``seed=None`` each call draws its seed from the global torch
        RNG (greedy calls too), so ``seed_everything`` makes a run reproducible. ``desc``: show the calls' progress
        under that name (``llama2_lit.core.progress``: a bar on a terminal, a few log lines elsewhere).
        """
        k, out = sampling.num_samples, []
        starts = list(range(0, len(prompts), batch_size))
        for i, s in enumerate(starts if desc is None else progress(starts, desc, unit="batch")):
            chunk = prompts[s:s + batch_size]
            seed = None if sampling.seed is None else sampling.seed + i
            texts = self.decode(self.generate(chunk, dataclasses.replace(sampling, seed=seed)))
            out += [texts[j * k:(j + 1) * k] for j in range(len(chunk))]
        return out

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

    def _runner(self, dtype: torch.dtype | None = None) -> LlamaRunner:
        """The decoder over the model's parameters (``dtype``: over copies in that dtype); rebuilt only when a
        parameter changed (the fused projections are copies: an optimizer step, which bumps the parameters'
        versions, refreshes them)."""
        sig = (dtype, *((p.data_ptr(), p._version) for p in self.model.parameters()))
        if self._runner_cache is None or self._runner_cache[0] != sig:
            self._runner_cache = None  # free the previous copies first
            self._runner_cache = (sig, LlamaRunner(self.model, fuse=self.fuse, dtype=dtype))
        return self._runner_cache[1]

    def _static_step(self, r: LlamaRunner, n: int, s: int):
        """``(step module, compiled step)`` for N rows and S cache columns, kept across calls for this runner."""
        key = (id(r), n, s)
        if self._static is None or self._static[0] != key:
            self._static = None  # free the previous buffers first
            step_mod = DecodeStep(r, r.new_cache(n, s), torch.full((n, s), float("-inf"), dtype=r.dtype,
                                                                     device=r.device))
            mode = "reduce-overhead" if r.device.type == "cuda" else None
            self._static = (key, step_mod, torch.compile(step_mod, mode=mode, fullgraph=True, dynamic=False))
        return self._static[1], self._static[2]

    def _run_hf(self, ids, mask, sampling: Sampling, gen) -> Rollout:
        k = sampling.num_samples
        rid, rmask = ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
        n = rid.shape[0]
        cache = DynamicCache(config=self.model.config)
        pos = (rmask.cumsum(-1) - 1).clamp(min=0)
        state = {"mask": rmask, "pos": pos[:, -1:]}
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
