"""The Triton tile kernel shared by hamming_topk / int8_topk / float_topk / sign_dot_topk (imported
only with Triton).

One program scores a [BQ queries, BN database rows] tile (KIND 0: XOR + popcount of int32 words;
1: int8 tl.dot with int32 accumulation + a per-row int32 bias; 2: float32 tl.dot in IEEE
precision; 3: int8 queries against packed sign bits, unpacked on load to +1/-1 int8 and tl.dot
with int32 accumulation: exact), drops disallowed / out-of-range rows, and reduces the tile to its per-query top-K
(K rounds of max + lowest index among the maxima) written to partial [nq, blocks, K] buffers.
The launcher goes over the database in chunks of bounded size and merges the partials
(topk_common.merge), so the [nq, N] score matrix never exists.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .topk_common import INT_LOWEST, merge

_KIND = {"binary": 0, "int8": 1, "float32": 2, "sign_dot": 3}
CHUNK_ELEMS = 1 << 22  # nq * rows per launch: bounds the partial buffers
# In-kernel marker of "no candidate" for float scores: finite (no -inf constant in the generated code);
# the launcher's merge turns every idx -1 entry into -inf.
FLOAT_LOW = -3.0e38


@triton.jit
def _popc32(x):
    # SWAR popcount of 32-bit words (runs on every backend and under the interpreter)
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) >> 24) & 0xFF


@triton.jit
def _topk_tile_kernel(q_ptr, x_ptr, bias_ptr, allow_ptr, ps_ptr, pi_ptr, nq, N, row0, C, score_offset, nblocks,
                      KIND: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALLOW: tl.constexpr, K: tl.constexpr,
                      BQ: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr, LOW: tl.constexpr):
    pid_q = tl.program_id(0)
    pid_n = tl.program_id(1)
    rq = pid_q * BQ + tl.arange(0, BQ)
    rn = row0 + pid_n * BN + tl.arange(0, BN)
    qmask = rq < nq
    nmask = rn < N
    if KIND == 0:
        acc = tl.zeros((BQ, BN), dtype=tl.int32)
        for c0 in range(0, C, BC):
            cc = c0 + tl.arange(0, BC)
            qw = tl.load(q_ptr + rq[:, None].to(tl.int64) * C + cc[None, :], mask=qmask[:, None] & (cc[None, :] < C),
                         other=0)
            xw = tl.load(x_ptr + rn[:, None].to(tl.int64) * C + cc[None, :], mask=nmask[:, None] & (cc[None, :] < C),
                         other=0)
            acc += tl.sum(_popc32(qw[:, None, :] ^ xw[None, :, :]), axis=2)
        s = C * 32 - acc + score_offset
    elif KIND == 1:
        acc = tl.zeros((BQ, BN), dtype=tl.int32)
        for c0 in range(0, C, BC):
            cc = c0 + tl.arange(0, BC)
            qv = tl.load(q_ptr + rq[:, None].to(tl.int64) * C + cc[None, :], mask=qmask[:, None] & (cc[None, :] < C),
                         other=0)
            xv = tl.load(x_ptr + rn[None, :].to(tl.int64) * C + cc[:, None], mask=nmask[None, :] & (cc[:, None] < C),
                         other=0)
            acc += tl.dot(qv, xv, out_dtype=tl.int32)
        s = acc
        if HAS_BIAS:
            s += tl.load(bias_ptr + rn, mask=nmask, other=0)[None, :]
    elif KIND == 3:
        # C = query dimensions = 8 * bytes per row; x is uint8 [N, C // 8] of raw bits, MSB first
        acc = tl.zeros((BQ, BN), dtype=tl.int32)
        for c0 in range(0, C, BC):
            cc = c0 + tl.arange(0, BC)
            qv = tl.load(q_ptr + rq[:, None].to(tl.int64) * C + cc[None, :], mask=qmask[:, None] & (cc[None, :] < C),
                         other=0)
            xbyte = tl.load(x_ptr + rn[None, :].to(tl.int64) * (C // 8) + cc[:, None] // 8,
                            mask=nmask[None, :] & (cc[:, None] < C), other=0).to(tl.int32)
            sign = (((xbyte >> (7 - cc[:, None] % 8)) & 1) * 2 - 1).to(tl.int8)  # [BC, BN] of +1 / -1
            acc += tl.dot(qv, sign, out_dtype=tl.int32)  # masked-off dims: q = 0, so they add nothing
        s = acc
    else:
        acc = tl.zeros((BQ, BN), dtype=tl.float32)
        for c0 in range(0, C, BC):
            cc = c0 + tl.arange(0, BC)
            qv = tl.load(q_ptr + rq[:, None].to(tl.int64) * C + cc[None, :], mask=qmask[:, None] & (cc[None, :] < C),
                         other=0.0)
            xv = tl.load(x_ptr + rn[None, :].to(tl.int64) * C + cc[:, None], mask=nmask[None, :] & (cc[:, None] < C),
                         other=0.0)
            acc += tl.dot(qv, xv, input_precision="ieee")
        s = acc
    ok = nmask
    if HAS_ALLOW:
        ok = ok & (tl.load(allow_ptr + rn, mask=nmask, other=0) != 0)
    s = tl.where(ok[None, :], s, LOW)
    idx = tl.broadcast_to(rn[None, :], (BQ, BN))
    out_base = (rq.to(tl.int64) * nblocks + pid_n) * K
    for t in range(K):
        m = tl.max(s, axis=1)
        j = tl.min(tl.where(s == m[:, None], idx, 2147483647), axis=1)
        found = (m != LOW) & (j < N)
        tl.store(ps_ptr + out_base + t, tl.where(found, m, LOW), mask=qmask)
        tl.store(pi_ptr + out_base + t, tl.where(found, j, -1).to(tl.int64), mask=qmask)
        s = tl.where(idx == j[:, None], LOW, s)


def launch_topk(kind, q, x, k, allow, out_dtype, *, bias=None, score_offset=0, out=None, poison=None):
    """q [nq, C], x [N, C] (binary: int32 words; int8: int8; float32: float32; sign_dot: x uint8 [N, C / 8]
    raw bits) -> merged top-k."""
    nq, C = q.shape
    N = x.shape[0]
    dev = x.device
    q, x = q.contiguous(), x.contiguous()
    if kind == "binary":
        BQ, BN, BC = 16, 32, 8
    else:
        BQ, BN, BC = 16, 64, 32
    K = min(k, BN)
    chunk = max(BN, (CHUNK_ELEMS // max(1, nq)) // BN * BN)
    allow_u8 = allow.to(torch.uint8).contiguous() if allow is not None else None
    best_s = torch.empty(nq, 0, dtype=out_dtype, device=dev)
    best_i = torch.empty(nq, 0, dtype=torch.int64, device=dev)
    for r0 in range(0, N, chunk):
        rows = min(chunk, N - r0)
        nblocks = triton.cdiv(rows, BN)
        make = (lambda d: torch.full((nq, nblocks, K), poison, dtype=d, device=dev)) if poison is not None else (
            lambda d: torch.empty((nq, nblocks, K), dtype=d, device=dev))
        ps, pi = make(out_dtype), make(torch.int64)
        grid = (triton.cdiv(nq, BQ), nblocks)
        _topk_tile_kernel[grid](q, x, bias if bias is not None else q, allow_u8 if allow_u8 is not None else q, ps,
                                pi, nq, min(N, r0 + rows), r0, C, score_offset, nblocks, KIND=_KIND[kind],
                                HAS_BIAS=bias is not None, HAS_ALLOW=allow is not None, K=K, BQ=BQ, BN=BN, BC=BC,
                                LOW=FLOAT_LOW if out_dtype.is_floating_point else INT_LOWEST)
        cand_s = torch.cat([best_s, ps.view(nq, -1)], 1)
        cand_i = torch.cat([best_i, pi.view(nq, -1)], 1)
        best_s, best_i = merge(cand_s, cand_i, min(k, cand_s.shape[1]))
    s, i = merge(best_s, best_i, k)
    if out is not None:
        out[0].copy_(s)
        out[1].copy_(i)
        return out
    return s, i
