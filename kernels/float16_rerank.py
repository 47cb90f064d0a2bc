"""float16_rerank: the k best of each query's candidate rows by the float32 dot product with the
rows' float16 vectors; the last stage of a rescored search (EmbeddingIndex.search(..., rescore=r)).

q float32 [nq, D], vectors float16 [N, D], cand int64 [nq, P] (rows of vectors, -1 = none, as a scan
pads) -> (scores float32 [nq, k], rows int64 [nq, k]), best first, ties by the lower row, -inf / -1
past the candidates; a NaN score (an inf * 0 term) ranks last. The C++ kernel (csrc/rerank_cpu.cpp)
gathers and converts the rows as it reads them; its builds sum in their own lane orders, so scores
match the float64 reference to float32 rounding (tests/test_rerank.py), not bit for bit.
"""
from __future__ import annotations

import torch

from . import _ext
from .dispatch import choose, register


def float16_rerank(q, vectors, cand, k, backend=None):
    op = "float16_rerank"
    for name, t, dtype in (("q", q, torch.float32), ("vectors", vectors, torch.float16), ("cand", cand, torch.int64)):
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != 2:
            raise TypeError(f"{op}: {name} must be a 2-D {dtype} tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if q.shape[1] != vectors.shape[1]:
        raise ValueError(f"{op}: queries have {q.shape[1]} dimensions but the vectors have {vectors.shape[1]}")
    if cand.shape[0] != q.shape[0]:
        raise ValueError(f"{op}: cand must have one row per query ({q.shape[0]}), got {cand.shape[0]}")
    if len({q.device, vectors.device, cand.device}) != 1:
        raise ValueError(f"{op}: q, vectors and cand must be on one device")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{op}: k must be an int >= 1, got {k!r}")
    if cand.numel() and bool(((cand < -1) | (cand >= vectors.shape[0])).any()):
        raise ValueError(f"{op}: cand rows must be in [-1, {vectors.shape[0]})")
    nq, P = cand.shape
    if nq == 0 or P == 0 or vectors.shape[0] == 0:
        return (torch.full((nq, k), float("-inf"), device=q.device),
                torch.full((nq, k), -1, dtype=torch.int64, device=q.device))
    return choose(op, q.device, backend)(q, vectors, cand, k)


@register("float16_rerank", "torch")
def float16_rerank_torch(q, vectors, cand, k):
    """Reference: gather, one einsum in float32, sort by row then stably by score (ties by row)."""
    valid = cand >= 0
    vec = vectors[cand.clamp(min=0)].float()  # [nq, P, D]
    s = torch.einsum("qd,qkd->qk", q, vec)
    s = s.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf")).masked_fill(~valid, float("-inf"))
    key = torch.where(valid, cand, torch.full_like(cand, 2**62))
    o1 = torch.argsort(key, dim=1, stable=True)
    o2 = torch.argsort(torch.gather(s, 1, o1), dim=1, descending=True, stable=True)
    order = torch.gather(o1, 1, o2)[:, :k]
    rows = torch.gather(cand, 1, order)
    sc = torch.gather(s, 1, order)
    rows = rows.masked_fill(~torch.gather(valid, 1, order), -1)
    if rows.shape[1] < k:
        pad = k - rows.shape[1]
        rows = torch.cat([rows, torch.full((rows.shape[0], pad), -1, dtype=rows.dtype, device=rows.device)], 1)
        sc = torch.cat([sc, torch.full((sc.shape[0], pad), float("-inf"), device=sc.device)], 1)
    return sc, rows


def float16_rerank_cpp(q, vectors, cand, k, out=None):
    """csrc/rerank_cpu.cpp. out: optional (scores float32, rows int64) [nq, k] buffers (tests poison them)."""
    q = q if q.stride(1) == 1 else q.contiguous()
    vectors = vectors if vectors.stride(1) == 1 else vectors.contiguous()
    cand = cand.contiguous()
    nq, P = cand.shape
    if out is None:
        out = (torch.empty(nq, k, dtype=torch.float32), torch.empty(nq, k, dtype=torch.int64))
    _ext._C.float16_rerank_cpu(q.data_ptr(), nq, q.stride(0) if nq > 1 else q.shape[1], vectors.data_ptr(),
                               vectors.shape[0], vectors.stride(0) if vectors.shape[0] > 1 else vectors.shape[1],
                               q.shape[1], cand.data_ptr(), P, k, out[0].data_ptr(), out[1].data_ptr(),
                               torch.get_num_threads())
    return out


if _ext._C is not None:
    register("float16_rerank", "cpp", devices=("cpu",))(float16_rerank_cpp)
