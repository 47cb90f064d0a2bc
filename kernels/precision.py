"""The precisions: every fact about each one, in one table.

Everything else reads this table: the launchers (output buffers, which precisions need ranges),
the Triton kernels (their compile-time flags), the C++/CUDA kernels (the same integer codes:
csrc/embedding_math.h `kStoreKernels`, exported by the bindings as `_C.PRECISION_CODES` and
`_C.PRECISION_KERNELS`; tests/test_precision.py checks the two agree; the sizes reach them as
arguments), the Embedder, and the system parts on top: which EmbeddingIndex precision holds a
precision's codes and which top-k op scans them (search/index.py), the stored bytes (nearline/store.py),
the backfill's Arrow column (backfill/rows.py).

Formulas (kernels/quantize.py has the reference):
  uint8:   q = clip(floor((x - min) / ((max - min) / 255) + 0.5), 0, 255), fp32, IEEE division
  int8:    q_uint8 - 128
  ubinary: bit = x > 0, 8 per byte, most significant bit first (numpy.packbits), [B, ceil(D/8)]
  binary:  ubinary - 128 as int8 (sentence-transformers' convention)
Integer codes are thus an unsigned code u in [0, 255] plus the row's `code_offset` (0 or -128).
Bytes: row-major, little-endian (`wire_dtype`), exactly what embed() returns per row.

Index-only precisions (code None: no store kernel, not an output of embed(), not in PRECISIONS) are
EmbeddingIndex encodings of float vectors that need more than a quantizer:
  rabitq:  1 bit per dimension of (x - c) R (R a seeded random rotation, c a centroid), packed as
           ubinary, plus per-vector correction factors the index keeps beside the codes
           (postembed_fast/search/rabitq.py); scanned by rabitq_topk.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# The exact top-k ops (kernels/<op>.py) an index can scan its codes with
SCAN_OPS = ("hamming_topk", "int8_topk", "float_topk", "rabitq_topk")


@dataclass(frozen=True)
class Precision:
    name: str
    # the compiled store kernel: csrc PrecisionCode, also the Triton kernels' selector; None: an
    # index-only precision (EmbeddingIndex encodes float vectors itself; embed() cannot output it)
    code: int | None
    torch_dtype: torch.dtype
    packed_bits: bool  # one bit per dimension, 8 dimensions per byte
    needs_ranges: bool  # per-dimension (min, max) calibration ranges
    # the EmbeddingIndex precision that holds these codes (itself, or the signed form of an unsigned one)
    index_precision: str
    code_offset: int = 0  # integer codes: the unsigned code u in [0, 255] + code_offset (-128: the signed forms)
    scan: str | None = None  # an index precision: the top-k op (SCAN_OPS) that scans its codes; else None
    row_factors: int = 0  # index-only: float32 correction factors stored after each row's codes

    @property
    def is_output(self) -> bool:
        """An output precision of embed() (a store kernel writes it), not an index-only one."""
        return self.code is not None

    @property
    def is_float(self) -> bool:
        """Float vectors (a rounding cast), not integer codes."""
        return self.torch_dtype.is_floating_point

    @property
    def numpy_dtype(self) -> np.dtype:
        return _NUMPY[self.torch_dtype]

    @property
    def wire_dtype(self) -> np.dtype:
        """The stored bytes' dtype: numpy_dtype, little-endian."""
        return self.numpy_dtype.newbyteorder("<")

    @property
    def index(self) -> Precision:
        """The table entry of index_precision."""
        return TABLE[self.index_precision]

    def columns(self, dim: int) -> int:
        """Output columns for `dim`-dimensional embeddings."""
        return (dim + 7) // 8 if self.packed_bits else dim

    def row_bytes(self, dim: int) -> int:
        return self.columns(dim) * self.torch_dtype.itemsize + 4 * self.row_factors

    def index_columns(self, dim: int) -> int:
        """Columns of an EmbeddingIndex row: the codes, then the row factors' bytes (in code elements)."""
        return self.columns(dim) + 4 * self.row_factors // self.torch_dtype.itemsize


_NUMPY = {torch.float32: np.dtype(np.float32), torch.float16: np.dtype(np.float16),
          torch.int8: np.dtype(np.int8), torch.uint8: np.dtype(np.uint8)}

TABLE: dict[str, Precision] = {p.name: p for p in (
    Precision("float32", 0, torch.float32, packed_bits=False, needs_ranges=False, index_precision="float32",
              scan="float_topk"),
    Precision("float16", 1, torch.float16, packed_bits=False, needs_ranges=False, index_precision="float16",
              scan="float_topk"),
    Precision("int8", 2, torch.int8, packed_bits=False, needs_ranges=True, index_precision="int8",
              code_offset=-128, scan="int8_topk"),
    Precision("uint8", 3, torch.uint8, packed_bits=False, needs_ranges=True, index_precision="int8"),
    Precision("binary", 4, torch.int8, packed_bits=True, needs_ranges=False, index_precision="binary",
              code_offset=-128, scan="hamming_topk"),
    Precision("ubinary", 5, torch.uint8, packed_bits=True, needs_ranges=False, index_precision="binary"),
    # index-only: sign bits of the rotated, centred vector (ubinary layout) + per-vector factors
    Precision("rabitq", None, torch.uint8, packed_bits=True, needs_ranges=False, index_precision="rabitq",
              scan="rabitq_topk", row_factors=2),
)}
# The output precisions (embed(), the store, the wire): the rows with a store kernel
PRECISIONS = tuple(name for name, p in TABLE.items() if p.is_output)


def check_table(table: dict[str, Precision]) -> None:
    """The table's rows are consistent with each other: every index precision is a row that holds its own
    codes and names a scan op, and every row's index precision stores the same layout (dtype width,
    packing, ranges) and differs at most in its code offset."""
    for name, p in table.items():
        target = table.get(p.index_precision)
        if p.name != name or target is None:
            raise ValueError(f"precision table: row {name!r} (named {p.name!r}) has index precision "
                             f"{p.index_precision!r}, which is not a row")
        if target.index_precision != target.name or target.scan not in SCAN_OPS:
            raise ValueError(f"precision table: index precision {target.name!r} must hold its own codes and "
                             f"name a scan op in {SCAN_OPS}, got {target.index_precision!r} / {target.scan!r}")
        if p.scan is not None and target is not p:
            raise ValueError(f"precision table: {name!r} names a scan but is held by {target.name!r}")
        if not target.is_output and target is not p:  # its codes are made by the index, never received
            raise ValueError(f"precision table: {name!r} cannot be held by the index-only {target.name!r}")
        if p.row_factors and p.is_output:
            raise ValueError(f"precision table: output precision {name!r} cannot have row factors (embed() writes "
                             "codes only)")
        same = (p.is_float, p.packed_bits, p.needs_ranges, p.torch_dtype.itemsize)
        if same != (target.is_float, target.packed_bits, target.needs_ranges, target.torch_dtype.itemsize) or \
                (p.is_float and (p.code_offset or p.torch_dtype != target.torch_dtype)):
            raise ValueError(f"precision table: {name!r} codes cannot be held as {target.name!r} codes")


check_table(TABLE)


def precision_spec(name) -> Precision:
    """The table entry for a user's (output) precision argument, or a ValueError naming the valid ones."""
    spec = TABLE.get(name) if isinstance(name, str) else None
    if spec is not None and not spec.is_output:
        raise ValueError(f"{name!r} is an index precision (EmbeddingIndex(dim, precision={name!r}) encodes float "
                         f"vectors), not an output precision; valid: {', '.join(PRECISIONS)}")
    if spec is None:
        raise ValueError(f"unknown precision {name!r}; valid: {', '.join(PRECISIONS)}")
    return spec
