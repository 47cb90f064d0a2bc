"""pool_normalize: packed hidden states [total_tokens, D] -> one embedding per sequence.

mean or CLS pooling, optional L2 normalization, then the requested precision
(quantize.py's formulas), so a fused kernel writes only the final bytes.
"""
from __future__ import annotations

import torch

from .checks import check_cu_seqlens, check_float, check_ranges
from .dispatch import TRITON_IMPORT_ERROR, choose, register
from .precision import precision_spec
from .quantize import empty_output, quantize_torch

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
    spec = precision_spec(precision)
    check_cu_seqlens(cu_seqlens, hidden.shape[0], hidden.device)
    r = check_ranges(ranges, hidden.shape[1], hidden.device) if spec.needs_ranges else None
    fn = choose("pool_normalize", hidden.device, backend)
    return fn(hidden, cu_seqlens, mode, bool(normalize), precision, r)


if TRITON_IMPORT_ERROR is None:
    import triton
    import triton.language as tl

    from .quantize import block_d, precision_flags, store_precision

    @triton.jit
    def _pool_normalize_kernel(
        out_ptr,
        hidden_ptr,
        cu_seqlens_ptr,
        lo_ptr,
        hi_ptr,
        out_row_stride,
        hidden_row_stride,
        n_cols,
        MEAN: tl.constexpr,
        NORMALIZE: tl.constexpr,
        QUANTIZE: tl.constexpr,
        PACKED: tl.constexpr,
        SIGNED: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        seq = tl.program_id(0).to(tl.int64)
        start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        col_mask = cols < n_cols
        if MEAN:
            end = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64)
            # [BLOCK_T, BLOCK_D] tiles of tokens, summed in fp32
            acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
            for t0 in range(start, end, BLOCK_T):
                toks = t0 + tl.arange(0, BLOCK_T)
                ptrs = hidden_ptr + toks[:, None] * hidden_row_stride + cols[None, :]
                acc += tl.load(ptrs, mask=(toks[:, None] < end) & col_mask[None, :], other=0.0).to(tl.float32)
            x = tl.math.div_rn(tl.sum(acc, axis=0), (end - start).to(tl.float32))
        else:  # cls: the sequence's first token
            x = tl.load(hidden_ptr + start * hidden_row_stride + cols, mask=col_mask, other=0.0).to(tl.float32)
        if NORMALIZE:
            # sqrt_rn / div_rn: IEEE results, so quantized codes match the reference
            norm = tl.sqrt_rn(tl.sum(x * x, axis=0))
            x = tl.math.div_rn(x, tl.maximum(norm, 1e-12))
        store_precision(out_ptr + seq * out_row_stride, x, lo_ptr, hi_ptr, n_cols, QUANTIZE, PACKED, SIGNED, BLOCK_D)

    @register("pool_normalize", "triton", devices=("cpu", "cuda"))
    def pool_normalize_triton(hidden, cu_seqlens, mode, normalize, precision, ranges, out=None):
        """out: test-only preallocated output (tests pass a sentinel-filled buffer)."""
        if hidden.stride(-1) != 1:
            hidden = hidden.contiguous()
        B, D = cu_seqlens.numel() - 1, hidden.shape[1]
        y = empty_output(B, D, precision, hidden.device) if out is None else out
        BLOCK_D = block_d(D)
        lo, hi = (hidden, hidden) if ranges is None else (ranges[0].contiguous(), ranges[1].contiguous())
        # ~8K fp32 accumulators per program: enough tokens per step to hide load latency
        BLOCK_T = max(1, min(32, 8192 // BLOCK_D))
        _pool_normalize_kernel[(B,)](
            y, hidden, cu_seqlens, lo, hi, y.stride(0), hidden.stride(0), D,
            MEAN=mode == "mean", NORMALIZE=normalize, **precision_flags(precision),
            BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D,
        )
        return y
