"""float_topk: exact top-k by dot product of float32 vectors (float16 inputs are widened).

Scores float32. Contract: topk_common.py; C++ scan: csrc/topk_cpu.cpp (8-wide FMA partial sums, so
the last bits may differ from a BLAS dot); Triton kernel: topk_triton.py (KIND 2, IEEE tl.dot).
"""
from __future__ import annotations

import torch

from .dispatch import TRITON_IMPORT_ERROR, choose, register
from .topk_common import blocked_reference, check_topk_args


@register("float_topk", "torch")
def float_topk_torch(q, db, k, allow):
    """Reference: float32 matmul per database block, stable merges."""
    return blocked_reference(q.float(), db, k, allow, lambda qb, xb: qb @ xb.float().T, torch.float32)


def float_topk(q, db, k, allow=None, backend=None):
    """q [nq, D], db [N, D] (float32 or float16, same dtype) -> (scores float32 [nq, k], row indices
    int64 [nq, k]); allow: optional bool [N]."""
    k = check_topk_args("float_topk", q, db, k, allow, (torch.float32, torch.float16), "dimensions")
    fn = choose("float_topk", db.device, backend)
    if fn is not float_topk_torch:
        q, db = q.float(), db.float()
    return fn(q, db, k, allow)


if TRITON_IMPORT_ERROR is None:
    from .topk_triton import launch_topk

    @register("float_topk", "triton", devices=("cpu", "cuda"))
    def float_topk_triton(q, db, k, allow, out=None, poison=None):
        return launch_topk("float32", q.float(), db.float(), k, allow, torch.float32, out=out, poison=poison)
