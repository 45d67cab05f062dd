"""The ``llama`` backend of the engine: the Llama decoder run as a handful of tensor ops straight from the model's own
parameters (:class:`LlamaRunner`), and the fixed-shape decode step that ``compile=True`` compiles (:class:`DecodeStep`).
:func:`llama_supported` says whether a model can run on it. Imports torch only.

Faster than the module tree at the same numbers: q/k/v and gate/up projections fused into one matmul each, RoPE on
q and k at once from a precomputed table, one additive key mask per step, batched-matmul attention for the
single-token step on CPU; no mask builders, logits processors or stopping criteria per step.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


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


class LlamaRunner:
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


class DecodeStep(torch.nn.Module):
    """One fixed-shape decode step over the whole static cache (what ``compile=True`` compiles).

    Inputs ``tok`` (N,), ``pos`` (N,), ``slot`` (1,); the cache and the additive key mask ``bias`` (N, S) are
    tensors owned by the step and mutated in place, so a CUDA graph sees the same addresses every step.
    """

    def __init__(self, runner: LlamaRunner, cache, bias: torch.Tensor):
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
