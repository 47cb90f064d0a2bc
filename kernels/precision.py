"""The output precisions: every fact about each one, in one table.

Everything else reads this table: the launchers (output buffers, which precisions
need ranges), the Triton kernels (the compile-time code), the C++/CUDA kernels (the
same integer codes: csrc/embedding_math.h `PrecisionCode`, exported by the bindings as
`_C.PRECISION_CODES`; tests/test_precision.py checks the two agree) and the Embedder.

Formulas (kernels/quantize.py has the reference):
  uint8:   q = clip(floor((x - min) / ((max - min) / 255) + 0.5), 0, 255), fp32, IEEE division
  int8:    q_uint8 - 128
  ubinary: bit = x > 0, 8 per byte, most significant bit first (numpy.packbits), [B, ceil(D/8)]
  binary:  ubinary - 128 as int8 (sentence-transformers' convention)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Precision:
    name: str
    code: int  # shared with C++ (PrecisionCode) and the Triton kernels' constexpr
    torch_dtype: torch.dtype
    packed_bits: bool  # one bit per dimension, 8 dimensions per byte
    needs_ranges: bool  # per-dimension (min, max) calibration ranges

    @property
    def numpy_dtype(self) -> np.dtype:
        return _NUMPY[self.torch_dtype]

    def columns(self, dim: int) -> int:
        """Output columns for `dim`-dimensional embeddings."""
        return (dim + 7) // 8 if self.packed_bits else dim

    def row_bytes(self, dim: int) -> int:
        return self.columns(dim) * self.torch_dtype.itemsize


_NUMPY = {torch.float32: np.dtype(np.float32), torch.float16: np.dtype(np.float16),
          torch.int8: np.dtype(np.int8), torch.uint8: np.dtype(np.uint8)}

TABLE: dict[str, Precision] = {p.name: p for p in (
    Precision("float32", 0, torch.float32, packed_bits=False, needs_ranges=False),
    Precision("float16", 1, torch.float16, packed_bits=False, needs_ranges=False),
    Precision("int8", 2, torch.int8, packed_bits=False, needs_ranges=True),
    Precision("uint8", 3, torch.uint8, packed_bits=False, needs_ranges=True),
    Precision("binary", 4, torch.int8, packed_bits=True, needs_ranges=False),
    Precision("ubinary", 5, torch.uint8, packed_bits=True, needs_ranges=False),
)}
PRECISIONS = tuple(TABLE)


def precision_spec(name) -> Precision:
    """The table entry for a user's precision argument, or a ValueError naming the valid ones."""
    spec = TABLE.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"unknown precision {name!r}; valid: {', '.join(PRECISIONS)}")
    return spec
