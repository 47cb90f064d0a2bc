"""quantize_embeddings: float embeddings [B, D] -> the requested precision.

Formulas (shared by every backend; the C++/CUDA/Triton kernels repeat exactly
this op order so codes agree except at exact rounding ties):
  uint8:   q = clip(floor((x - min) / ((max - min) / 255) + 0.5), 0, 255)
  int8:    q_uint8 - 128
  ubinary: bit = x > 0, packed 8 per byte, most significant bit first
           (numpy.packbits order; the last byte is zero-padded), [B, ceil(D/8)]
  binary:  ubinary - 128 as int8 (sentence-transformers' convention)
"""
from __future__ import annotations

import torch

from .checks import check_float, check_precision, check_ranges
from .dispatch import choose, register

_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)


@register("quantize_embeddings", "torch")
def quantize_torch(x: torch.Tensor, precision: str, ranges: torch.Tensor | None) -> torch.Tensor:
    """Reference. x: float [B, D]; ranges: float32 [2, D] (only for int8/uint8)."""
    if precision == "float32":
        return x.float()
    if precision == "float16":
        return x.to(torch.float16)
    x = x.float()
    if precision in ("uint8", "int8"):
        lo, hi = ranges[0], ranges[1]
        step = (hi - lo) / 255.0
        q = torch.floor((x - lo) / step + 0.5).clamp_(0, 255)
        return q.to(torch.uint8) if precision == "uint8" else (q - 128).to(torch.int8)
    # binary / ubinary
    B, D = x.shape
    nbytes = (D + 7) // 8
    bits = torch.zeros(B, nbytes * 8, dtype=torch.int32, device=x.device)
    bits[:, :D] = (x > 0).to(torch.int32)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.int32, device=x.device)
    packed = (bits.view(B, nbytes, 8) * weights).sum(-1)
    return packed.to(torch.uint8) if precision == "ubinary" else (packed - 128).to(torch.int8)


def quantize_embeddings(emb, precision: str, ranges=None, backend: str | None = None):
    """Quantize float embeddings computed elsewhere: numpy in -> numpy out, torch in -> torch out.

    ranges: [2, D] per-dimension (min, max); needed for int8/uint8 only."""
    import numpy as np

    check_precision(precision)
    is_numpy = isinstance(emb, np.ndarray)
    x = torch.from_numpy(np.ascontiguousarray(emb)) if is_numpy else emb
    check_float("embeddings", x)
    if x.dim() != 2:
        raise ValueError(f"embeddings must be 2-D [N, D], got shape {tuple(x.shape)}")
    r = check_ranges(ranges, x.shape[1], x.device) if precision in ("int8", "uint8") else None
    out = choose("quantize_embeddings", x.device, backend)(x, precision, r)
    return out.cpu().numpy() if is_numpy else out
