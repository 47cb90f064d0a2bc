"""varlen_attention: non-causal attention over packed sequences (no pad tokens).

q, k, v: [total_tokens, heads, head_dim], possibly strided views of one fused
QKV projection output; cu_seqlens int32 [B+1]; max_seqlen = longest sequence.
Token t of sequence b attends to the tokens of b only.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .checks import check_cu_seqlens, check_float
from .dispatch import choose, register


@register("varlen_attention", "torch")
def varlen_attention_torch(q, k, v, cu_seqlens, max_seqlen, scale):
    """Reference (and the CPU fast path): scatter into a [B, heads, max_seqlen, d]
    grid, masked SDPA, gather back. With length-sorted batches the grid wastes
    little, and attention is a small share of a BERT layer's FLOPs."""
    T, H, D = q.shape
    B = cu_seqlens.numel() - 1
    L = int(max_seqlen)
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq_of_token = torch.repeat_interleave(torch.arange(B, device=q.device), lens)
    slot = seq_of_token * L + (torch.arange(T, device=q.device) - cu_seqlens[:-1].long()[seq_of_token])

    def to_grid(t):
        grid = t.new_zeros(B * L, H, D)
        grid[slot] = t
        return grid.view(B, L, H, D).transpose(1, 2)

    key_valid = torch.arange(L, device=q.device)[None, :] < lens[:, None]  # [B, L]
    out = F.scaled_dot_product_attention(
        to_grid(q), to_grid(k), to_grid(v), attn_mask=key_valid[:, None, None, :], scale=scale
    )
    return out.transpose(1, 2).reshape(B * L, H, D)[slot]


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale=None, backend=None):
    """softmax(q k^T * scale) v per sequence; returns a contiguous [total_tokens, heads, head_dim]."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
        if t.dim() != 3:
            raise ValueError(f"{name} must be [total_tokens, heads, head_dim], got shape {tuple(t.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k, v must be contiguous in head_dim (stride(-1) == 1)")
    check_cu_seqlens(cu_seqlens, q.shape[0], q.device)
    max_seqlen = int(max_seqlen)
    if max_seqlen < 1:
        raise ValueError(f"max_seqlen must be >= 1, got {max_seqlen}")
    if cu_seqlens.device.type == "cpu":
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        if longest > max_seqlen:
            raise ValueError(f"max_seqlen={max_seqlen} is shorter than the longest sequence ({longest})")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return choose("varlen_attention", q.device, backend)(q, k, v, cu_seqlens, max_seqlen, scale)
