"""Shared parts of the exact top-k scans (hamming_topk.py, int8_topk.py, float_topk.py, sign_dot_topk.py).

Contract of every backend: (scores [nq, k], idx int64 [nq, k]) on the queries' device, best
first, ties broken by the lower database row, rows with allow[row] False never considered
(pre-filtering inside the scan); fewer than k candidates: the rest of the row has idx -1 and the
lowest score (INT32_MIN for the integer scores, -inf for float). No backend materializes the
full [nq, N] score matrix: the database is scored block by block and each block reduced to a
per-query partial top-k (`merge` below joins partial results).
"""
from __future__ import annotations

import torch

INT_LOWEST = -(2**31)  # the score of a missing candidate, integer scans
# Rows of the database scored at once by the torch reference / per Triton launch: bounded memory.
REF_BLOCK_ELEMS = 1 << 22


def lowest(dtype: torch.dtype):
    return float("-inf") if dtype.is_floating_point else INT_LOWEST


def check_topk_args(op: str, q, db, k, allow, dtypes: tuple, cols_name: str):
    """Validate the launcher arguments; returns k as int."""
    check_matrices(op, q, dtypes, db, dtypes, cols_name)
    if q.dtype != db.dtype:
        raise TypeError(f"{op}: queries are {q.dtype} but the database is {db.dtype}")
    if q.shape[1] != db.shape[1]:
        raise ValueError(f"{op}: queries have {q.shape[1]} {cols_name} but the database rows have {db.shape[1]}")
    return check_k_allow(op, db, k, allow)


def check_matrices(op: str, q, q_dtypes: tuple, db, db_dtypes: tuple, cols_name: str) -> None:
    """Queries and database: 2-D tensors of an accepted dtype on one device, a non-empty database."""
    for name, t, dtypes in (("queries", q, q_dtypes), ("database", db, db_dtypes)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in dtypes:
            raise TypeError(f"{op}: {name} must be {' or '.join(map(str, dtypes))}, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D, got shape {tuple(t.shape)}")
    if q.device != db.device:
        raise ValueError(f"{op}: queries are on {q.device} but the database is on {db.device}")
    if db.shape[0] == 0:
        raise ValueError(f"{op}: the database is empty")
    if db.shape[1] == 0:
        raise ValueError(f"{op}: rows have no {cols_name}")


def check_k_allow(op: str, db, k, allow):
    """Validate k (int in [1, N]) and allow (bool [N] on db's device); returns k as int."""
    if isinstance(k, bool) or not isinstance(k, int):
        try:
            import numpy as np

            if not isinstance(k, np.integer) or isinstance(k, np.bool_):
                raise TypeError
        except TypeError:
            raise TypeError(f"{op}: k must be an int, got {type(k).__name__}") from None
    k = int(k)
    if not 1 <= k <= db.shape[0]:
        raise ValueError(f"{op}: k must be in [1, {db.shape[0]}] (the database rows), got {k}")
    if allow is not None:
        if not isinstance(allow, torch.Tensor) or allow.dtype != torch.bool:
            raise TypeError(f"{op}: allow must be a bool torch.Tensor [N], got "
                            f"{getattr(allow, 'dtype', type(allow).__name__)}")
        if tuple(allow.shape) != (db.shape[0],):
            raise ValueError(f"{op}: allow must have shape ({db.shape[0]},), got {tuple(allow.shape)}")
        if allow.device != db.device:
            raise ValueError(f"{op}: allow is on {allow.device} but the database is on {db.device}")
    return k


def merge(scores: torch.Tensor, idx: torch.Tensor, k: int):
    """Candidates [nq, M] (idx -1 = none) -> the best k per row by (score desc, idx asc), padded."""
    nq, m = scores.shape
    low = lowest(scores.dtype)
    valid = idx >= 0
    key_i = torch.where(valid, idx, torch.full_like(idx, 2**62))
    order = torch.argsort(key_i, dim=1, stable=True)  # by idx first ...
    s64 = scores.double().masked_fill(~valid, float("-inf"))
    s_sorted = torch.gather(s64, 1, order)
    order2 = torch.argsort(s_sorted, dim=1, descending=True, stable=True)  # ... then by score, stably
    final = torch.gather(order, 1, order2)[:, :k]
    out_s = torch.gather(scores, 1, final)
    out_i = torch.gather(idx, 1, final)
    if m < k:
        pad = k - m
        out_s = torch.cat([out_s, torch.full((nq, pad), low, dtype=scores.dtype, device=scores.device)], 1)
        out_i = torch.cat([out_i, torch.full((nq, pad), -1, dtype=idx.dtype, device=idx.device)], 1)
    bad = out_i < 0
    if bool(bad.any()):
        out_s = out_s.masked_fill(bad, low)
    return out_s, out_i


def blocked_reference(q, db, k, allow, score_block, out_dtype, row_elems=None):
    """The torch reference scan: score_block(q, db_rows) -> [nq, rows] scores (exact), blocks of the
    database reduced to a per-query top-k and merged, so memory stays bounded. row_elems: elements
    score_block materializes per database row (default db.shape[1]; sign_dot unpacks 8 per byte)."""
    nq, N = q.shape[0], db.shape[0]
    if nq == 0:
        return (torch.empty(0, k, dtype=out_dtype, device=q.device), torch.empty(0, k, dtype=torch.int64,
                                                                                 device=q.device))
    per_row = db.shape[1] if row_elems is None else row_elems
    block = max(1, REF_BLOCK_ELEMS // max(1, nq * db.shape[1], per_row))
    best_s = torch.empty(nq, 0, dtype=out_dtype, device=q.device)
    best_i = torch.empty(nq, 0, dtype=torch.int64, device=q.device)
    for r0 in range(0, N, block):
        rows = torch.arange(r0, min(N, r0 + block), device=q.device)
        if allow is not None:
            rows = rows[allow[r0:r0 + block]]
            if rows.numel() == 0:
                continue
        s = score_block(q, db[rows]).to(out_dtype)
        cand_s = torch.cat([best_s, s], 1)
        cand_i = torch.cat([best_i, rows.unsqueeze(0).expand(nq, -1)], 1)
        best_s, best_i = merge(cand_s, cand_i, min(k, cand_s.shape[1]))
    return merge(best_s, best_i, k)
