"""gated_sign_dot_topk: the sign-dot top-k (sign_dot_topk.py) over the rows that pass a per-query
Hamming gate only: row r is a candidate of query i iff 8 * B - Hamming(q_bits[i], db[r]) >= gate[i].

The Hamming pre-filter of binary search with rescore (EmbeddingIndex.search(..., prefilter=f)),
fused: the C++ scan scores each tile by Hamming (the binary scan's scorer, the cheap one) and scores
the few rows that pass the gate by the exact int8 x sign-bit dot right away, while they are in cache.
The gate is a fixed number per query (the index derives it from a sample of the rows: the Hamming
score expected to keep about f * k * r rows), so the result does not depend on thread count or row
order: exactly the top-k by (sign-dot desc, row asc) of the passing, allowed rows.

q_int8 int8 [nq, 8 B] as sign_dot_topk (raw-bit convention, see raw_bit_query), q_bits [nq, B]
codes of db's precision (binary int8 or ubinary uint8: XOR is the same), gate int32 [nq].
Contract as every scan (topk_common.py): -1 rows with INT32_MIN past the candidates.
"""
from __future__ import annotations

import torch

from . import _ext
from .dispatch import choose, register
from .hamming_topk import _score_block as hamming_block
from .sign_dot_topk import _check, raw_bit_query, unpack_signs
from .topk_common import INT_LOWEST, blocked_reference

_FAILED = -(1 << 40)  # the reference's score of a row that fails the gate: below every sign-dot score


def gated_sign_dot_topk(q_int8, q_bits, db_codes, gate, k, allow=None, backend=None):
    """-> (scores int32 [nq, k], rows int64 [nq, k]), best first, ties by the lower row."""
    op = "gated_sign_dot_topk"
    k = _check(q_int8, db_codes, k, allow)
    if not isinstance(q_bits, torch.Tensor) or q_bits.dtype != db_codes.dtype or \
            tuple(q_bits.shape) != (q_int8.shape[0], db_codes.shape[1]):
        raise ValueError(f"{op}: q_bits must be {db_codes.dtype} [{q_int8.shape[0]}, {db_codes.shape[1]}] (codes "
                         f"like the database's), got {getattr(q_bits, 'dtype', type(q_bits).__name__)} "
                         f"{tuple(getattr(q_bits, 'shape', ()))}")
    if not isinstance(gate, torch.Tensor) or gate.dtype != torch.int32 or tuple(gate.shape) != (q_int8.shape[0],):
        raise ValueError(f"{op}: gate must be int32 [{q_int8.shape[0]}], got "
                         f"{getattr(gate, 'dtype', type(gate).__name__)} {tuple(getattr(gate, 'shape', ()))}")
    if len({t.device for t in (q_int8, q_bits, db_codes, gate)}) != 1:
        raise ValueError(f"{op}: q_int8, q_bits, db_codes and gate must be on one device")
    q, db = raw_bit_query(q_int8, db_codes)
    if q.shape[0] == 0:
        return (torch.empty(0, k, dtype=torch.int32, device=db.device),
                torch.empty(0, k, dtype=torch.int64, device=db.device))
    return choose(op, db.device, backend)(q, q_bits.view(torch.uint8), db, gate, k, allow)


@register("gated_sign_dot_topk", "torch")
def gated_sign_dot_topk_torch(q, q_bits, db, gate, k, allow):
    """Reference: per block, the Hamming scores and the sign-dot scores (as the two references
    compute them); a row failing the gate scores _FAILED, below every real score, so it is returned
    only where fewer than k rows pass, and then as -1."""
    qf = q.float()

    def block(qb, xb):
        s = (qf @ unpack_signs(xb).T).round().long()
        return torch.where(hamming_block(q_bits, xb) >= gate[:, None].long(), s, torch.full_like(s, _FAILED))

    s, rows = blocked_reference(q, db, k, allow, block, torch.int64, row_elems=8 * db.shape[1])
    failed = (s <= _FAILED) | (rows < 0)
    return (s.masked_fill(failed, INT_LOWEST).to(torch.int32), rows.masked_fill(failed, -1))


def gated_sign_dot_topk_cpp(q, q_bits, db, gate, k, allow, out=None):
    """csrc/topk_cpu.cpp (kind 5). out: optional (scores int32, rows int64) [nq, k] buffers (tests poison them)."""
    q = q.contiguous()
    q_bits, gate = q_bits.contiguous(), gate.contiguous()
    db = db if db.stride(1) == 1 else db.contiguous()
    nq = q.shape[0]
    if out is None:
        out = (torch.empty(nq, k, dtype=torch.int32), torch.empty(nq, k, dtype=torch.int64))
    allow_u8 = None if allow is None else allow.contiguous().view(torch.uint8)
    _ext._C.gated_signdot_topk_cpu(q.data_ptr(), nq, q.shape[1], q_bits.data_ptr(), gate.data_ptr(), db.data_ptr(),
                                   db.shape[0], db.stride(0) if db.shape[0] > 1 else db.shape[1], db.shape[1],
                                   0 if allow_u8 is None else allow_u8.data_ptr(), k, out[0].data_ptr(),
                                   out[1].data_ptr(), torch.get_num_threads())
    return out


if _ext._C is not None:
    register("gated_sign_dot_topk", "cpp", devices=("cpu",))(gated_sign_dot_topk_cpp)
