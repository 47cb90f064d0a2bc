"""hamming_kth_score: per query the k-th best binary score (8 * bytes - Hamming, hamming_topk's score)
over the allowed rows, int32 [nq]; INT32_MIN where fewer than k rows are allowed.

The gates of binary search's Hamming pre-filter (EmbeddingIndex.search(..., prefilter=f)): the score
of rank ~ f * k * r / stride in a sample of every stride-th row, which about f * k * r rows of the
index reach. Only the score is needed, not the rows, so the C++ kernel (csrc/topk_cpu.cpp
hamming_kth_cpu) keeps a histogram of the scores above a rising floor per query instead of a top-k
of rows. Codes as hamming_topk: binary int8 or ubinary uint8, queries and rows of one precision.
"""
from __future__ import annotations

import torch

from . import _ext
from .dispatch import choose, register
from .hamming_topk import hamming_topk_torch
from .topk_common import INT_LOWEST, check_matrices


def hamming_kth_score(q_codes, db_codes, k, allow=None, backend=None):
    op = "hamming_kth_score"
    check_matrices(op, q_codes, (torch.int8, torch.uint8), db_codes, (torch.int8, torch.uint8), "bytes")
    if q_codes.dtype != db_codes.dtype or q_codes.shape[1] != db_codes.shape[1]:
        raise ValueError(f"{op}: queries {q_codes.dtype} [{q_codes.shape[1]} bytes] do not match the database "
                         f"{db_codes.dtype} [{db_codes.shape[1]} bytes]")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{op}: k must be an int >= 1, got {k!r}")
    if allow is not None and (not isinstance(allow, torch.Tensor) or allow.dtype != torch.bool
                              or tuple(allow.shape) != (db_codes.shape[0],)):
        raise ValueError(f"{op}: allow must be a bool tensor [{db_codes.shape[0]}]")
    if q_codes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int32, device=q_codes.device)
    return choose(op, db_codes.device, backend)(q_codes, db_codes, k, allow)


@register("hamming_kth_score", "torch")
def hamming_kth_score_torch(q, db, k, allow):
    """Reference: the k-th score of hamming_topk's reference (k clipped to the rows; fewer: INT32_MIN)."""
    n = db.shape[0] if allow is None else int(allow.sum())
    if n < k:
        return torch.full((q.shape[0],), INT_LOWEST, dtype=torch.int32, device=q.device)
    return hamming_topk_torch(q, db, k, allow)[0][:, k - 1].contiguous()


def hamming_kth_score_cpp(q, db, k, allow, out=None):
    """csrc/topk_cpu.cpp hamming_kth_cpu; rows may be strided (a sample view is read in place)."""
    q = q.contiguous()
    db = db if db.stride(1) == 1 else db.contiguous()
    out = torch.empty(q.shape[0], dtype=torch.int32) if out is None else out
    allow_u8 = None if allow is None else allow.contiguous().view(torch.uint8)
    _ext._C.hamming_kth_cpu(q.data_ptr(), q.shape[0], q.shape[1], db.data_ptr(), db.shape[0],
                            db.stride(0) if db.shape[0] > 1 else db.shape[1], db.shape[1],
                            0 if allow_u8 is None else allow_u8.data_ptr(), k, out.data_ptr(), torch.get_num_threads())
    return out


if _ext._C is not None:
    register("hamming_kth_score", "cpp", devices=("cpu",))(hamming_kth_score_cpp)
