"""sign_dot_topk: exact top-k of packed sign codes by an int8 query, sum_d q_d * s_d.

The asymmetric first stage of binary search (EmbeddingIndex.search(..., rescore=r)): the database
keeps one sign bit per dimension, the query keeps its magnitudes (quantized to int8), so
s_d = +1 where bit d is set, -1 where it is not. The score is an exact integer (int32): no
quantization of the query's side is lost to a second binarization, which is what makes it a much
better candidate generator than 8 * bytes - Hamming (measured in bench/search.py).

q: int8 [nq, 8 * B] in [-127, 127] (symmetric int8; -128 is refused); db: [N, B] codes of
precision "ubinary" (uint8: numpy.packbits of x > 0, dimension 8 i + t is bit 7 - t of byte i) or
"binary" (int8: ubinary - 128, i.e. the top bit of every byte inverted). For binary codes the
launcher negates the query at the dimensions of those top bits (q_d s_d = -q_d s'_d for the
inverted sign s'), so every backend scans raw bits; that negation is why -128 is refused. A
dimension count that is not a multiple of 8: pad the queries with zeros (a zero adds nothing).
Contract (ties by row, allow inside the scan, -1 rows with INT32_MIN): topk_common.py. C++ scan:
csrc/topk_cpu.cpp (kind sign-dot: bit planes + popcount in the baseline build, bits expanded to
bytes + vpmaddubsw in the AVX2 one). Triton kernel: topk_triton.py (KIND 3, bits unpacked to +1/-1 int8 on load, int8 tl.dot), so far run only under
the interpreter (no GPU measured).
"""
from __future__ import annotations

import torch

from . import _ext, cpp_ops
from .dispatch import TRITON_IMPORT_ERROR, choose, register
from .topk_common import blocked_reference, check_k_allow, check_matrices

# bit 7 - t of a byte is dimension t of its 8 (numpy.packbits, MSB first)
_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)
# |score| <= 128 * D and partial sums of integers stay exact in float32 below 2^24
_MAX_DIM = 1 << 17


def unpack_signs(codes: torch.Tensor) -> torch.Tensor:
    """Packed raw bits [n, B] (uint8) -> float32 [n, 8 B] of +1 (bit set) / -1."""
    bits = (codes.unsqueeze(-1) >> _SHIFTS.to(codes.device)) & 1
    return bits.reshape(codes.shape[0], -1).float() * 2 - 1


@register("sign_dot_topk", "torch")
def sign_dot_topk_torch(q, db, k, allow):
    """Reference: blocks of the database unpacked to +-1 floats, one matmul (exact: integers below
    2^24), stable merges. Takes raw bits (uint8 codes; the launcher folds binary's offset into q)."""
    qf = q.float()
    return blocked_reference(q, db, k, allow, lambda qb, xb: qf @ unpack_signs(xb).T, torch.int32,
                             row_elems=8 * db.shape[1])


def check_sign_bit_rows(op: str, q, db) -> None:
    """Queries of D dimensions against database rows of D sign bits packed in D/8 bytes (also rabitq's)."""
    if q.shape[1] != 8 * db.shape[1]:
        raise ValueError(f"{op}: queries have {q.shape[1]} dimensions but the database rows have {db.shape[1]} "
                         f"bytes = {8 * db.shape[1]} sign bits (pad the queries with zeros to a multiple of 8)")
    if q.shape[1] > _MAX_DIM:
        raise ValueError(f"{op}: {q.shape[1]} dimensions is too many (at most {_MAX_DIM})")


def _check(q, db, k, allow):
    op = "sign_dot_topk"
    check_matrices(op, q, (torch.int8,), db, (torch.int8, torch.uint8), "bytes")
    check_sign_bit_rows(op, q, db)
    k = check_k_allow(op, db, k, allow)
    # (numpy on the CPU: a torch reduction this size wakes torch's OpenMP pool, see raw_bit_query)
    if q.numel() and bool(((q.numpy() if q.device.type == "cpu" else q) == -128).any()):
        raise ValueError(f"{op}: queries must be symmetric int8 in [-127, 127], got -128")
    return k


def raw_bit_query(q: torch.Tensor, db: torch.Tensor):
    """(q, db) for a scan of raw bits: binary (int8) codes are ubinary with the top bit of every byte
    inverted, s'_d = -s_d there, so q_d s_d = (-q_d) s'_d: negate those query dimensions instead of
    touching the database (q in [-127, 127], so the negation fits int8)."""
    if db.dtype == torch.uint8:
        return q, db
    if q.device.type == "cpu":
        # numpy: a torch copy of this size runs on torch's OpenMP pool, whose threads then spin for
        # milliseconds and take the cores from the scan's std::threads that follow (measured: a
        # gated scan of 256 queries x 100k rows took 7.9 ms on 2 threads, as long as on one, until this)
        a = q.numpy().copy()
        a[:, ::8] = -a[:, ::8]
        return torch.from_numpy(a), db.view(torch.uint8)
    q = q.clone()
    q[:, ::8] = -q[:, ::8]
    return q, db.view(torch.uint8)


def sign_dot_topk(q_int8, db_codes, k, allow=None, backend=None):
    """q_int8 int8 [nq, 8 B], db_codes [N, B] (int8 binary or uint8 ubinary) -> (scores int32 [nq, k],
    row indices int64 [nq, k]) by sum_d q_d * (bit d set ? +1 : -1); allow: optional bool [N]."""
    k = _check(q_int8, db_codes, k, allow)
    fn = choose("sign_dot_topk", db_codes.device, backend)
    return fn(*raw_bit_query(q_int8, db_codes), k, allow)


def sign_dot_rerank(q_int8, db_codes, cand, k, backend=None):
    """The k best of each query's candidate rows by the same exact score as sign_dot_topk, best first,
    ties by the lower row; cand int64 [nq, P] (rows of db_codes; -1 = no candidate, as a scan pads).
    Returns (scores int32 [nq, k], rows int64 [nq, k]), -1 rows with INT32_MIN past the candidates.
    The second stage of a pre-filtered search (EmbeddingIndex: Hamming top P, then this). Both
    backends score a candidate through a per-query byte table, T[b, v] = the sum of q over the set
    bits of byte value v at byte b: B lookups instead of 8 B multiply-adds (exact integers)."""
    _check(q_int8, db_codes, 1, None)
    if cand.dim() != 2 or cand.shape[0] != q_int8.shape[0] or cand.dtype != torch.int64:
        raise ValueError(f"sign_dot_rerank: cand must be int64 [nq={q_int8.shape[0]}, P], got "
                         f"{cand.dtype} {tuple(cand.shape)}")
    if bool(((cand < -1) | (cand >= db_codes.shape[0])).any()):
        raise ValueError(f"sign_dot_rerank: cand rows must be in [-1, {db_codes.shape[0]})")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"sign_dot_rerank: k must be >= 1, got {k!r}")
    if cand.device != db_codes.device or q_int8.device != db_codes.device:
        raise ValueError("sign_dot_rerank: q_int8, db_codes and cand must be on one device")
    q, db = raw_bit_query(q_int8, db_codes)
    if q.shape[0] == 0 or cand.shape[1] == 0:
        return (torch.full((q.shape[0], k), -(1 << 31), dtype=torch.int32, device=db.device),
                torch.full((q.shape[0], k), -1, dtype=torch.int64, device=db.device))
    return choose("sign_dot_rerank", db.device, backend)(q, db, cand, k)


@register("sign_dot_rerank", "torch")
def sign_dot_rerank_torch(q, db, cand, k):
    """Reference: the byte table by one matmul (sums of integers below 2^24 in float32: exact), a
    gather per candidate byte, one int64 key (score desc, row asc) for torch.topk."""
    nq, P = cand.shape
    B = db.shape[1]
    bits = ((torch.arange(256, device=db.device)[:, None] >> _SHIFTS.to(db.device).long()) & 1).float()  # [256, 8]
    table = (q.float().view(nq, B, 8) @ bits.T).reshape(nq, B * 256)  # T[j, b * 256 + v]
    valid = cand >= 0
    rows = db[cand.clamp(min=0)].long()  # [nq, P, B] byte values
    lookup = (rows + torch.arange(B, device=db.device) * 256).reshape(nq, P * B)
    ub = torch.gather(table, 1, lookup).view(nq, P, B).sum(-1)  # sum of q_d over the set bits
    score = (2 * ub - q.float().sum(1, keepdim=True)).round().long()
    # score desc, then row asc, in one int64 key (|score| < 2^24, rows < 2^38); no candidate: lowest
    key = torch.where(valid, score * (1 << 38) + ((1 << 38) - 1 - cand), torch.full_like(score, -(1 << 63)))
    m = min(k, P)
    top = torch.topk(key, m, dim=1, largest=True, sorted=True).indices
    out_rows = torch.where(torch.gather(valid, 1, top), torch.gather(cand, 1, top), torch.full_like(top, -1))
    out_s = torch.where(out_rows >= 0, torch.gather(score, 1, top), torch.full_like(top, -(1 << 31))).to(torch.int32)
    if m < k:
        pad = k - m
        out_rows = torch.cat([out_rows, torch.full((nq, pad), -1, dtype=torch.int64, device=cand.device)], 1)
        out_s = torch.cat([out_s, torch.full((nq, pad), -(1 << 31), dtype=torch.int32, device=cand.device)], 1)
    return out_s, out_rows


def sign_dot_rerank_cpp(q, db, cand, k):
    """csrc/topk_cpu.cpp signdot_rerank_cpu: the byte table per query, threads over queries."""
    q = q.contiguous()
    db = db if db.stride(1) == 1 else db.contiguous()
    cand = cand.contiguous()
    nq, P = cand.shape
    out = (torch.empty(nq, k, dtype=torch.int32), torch.empty(nq, k, dtype=torch.int64))
    _ext._C.signdot_rerank_cpu(q.data_ptr(), nq, q.shape[1], db.data_ptr(), db.shape[0],
                               db.stride(0) if db.shape[0] > 1 else db.shape[1], db.shape[1], cand.data_ptr(), P, k,
                               out[0].data_ptr(), out[1].data_ptr(), torch.get_num_threads())
    return out


def sign_dot_topk_cpp(q, db, k, allow, out=None):
    """csrc/topk_cpu.cpp's scan (kind sign-dot) of raw bits (see raw_bit_query). out: optional
    (scores int32, idx int64) [nq, k] buffers that get every element written (the tests poison them)."""
    return cpp_ops._topk_cpp("sign_dot", q, db, k, allow, out=out)


if _ext._C is not None:
    register("sign_dot_topk", "cpp", devices=("cpu",))(sign_dot_topk_cpp)
    register("sign_dot_rerank", "cpp", devices=("cpu",))(sign_dot_rerank_cpp)


if TRITON_IMPORT_ERROR is None:
    from .topk_triton import launch_topk

    @register("sign_dot_topk", "triton", devices=("cpu", "cuda"))
    def sign_dot_topk_triton(q, db, k, allow, out=None, poison=None):
        """Raw bits (see raw_bit_query); out / poison as hamming_topk_triton (tests)."""
        return launch_topk("sign_dot", q, db.view(torch.uint8), k, allow, torch.int32, out=out, poison=poison)
