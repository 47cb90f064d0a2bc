"""rabitq_topk: exact top-k of RaBitQ estimates, float(a_r * (b_i * S) + c_r + d_i).

The scan of an EmbeddingIndex of precision "rabitq" (postembed_fast/search/rabitq.py makes the codes,
factors and queries): S = sum_d q_d * (bit d of row r set ? +1 : -1) is the exact integer sign-dot of
sign_dot_topk.py (an int8 query in [-127, 127] against packed bits, numpy.packbits order, raw bits:
uint8 codes), and the estimate of <q, x> applies
  row_scale a_r (float32 [N]), row_add c_r (float32 [N]): the row's correction factors,
  q_scale b_i (float64 [nq]), q_add d_i (float64 [nq]): the query's,
in float64, one rounding per operation in that order (((b_i * S) * a_r) + c_r) + d_i), then rounded
to float32. Every backend evaluates exactly these operations, so the scores are equal bit for bit to
a numpy float64 evaluation of the formula; the ranking is by the float32 score, ties by the lower row.
Contract otherwise as topk_common.py (allow inside the scan, -1 rows with -inf). C++ scan:
csrc/topk_cpu.cpp kind 4 (the sign-dot tile of both builds, then csrc/rabitq_cpu.cpp).
"""
from __future__ import annotations

import torch

from . import _ext
from .dispatch import choose, register
from .sign_dot_topk import check_sign_bit_rows, unpack_signs
from .topk_common import blocked_reference, check_k_allow, check_matrices


def rabitq_estimate(s: torch.Tensor, q_scale, q_add, row_scale, row_add) -> torch.Tensor:
    """float32 scores [nq, n] of integer sign-dots s [nq, n] (any exact dtype) with the queries'
    float64 [nq] and the rows' float32 [n] factors: the module's formula, in float64."""
    t = q_scale.double()[:, None] * s.double()
    u = row_scale.double()[None, :] * t
    v = u + row_add.double()[None, :]
    return (v + q_add.double()[:, None]).float()


@register("rabitq_topk", "torch")
def rabitq_topk_torch(q, db, k, allow, q_scale, q_add, row_scale, row_add):
    """Reference: blocks of rows unpacked to +-1 floats, the sign-dot by one float32 matmul (exact:
    integers below 2^24), the estimate in float64, stable merges."""
    qf = q.float()
    rows = torch.arange(db.shape[0], device=db.device)[:, None]  # the blocks see row numbers

    def score(_, r):
        r = r[:, 0]
        s = qf @ unpack_signs(db[r]).T
        return rabitq_estimate(s, q_scale, q_add, row_scale[r], row_add[r])

    return blocked_reference(q, rows, k, allow, score, torch.float32, row_elems=8 * db.shape[1])


def _check(q, db, k, allow, q_scale, q_add, row_scale, row_add):
    op = "rabitq_topk"
    check_matrices(op, q, (torch.int8,), db, (torch.uint8,), "bytes")
    check_sign_bit_rows(op, q, db)
    k = check_k_allow(op, db, k, allow)
    for name, t, n, dtype in (("q_scale", q_scale, q.shape[0], torch.float64), ("q_add", q_add, q.shape[0], torch.float64),
                              ("row_scale", row_scale, db.shape[0], torch.float32),
                              ("row_add", row_add, db.shape[0], torch.float32)):
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != (n,) or t.device != db.device:
            raise ValueError(f"{op}: {name} must be a {dtype} tensor [{n}] on {db.device}, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if q.numel() and bool((q == -128).any()):
        raise ValueError(f"{op}: queries must be symmetric int8 in [-127, 127], got -128")
    return k


def rabitq_topk(q_int8, db_bits, k, q_scale, q_add, row_scale, row_add, allow=None, backend=None):
    """q_int8 int8 [nq, 8 B], db_bits uint8 [N, B] (raw sign bits), q_scale / q_add float64 [nq],
    row_scale / row_add float32 [N] -> (scores float32 [nq, k], row indices int64 [nq, k]); allow:
    optional bool [N]."""
    k = _check(q_int8, db_bits, k, allow, q_scale, q_add, row_scale, row_add)
    fn = choose("rabitq_topk", db_bits.device, backend)
    return fn(q_int8, db_bits, k, allow, q_scale, q_add, row_scale, row_add)


def rabitq_topk_cpp(q, db, k, allow, q_scale, q_add, row_scale, row_add, out=None):
    """csrc/topk_cpu.cpp's scan (kind 4). out: optional (scores float32, idx int64) [nq, k] buffers
    that get every element written (the tests poison them)."""
    nq, N, cols = q.shape[0], db.shape[0], db.shape[1]
    if out is None:
        out = (torch.empty(nq, k, dtype=torch.float32), torch.empty(nq, k, dtype=torch.int64))
    if nq == 0:
        return out
    q = q if (q.stride(1) == 1 and (nq == 1 or q.stride(0) >= q.shape[1])) else q.contiguous()
    db = db if (db.stride(1) == 1 and (N == 1 or db.stride(0) >= cols)) else db.contiguous()
    allow_u8 = None if allow is None else allow.contiguous().view(torch.uint8)
    qs, qa, rs, ra = (t.contiguous() for t in (q_scale, q_add, row_scale, row_add))
    _ext._C.rabitq_topk_cpu(q.data_ptr(), nq, q.stride(0) if nq > 1 else q.shape[1], db.data_ptr(), N,
                            db.stride(0) if N > 1 else cols, cols, rs.data_ptr(), ra.data_ptr(), qs.data_ptr(),
                            qa.data_ptr(), 0 if allow_u8 is None else allow_u8.data_ptr(), k, out[0].data_ptr(),
                            out[1].data_ptr(), torch.get_num_threads())
    return out


if _ext._C is not None and hasattr(_ext._C, "rabitq_topk_cpu"):
    register("rabitq_topk", "cpp", devices=("cpu",))(rabitq_topk_cpp)
