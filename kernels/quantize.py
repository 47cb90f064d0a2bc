"""quantize_embeddings: float embeddings [B, D] -> the requested precision.

The formulas are in kernels/precision.py; quantize_torch below is their reference. The
C++/CUDA/Triton kernels repeat exactly its operations (an IEEE division by the step, a
separate + 0.5, floor), so every backend gives the same codes, exact rounding ties included.
"""
from __future__ import annotations

import torch

from .checks import check_float, check_ranges
from .dispatch import TRITON_IMPORT_ERROR, choose, register
from .precision import TABLE, precision_spec

_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)


@register("quantize_embeddings", "torch")
def quantize_torch(x: torch.Tensor, precision: str, ranges: torch.Tensor | None) -> torch.Tensor:
    """Reference. x: float [B, D]; ranges: float32 [2, D] (only for precisions that need them)."""
    spec = TABLE[precision]
    if spec.is_float:
        return x.to(spec.torch_dtype)
    x = x.float()
    if spec.needs_ranges:  # uint8 codes
        lo, hi = ranges[0], ranges[1]
        # Divide by a tensor, never by a Python number: on CUDA, torch computes tensor / scalar
        # as tensor * (1 / scalar) (ATen's div_true_kernel_cuda), a step one ulp off the IEEE
        # quotient in some dimensions, which moves exact .5 ties by one code.
        step = (hi - lo) / torch.full_like(hi, 255.0)
        u = torch.floor((x - lo) / step + 0.5).clamp_(0, 255).to(torch.int32)
    else:  # packed sign bits: the ubinary bytes
        B, D = x.shape
        nbytes = spec.columns(D)
        bits = torch.zeros(B, nbytes * 8, dtype=torch.int32, device=x.device)
        bits[:, :D] = (x > 0).to(torch.int32)
        weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.int32, device=x.device)
        u = (bits.view(B, nbytes, 8) * weights).sum(-1, dtype=torch.int32)
    return (u + spec.code_offset).to(spec.torch_dtype)


def quantize_embeddings(emb, precision: str, ranges=None, backend: str | None = None):
    """Quantize float embeddings computed elsewhere: numpy in -> numpy out, torch in -> torch out.

    ranges: [2, D] per-dimension (min, max), for the precisions that need them (int8, uint8)."""
    import numpy as np

    spec = precision_spec(precision)
    is_numpy = isinstance(emb, np.ndarray)
    x = torch.from_numpy(np.ascontiguousarray(emb)) if is_numpy else emb
    check_float("embeddings", x)
    if x.dim() != 2:
        raise ValueError(f"embeddings must be 2-D [N, D], got shape {tuple(x.shape)}")
    r = check_ranges(ranges, x.shape[1], x.device) if spec.needs_ranges else None
    out = choose("quantize_embeddings", x.device, backend)(x, precision, r)
    return out.cpu().numpy() if is_numpy else out


def empty_output(rows: int, dim: int, precision: str, device) -> torch.Tensor:
    """The result buffer of a [rows, dim] embedding matrix in `precision`."""
    spec = TABLE[precision]
    return torch.empty(rows, spec.columns(dim), dtype=spec.torch_dtype, device=device)


if TRITON_IMPORT_ERROR is None:
    import triton
    import triton.language as tl

    @triton.jit
    def store_precision(out_row_ptr, x, lo_ptr, hi_ptr, n_cols, QUANTIZE: tl.constexpr, PACKED: tl.constexpr,
                        SIGNED: tl.constexpr, BLOCK_D: tl.constexpr):
        """Write one fp32 row x [BLOCK_D] (lanes >= n_cols hold 0) in the requested precision
        (the flags come from precision.TABLE through precision_flags()).

        Shared by the quantize and pool_normalize kernels, so both repeat the
        reference's op order exactly."""
        cols = tl.arange(0, BLOCK_D)
        mask = cols < n_cols
        if not QUANTIZE and not PACKED:  # float32 / float16: a rounding cast
            tl.store(out_row_ptr + cols, x.to(out_row_ptr.dtype.element_ty), mask=mask)
        elif QUANTIZE:  # int8 / uint8
            lo = tl.load(lo_ptr + cols, mask=mask, other=0.0)
            hi = tl.load(hi_ptr + cols, mask=mask, other=1.0)
            # div_rn: Triton's '/' on float32 compiles to an approximate division on GPUs;
            # the codes, ties included, must come from the reference's IEEE division.
            step = tl.math.div_rn(hi - lo, 255.0)
            q = tl.floor(tl.math.div_rn(x - lo, step) + 0.5)
            q = tl.minimum(tl.maximum(q, 0.0), 255.0)
            if SIGNED:
                q -= 128.0
            tl.store(out_row_ptr + cols, q.to(out_row_ptr.dtype.element_ty), mask=mask)
        else:  # binary / ubinary: 8 sign bits per byte, MSB first (numpy.packbits)
            bits = tl.reshape((x > 0).to(tl.int32), (BLOCK_D // 8, 8))
            weights = 128 >> tl.arange(0, 8)
            packed = tl.sum(bits * weights[None, :], axis=1)
            if SIGNED:
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
        QUANTIZE: tl.constexpr,
        PACKED: tl.constexpr,
        SIGNED: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        store_precision(out_ptr + row * out_row_stride, x, lo_ptr, hi_ptr, n_cols, QUANTIZE, PACKED, SIGNED, BLOCK_D)

    def precision_flags(precision: str) -> dict:
        """store_precision's compile-time flags, read from the precision table."""
        spec = TABLE[precision]
        return dict(QUANTIZE=spec.needs_ranges, PACKED=spec.packed_bits, SIGNED=spec.code_offset == -128)

    def block_d(D: int) -> int:
        """BLOCK_D of a row-per-program kernel: a power of two >= 8 (bit packing takes 8 lanes)."""
        return max(8, triton.next_power_of_2(D))

    @register("quantize_embeddings", "triton", devices=("cpu", "cuda"))
    def quantize_triton(x, precision, ranges, out=None):
        """out: test-only preallocated output (tests pass a sentinel-filled buffer)."""
        if x.stride(-1) != 1:
            x = x.contiguous()
        B, D = x.shape
        y = empty_output(B, D, precision, x.device) if out is None else out
        if B == 0:
            return y
        lo, hi = (x, x) if ranges is None else (ranges[0].contiguous(), ranges[1].contiguous())
        _quantize_kernel[(B,)](
            y, x, lo, hi, y.stride(0), x.stride(0), D,
            **precision_flags(precision), BLOCK_D=block_d(D),
        )
        return y
