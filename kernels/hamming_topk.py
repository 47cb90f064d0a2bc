"""hamming_topk: exact top-k of packed binary codes by 8 * bytes - Hamming distance.

Codes: int8 [n, ceil(dim/8)] as numpy.packbits minus 128 (precision "binary"; "ubinary" uint8
codes work too: XOR is the same). Scores int32. See topk_common.py for the contract; the C++ scan
is csrc/topk_cpu.cpp, the Triton kernel (XOR + popcount on 32-bit words) is below.
"""
from __future__ import annotations

import torch

from .dispatch import TRITON_IMPORT_ERROR, choose, register
from .topk_common import blocked_reference, check_topk_args

_POPCOUNT8 = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)


def _score_block(q, x):
    table = _POPCOUNT8.to(q.device)
    xor = (q.view(torch.uint8).unsqueeze(1) ^ x.view(torch.uint8).unsqueeze(0)).long()
    return 8 * q.shape[1] - table[xor].sum(-1)


@register("hamming_topk", "torch")
def hamming_topk_torch(q, db, k, allow):
    """Reference: blocks of the database, byte XOR + a popcount table, stable merges."""
    return blocked_reference(q, db, k, allow, _score_block, torch.int32)


def hamming_topk(q_codes, db_codes, k, allow=None, backend=None):
    """q_codes [nq, B], db_codes [N, B] (int8 binary or uint8 ubinary codes) -> (scores int32 [nq, k],
    row indices int64 [nq, k]); allow: optional bool [N] (False rows are skipped inside the scan)."""
    k = check_topk_args("hamming_topk", q_codes, db_codes, k, allow, (torch.int8, torch.uint8), "bytes")
    return choose("hamming_topk", db_codes.device, backend)(q_codes, db_codes, k, allow)


if TRITON_IMPORT_ERROR is None:
    from .topk_triton import launch_topk

    def _pad_words(codes: torch.Tensor) -> torch.Tensor:
        n, b = codes.shape
        w = (b + 3) // 4
        if b % 4 == 0 and codes.is_contiguous():
            return codes.view(torch.uint8).view(torch.int32)
        out = torch.zeros(n, 4 * w, dtype=torch.uint8, device=codes.device)
        out[:, :b] = codes.view(torch.uint8)
        return out.view(torch.int32)

    @register("hamming_topk", "triton", devices=("cpu", "cuda"))
    def hamming_topk_triton(q, db, k, allow, out=None, poison=None):
        """Kernel: topk_triton.py (KIND 0: XOR + SWAR popcount of int32 words). out: optional (scores, idx)
        buffers; poison: fill value of the internal partial buffers (tests)."""
        qw, xw = _pad_words(q), _pad_words(db)
        # 8 * bytes - Hamming: padding bytes are zero in both (XOR 0), so subtract their bits back.
        extra_bits = 32 * qw.shape[1] - 8 * q.shape[1]
        return launch_topk("binary", qw, xw, k, allow, torch.int32, score_offset=-extra_bits, out=out, poison=poison)
