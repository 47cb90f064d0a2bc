"""varlen_attention: non-causal attention over packed sequences (no pad tokens).

q, k, v: [total_tokens, heads, head_dim], possibly strided views of one fused
QKV projection output; cu_seqlens int32 [B+1]; max_seqlen = longest sequence.
Token t of sequence b attends to the tokens of b only.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .checks import check_cu_seqlens, check_float, check_out
from .dispatch import TRITON_IMPORT_ERROR, choose, register


@register("varlen_attention", "torch")
def varlen_attention_torch(q, k, v, cu_seqlens, max_seqlen, scale, out=None):
    """Reference (and the fallback for calls the compiled kernels refuse): scatter into a
    [B, max_seqlen] grid, masked SDPA, gather back. With length-sorted batches the grid wastes little."""
    T, H, D = q.shape
    B = cu_seqlens.numel() - 1
    L = int(max_seqlen)
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(B, device=q.device), lens)
    pos = torch.arange(T, device=q.device) - cu_seqlens[:-1].long()[seq]
    fused = _fused_qkv_view(q, k, v)
    if fused is not None:  # one scatter of the fused projection instead of three
        grid = fused.new_zeros(B, L, 3, H, D)
        grid[seq, pos] = fused
        qg, kg, vg = (grid[:, :, i].transpose(1, 2) for i in range(3))
    else:
        qg, kg, vg = (_to_grid(t, seq, pos, B, L) for t in (q, k, v))
    key_valid = torch.arange(L, device=q.device)[None, :] < lens[:, None]  # [B, L]
    o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=key_valid[:, None, None, :], scale=scale)
    o = o.transpose(1, 2)[seq, pos]  # one gather straight to contiguous [T, H, D]
    return o if out is None else out.copy_(o)


def _to_grid(t, seq, pos, B, L):
    grid = t.new_zeros(B, L, *t.shape[1:])
    grid[seq, pos] = t
    return grid.transpose(1, 2)


def _fused_qkv_view(q, k, v):
    """[T, 3, H, D] view when q, k, v are the three slices of one fused projection output."""
    T, H, D = q.shape
    hd = H * D
    if not (q.stride() == k.stride() == v.stride() == (3 * hd, D, 1)):
        return None
    if q.untyped_storage().data_ptr() != v.untyped_storage().data_ptr():
        return None
    step = hd * q.element_size()
    if k.data_ptr() - q.data_ptr() != step or v.data_ptr() - k.data_ptr() != step:
        return None
    return q.as_strided((T, 3, H, D), (3 * hd, hd, D, 1))


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale=None, backend=None, out=None):
    """softmax(q k^T * scale) v per sequence; returns a contiguous [total_tokens, heads, head_dim]
    (or writes `out`, a [total_tokens, heads, head_dim] buffer that must not overlap q, k, v)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
        if t.dim() != 3:
            raise ValueError(f"{name} must be [total_tokens, heads, head_dim], got shape {tuple(t.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
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
    check_out(out, q.shape, q)
    args = (q, k, v, cu_seqlens, max_seqlen, scale)
    return choose("varlen_attention", q.device, backend, args)(*args, out=out)


if TRITON_IMPORT_ERROR is None:
    import triton
    import triton.language as tl

    @triton.jit
    def _varlen_attention_kernel(
        o_ptr,
        q_ptr,
        k_ptr,
        v_ptr,
        cu_seqlens_ptr,
        stride_ot,
        stride_oh,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        qk_scale,
        DOT_PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """FlashAttention-2 forward for one (query block, head, sequence)."""
        pid_m = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1).to(tl.int64)
        seq = tl.program_id(2).to(tl.int64)
        start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
        seqlen = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64) - start
        # the grid is sized for max_seqlen: blocks past this sequence's end have no work
        if pid_m * BLOCK_M >= seqlen:
            return

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < seqlen
        q = tl.load(
            q_ptr + (start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
            mask=m_mask[:, None], other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
        k_base = k_ptr + start * stride_kt + head * stride_kh
        v_base = v_ptr + start * stride_vt + head * stride_vh

        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for n0 in range(0, seqlen, BLOCK_N):
            n_mask = (n0 + offs_n) < seqlen
            k = tl.load(k_base + (n0 + offs_n)[:, None] * stride_kt + offs_d[None, :], mask=n_mask[:, None], other=0.0)
            v = tl.load(v_base + (n0 + offs_n)[:, None] * stride_vt + offs_d[None, :], mask=n_mask[:, None], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            # scores in log2 units: qk_scale = scale * log2(e), so exp2 gives exp
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            s = tl.where(n_mask[None, :], s, float("-inf"))
            # every block holds >= 1 valid key (n0 < seqlen), so m_new is finite
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        o = acc / l_i[:, None]
        tl.store(
            o_ptr + (start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
            o.to(o_ptr.dtype.element_ty), mask=m_mask[:, None],
        )

    _LOG2E = 1.4426950408889634

    def _triton_refuses(q, k, v, cu_seqlens, max_seqlen, scale):
        if q.shape[-1] not in (16, 32, 64, 128):
            return f"head_dim must be 16, 32, 64 or 128, got {q.shape[-1]}"
        if cu_seqlens.numel() - 1 > 65535:  # CUDA's grid z-dimension limit
            return f"at most 65535 sequences per call, got {cu_seqlens.numel() - 1}"
        return None

    @register("varlen_attention", "triton", devices=("cpu", "cuda"), supports=_triton_refuses)
    def varlen_attention_triton(q, k, v, cu_seqlens, max_seqlen, scale, out=None):
        """out: optional preallocated [T, H, D] output (rows may be strided)."""
        reason = _triton_refuses(q, k, v, cu_seqlens, max_seqlen, scale)
        if reason is not None:
            raise ValueError(f"varlen_attention (triton): {reason}")
        T, H, D = q.shape
        o = torch.empty((T, H, D), dtype=q.dtype, device=q.device) if out is None else out
        B = cu_seqlens.numel() - 1
        # The interpreter's tl.dot multiplies bf16's raw bits (numpy has no
        # bfloat16): there, feed the dots fp32 copies instead.
        upcast = q.dtype == torch.bfloat16 and q.device.type == "cpu"
        # Short batches get short blocks (tl.dot needs >= 16); long ones 128 x 64 tiles.
        BLOCK_M = min(128 if D <= 64 else 64, max(16, triton.next_power_of_2(max_seqlen)))
        BLOCK_N = min(64, BLOCK_M)
        grid = (triton.cdiv(max_seqlen, BLOCK_M), H, B)
        _varlen_attention_kernel[grid](
            o, q, k, v, cu_seqlens,
            o.stride(0), o.stride(1), q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            scale * _LOG2E,
            # fp32 in, fp32 accuracy: no TF32 (as torch's SDPA by default)
            DOT_PRECISION="ieee" if q.dtype == torch.float32 or upcast else "tf32",
            UPCAST=upcast,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=D,
            num_warps=4 if D <= 64 else 8, num_stages=2,
        )
        return o
