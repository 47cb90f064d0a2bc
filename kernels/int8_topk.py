"""int8_topk: exact top-k of int8 codes by sum_d (q_d - z_d)(x_d - z_d), computed as an integer.

z: int8 [D], the code of 0.0 in each dimension under the quantization ranges (None: all zeros,
i.e. the raw dot product). The kernels compute the raw integer dot q.x plus a per-row correction
bias[row] = z.z - z.x (int32 [N], db_bias= lets a caller cache it) and add the per-query constant
-z.q afterwards: (q - z).(x - z) = q.x - z.x - z.q + z.z. Scores int32. Contract: topk_common.py;
C++ scan: csrc/topk_cpu.cpp; Triton kernel: topk_triton.py (KIND 1, tl.dot int8 -> int32).
"""
from __future__ import annotations

import torch

from .dispatch import TRITON_IMPORT_ERROR, choose, register
from .topk_common import INT_LOWEST, blocked_reference, check_topk_args


def int8_row_bias(db_codes: torch.Tensor, zero_codes: torch.Tensor | None) -> torch.Tensor | None:
    """bias[row] = z.z - z.x (int32 [N]); None when z is None."""
    if zero_codes is None:
        return None
    z = zero_codes.to(db_codes.device, torch.float64)
    return (float(z @ z) - db_codes.double() @ z).round().to(torch.int32)


def _query_constant(q, zero_codes):
    """z.q per query (int64 [nq]); on CPU in numpy: a torch op here would wake torch's thread pool,
    whose spinning then slows the next scan's threads (2-core machine)."""
    if zero_codes is None:
        return None
    if q.device.type == "cpu":
        import numpy as np

        return torch.from_numpy(q.numpy().astype(np.int64) @ zero_codes.cpu().numpy().astype(np.int64))
    return (q.double() @ zero_codes.to(q.device, torch.float64)).round().to(torch.int64)


@register("int8_topk", "torch")
def int8_topk_torch(q, db, k, allow, zero_codes=None, db_bias=None):
    """Reference: (q - z).(x - z) in float64 (exact: |sum| < 2^53), blocks, stable merges."""
    z = None if zero_codes is None else zero_codes.to(q.device, torch.float64)

    def score(qb, xb):
        qd, xd = qb.double(), xb.double()
        if z is not None:
            qd, xd = qd - z, xd - z
        return (qd @ xd.T).round().long()

    return blocked_reference(q, db, k, allow, score, torch.int32)


def _finish(scores, idx, q, zero_codes):
    """Add the per-query constant -z.q to the raw kernels' scores (missing candidates stay lowest)."""
    c = _query_constant(q, zero_codes)
    if c is None:
        return scores, idx
    s = (scores.long() - c[:, None]).to(torch.int32)
    return s.masked_fill(idx < 0, INT_LOWEST), idx


def int8_topk(q_codes, db_codes, k, zero_codes=None, allow=None, backend=None, db_bias=None):
    """q_codes int8 [nq, D], db_codes int8 [N, D] -> (scores int32 [nq, k], row indices int64 [nq, k]).

    zero_codes: int8 [D] (the code of 0.0 per dimension) or None; allow: optional bool [N];
    db_bias: optional precomputed int8_row_bias(db_codes, zero_codes)."""
    k = check_topk_args("int8_topk", q_codes, db_codes, k, allow, (torch.int8,), "dimensions")
    D = db_codes.shape[1]
    if D > 16384:
        raise ValueError(f"int8_topk: dim {D} is too large (int32 scores need dim <= 16384)")
    if zero_codes is not None:
        zero_codes = torch.as_tensor(zero_codes)
        if zero_codes.dtype != torch.int8 or tuple(zero_codes.shape) != (D,):
            raise ValueError(f"int8_topk: zero_codes must be int8 [{D}], got {zero_codes.dtype} "
                             f"{tuple(zero_codes.shape)}")
    fn = choose("int8_topk", db_codes.device, backend)
    if fn is int8_topk_torch:
        return fn(q_codes, db_codes, k, allow, zero_codes)
    if db_bias is None:
        db_bias = int8_row_bias(db_codes, zero_codes)
    elif tuple(db_bias.shape) != (db_codes.shape[0],) or db_bias.dtype != torch.int32:
        raise ValueError(f"int8_topk: db_bias must be int32 [{db_codes.shape[0]}]")
    s, i = fn(q_codes, db_codes, k, allow, db_bias)
    return _finish(s, i, q_codes, zero_codes)


if TRITON_IMPORT_ERROR is None:
    from .topk_triton import launch_topk

    @register("int8_topk", "triton", devices=("cpu", "cuda"))
    def int8_topk_triton(q, db, k, allow, db_bias=None, out=None, poison=None):
        """Raw q.x + db_bias[row] (the launcher adds the per-query constant)."""
        bias = None if db_bias is None else db_bias.to(db.device).contiguous()
        return launch_topk("int8", q, db, k, allow, torch.int32, bias=bias, out=out, poison=poison)
