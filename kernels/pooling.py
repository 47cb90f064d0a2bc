"""pool_normalize: packed hidden states [total_tokens, D] -> one embedding per sequence.

mean or CLS pooling, optional L2 normalization, then the requested precision
(quantize.py's formulas), so a fused kernel writes only the final bytes.
"""
from __future__ import annotations

import torch

from .checks import check_cu_seqlens, check_float, check_precision, check_ranges
from .dispatch import choose, register
from .quantize import quantize_torch

POOL_MODES = ("mean", "cls")
NORM_EPS = 1e-12  # as torch.nn.functional.normalize (sentence-transformers' Normalize)


@register("pool_normalize", "torch")
def pool_normalize_torch(hidden, cu_seqlens, mode, normalize, precision, ranges):
    """Reference: fp32 accumulation, one pass of torch ops per step."""
    x = hidden.float()
    starts = cu_seqlens[:-1].long()
    if mode == "cls":
        pooled = x[starts]
    else:
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        seq_of_token = torch.repeat_interleave(torch.arange(lens.numel(), device=x.device), lens)
        pooled = torch.zeros(lens.numel(), x.shape[1], dtype=torch.float32, device=x.device)
        pooled.index_add_(0, seq_of_token, x)
        pooled /= lens.unsqueeze(1).to(torch.float32)
    if normalize:
        pooled = pooled / pooled.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    return quantize_torch(pooled, precision, ranges)


def pool_normalize(hidden, cu_seqlens, mode="mean", normalize=True, precision="float32", ranges=None, backend=None):
    """hidden [total_tokens, D] float, cu_seqlens int32 [B+1] -> [B, D] (or [B, ceil(D/8)] for binary)."""
    check_float("hidden", hidden)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [total_tokens, D], got shape {tuple(hidden.shape)}")
    if mode not in POOL_MODES:
        raise ValueError(f"unknown pooling mode {mode!r}; valid: {', '.join(POOL_MODES)}")
    check_precision(precision)
    check_cu_seqlens(cu_seqlens, hidden.shape[0], hidden.device)
    r = check_ranges(ranges, hidden.shape[1], hidden.device) if precision in ("int8", "uint8") else None
    fn = choose("pool_normalize", hidden.device, backend)
    return fn(hidden, cu_seqlens, mode, bool(normalize), precision, r)
