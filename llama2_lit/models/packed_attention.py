"""``sdpa`` that runs packed rows one document at a time (a varlen path for CPU and GPU alike).

For a packed batch (``position_ids`` restarting inside rows, no attention mask, no KV cache) transformers builds
a dense ``(B, 1, T, T)`` block-diagonal mask and SDPA then computes all ``T x T`` scores of every row, most of
them masked: with 256-token rows of ~20-token examples, over 90% of the attention work is thrown away. Here the
tokens are permuted so that documents of equal length sit side by side, each such group is one dense
``(documents, length)`` batch attended with ``is_causal=True`` and no mask (the fast SDPA kernel, no padding),
and the outputs are permuted back: the same numbers, with the attention cost of the documents alone.

Registered as ``sdpa_packed`` in transformers' attention and mask interfaces; ``load_causal_lm`` uses it for
``attn_implementation: sdpa``. Every batch that is not packed goes to transformers' own ``sdpa`` unchanged.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_packed"


class PackedRows:
    """Mask placeholder for a packed batch: the documents are found from ``position_ids`` on first use; the
    dense ``sdpa`` mask is built only if an attention call cannot take the per-document path."""

    def __init__(self, mask_kwargs: dict):
        self.mask_kwargs = mask_kwargs
        self.docs: Documents | None = None
        self._dense = None

    def dense(self):
        if self._dense is None:
            self._dense = sdpa_mask(**self.mask_kwargs)
        return self._dense


class Documents(NamedTuple):
    order: torch.Tensor   # (B*T,) token indices, documents grouped by length (longest first), each in order
    inverse: torch.Tensor  # (B*T,) where each token went: order[inverse] = arange(B*T)
    groups: list[tuple[int, int]]  # (length, number of documents) per group, in ``order``'s order
    count: int            # number of documents


def documents(position_ids: torch.Tensor) -> Documents:
    """Documents of packed rows, as transformers splits them: a new one wherever ``position_ids`` do not step by 1.

    position_ids: (B, T). Returns a permutation of the B*T tokens that lays documents of equal length side by
    side, so that each group is a dense ``(documents, length)`` batch: no padding anywhere.
    """
    b, t = position_ids.shape
    step = torch.diff(position_ids, dim=-1) != 1
    starts = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=position_ids.device), step], dim=-1)
    first = starts.reshape(-1).nonzero().squeeze(1)                       # (N,) first token of each document
    lengths = torch.diff(first, append=first.new_tensor([b * t]))         # (N,)
    by_len = torch.argsort(lengths, descending=True, stable=True)
    lengths, first = lengths[by_len], first[by_len]
    order = torch.repeat_interleave(first - (torch.cumsum(lengths, 0) - lengths), lengths) + torch.arange(
        b * t, device=position_ids.device)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(b * t, device=order.device)
    size, count = torch.unique_consecutive(lengths, return_counts=True)
    return Documents(order, inverse, list(zip(size.tolist(), count.tolist())), len(lengths))


class _Permute(torch.autograd.Function):
    """Rows of ``x`` in the order ``index`` (a permutation); the gradient goes back through ``inverse``
    (cheaper than ``index_select``'s backward, which zero-fills and scatter-adds)."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        is_causal=None, **kwargs):
    """transformers attention function: per-document SDPA for ``PackedRows``, else transformers' ``sdpa``.

    query: (B, H, T, D); key, value: (B, H_kv, T, D). Returns ((B, T, H, D), None) like ``sdpa_attention_forward``.
    """
    packed = isinstance(attention_mask, PackedRows)
    if packed and attention_mask.docs is None and kwargs.get("position_ids") is not None:
        attention_mask.docs = documents(kwargs["position_ids"].expand(query.shape[0], -1))  # once per forward
    d = attention_mask.docs if packed else None
    llama = getattr(getattr(module, "config", None), "model_type", None) == "llama"
    if (d is None or d.count == query.shape[0] or not llama or getattr(module, "sliding_window", None)
            or kwargs.get("output_attentions")):
        # not packed after all (one document per row), or a model whose mask may be more than causal-per-document
        mask = attention_mask.dense() if packed else attention_mask
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    b, h, t, dim = query.shape
    sizes = [n * length for length, n in d.groups]

    def grouped(x):  # (B, H, T, D) -> one (documents, H, length, D) batch per group
        x = _Permute.apply(x.transpose(1, 2).reshape(b * t, h, dim), d.order, d.inverse)
        return [g.view(n, length, h, dim).transpose(1, 2) for g, (length, n) in zip(x.split(sizes), d.groups)]

    outs = [F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True)
            .transpose(1, 2).reshape(-1, h, dim)
            for q, k, v in zip(grouped(query), grouped(repeat_kv(key, groups)), grouped(repeat_kv(value, groups)))]
    out = _Permute.apply(torch.cat(outs), d.inverse, d.order)
    return out.view(b, t, h, dim), None


def packed_sdpa_mask(**kwargs):
    """transformers mask function: a ``PackedRows`` placeholder where transformers builds a packed-sequence mask.

    transformers detects packing only with no 2D attention mask and no cache, and then forbids the causal skip;
    with no 2D mask, no offset and equal lengths, a Llama forbids it for nothing else. ``packed_sdpa_forward``
    takes the per-document path only for Llama layers and rows that hold several documents; otherwise it builds
    the ``sdpa`` mask from these same arguments. Everything else gets the ``sdpa`` mask at once.
    """
    q_offset = kwargs.get("q_offset", 0)
    if (kwargs.get("attention_mask") is None and not kwargs.get("allow_is_causal_skip", True)
            and kwargs["q_length"] == kwargs["kv_length"] > 1 and kwargs.get("kv_offset", 0) == 0
            and not isinstance(q_offset, torch.Tensor) and q_offset == 0):
        return PackedRows(kwargs)
    return sdpa_mask(**kwargs)


AttentionInterface.register(NAME, packed_sdpa_forward)
AttentionMaskInterface.register(NAME, packed_sdpa_mask)
