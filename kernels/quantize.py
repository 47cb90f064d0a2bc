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
from .dispatch import TRITON_IMPORT_ERROR, choose, register

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


# Compile-time precision codes for the Triton kernels (pooling.py shares them).
PRECISION_CODE = {"float32": 0, "float16": 1, "int8": 2, "uint8": 3, "binary": 4, "ubinary": 5}

if TRITON_IMPORT_ERROR is None:
    import triton
    import triton.language as tl

    @triton.jit
    def store_precision(out_row_ptr, x, lo_ptr, hi_ptr, n_cols, PRECISION: tl.constexpr, BLOCK_D: tl.constexpr):
        """Write one fp32 row x [BLOCK_D] (lanes >= n_cols hold 0) in the requested precision.

        Shared by the quantize and pool_normalize kernels, so both repeat the
        reference's op order exactly."""
        cols = tl.arange(0, BLOCK_D)
        mask = cols < n_cols
        if PRECISION <= 1:  # float32 / float16
            tl.store(out_row_ptr + cols, x.to(out_row_ptr.dtype.element_ty), mask=mask)
        elif PRECISION <= 3:  # int8 / uint8
            lo = tl.load(lo_ptr + cols, mask=mask, other=0.0)
            hi = tl.load(hi_ptr + cols, mask=mask, other=1.0)
            # div_rn: plain '/' is an approximate division on GPUs; the codes must
            # match the reference's IEEE division.
            step = tl.math.div_rn(hi - lo, 255.0)
            q = tl.floor(tl.math.div_rn(x - lo, step) + 0.5)
            q = tl.minimum(tl.maximum(q, 0.0), 255.0)
            if PRECISION == 2:
                q -= 128.0
            tl.store(out_row_ptr + cols, q.to(out_row_ptr.dtype.element_ty), mask=mask)
        else:  # binary / ubinary: 8 sign bits per byte, MSB first (numpy.packbits)
            bits = tl.reshape((x > 0).to(tl.int32), (BLOCK_D // 8, 8))
            weights = 128 >> tl.arange(0, 8)
            packed = tl.sum(bits * weights[None, :], axis=1)
            if PRECISION == 4:
                packed -= 128
            bcols = tl.arange(0, BLOCK_D // 8)
            tl.store(out_row_ptr + bcols, packed.to(out_row_ptr.dtype.element_ty), mask=bcols < (n_cols + 7) // 8)

    @triton.jit
    def _quantize_kernel(
        out_ptr,
        x_ptr,
        lo_ptr,
        hi_ptr,
        out_row_stride,
        x_row_stride,
        n_cols,
        PRECISION: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        store_precision(out_ptr + row * out_row_stride, x, lo_ptr, hi_ptr, n_cols, PRECISION, BLOCK_D)

    def precision_output(B, D, precision, device):
        """The output buffer of a [B, D] row-per-program kernel, and BLOCK_D (>= 8 for bit packing)."""
        dtype = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8,
                 "uint8": torch.uint8, "binary": torch.int8, "ubinary": torch.uint8}[precision]
        cols = (D + 7) // 8 if precision in ("binary", "ubinary") else D
        return torch.empty(B, cols, dtype=dtype, device=device), max(8, triton.next_power_of_2(D))

    @register("quantize_embeddings", "triton", devices=("cpu", "cuda"))
    def quantize_triton(x, precision, ranges, out=None):
        """out: test-only preallocated output (tests pass a sentinel-filled buffer)."""
        if x.stride(-1) != 1:
            x = x.contiguous()
        B, D = x.shape
        y, BLOCK_D = precision_output(B, D, precision, x.device)
        y = y if out is None else out
        if B == 0:
            return y
        lo, hi = (x, x) if ranges is None else (ranges[0].contiguous(), ranges[1].contiguous())
        _quantize_kernel[(B,)](
            y, x, lo, hi, y.stride(0), x.stride(0), D,
            PRECISION=PRECISION_CODE[precision], BLOCK_D=BLOCK_D,
        )
        return y
