"""add_layernorm: LayerNorm(x + residual) over the last dimension (BERT's post-LN)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_float, check_out
from .dispatch import TRITON_IMPORT_ERROR, choose, register


@register("add_layernorm", "torch")
def add_layernorm_torch(x, residual, weight, bias, eps, out=None):
    """Reference: fp32 statistics, cast once to x's dtype."""
    H = x.shape[-1]
    if x.dtype == torch.float32:  # CPU hot path: no extra copies
        if out is None:
            return F.layer_norm(x + residual, (H,), weight, bias, eps)
        # in place in `out` (which may be x or residual): the sum, then the row-wise norm
        s = torch.add(x, residual, out=out).view(-1, H)
        stats = s.new_empty(2, s.shape[0], 1)
        torch.ops.aten.native_layer_norm.out(s, [H], weight, bias, eps, out0=s, out1=stats[0], out2=stats[1])
        return out
    y = F.layer_norm(x.float() + residual.float(), (H,), weight.float(), bias.float(), eps).to(x.dtype)
    return y if out is None else out.copy_(y)


def add_layernorm(x, residual, weight, bias, eps, backend=None, out=None):
    """x, residual: [N, H]; weight, bias: [H] -> LayerNorm(x + residual), shape and dtype of x.
    out: optional contiguous buffer for the result; it may be x or residual itself."""
    check_float("x", x)
    check_float("residual", residual)
    for name, t in (("residual", residual), ("weight", weight), ("bias", bias)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if x.shape != residual.shape:
        raise ValueError(f"x {tuple(x.shape)} and residual {tuple(residual.shape)} differ in shape")
    H = x.shape[-1]
    if weight.shape != (H,) or bias.shape != (H,):
        raise ValueError(f"weight and bias must be [{H}], got {tuple(weight.shape)} and {tuple(bias.shape)}")
    if out is not None:
        check_out(out, x.shape, x)
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
    args = (x, residual, weight, bias, float(eps))
    return choose("add_layernorm", x.device, backend, args)(*args, out=out)


def rows_2d(t, H):
    """[..., H] -> (2-D view with unit column stride, row pitch in elements). Broadcast (stride-0)
    rows stay a view with pitch 0; only a column-strided tensor is copied. The Triton and C++
    kernels both take rows this way."""
    t2 = t.reshape(-1, H)
    if t2.stride(1) != 1 and H > 1:
        t2 = t2.contiguous()
    return t2, (t2.stride(0) if t2.shape[0] > 1 else H)


if TRITON_IMPORT_ERROR is None:
    import triton
    import triton.language as tl

    @triton.jit
    def _add_layernorm_kernel(
        y_ptr,
        x_ptr,
        res_ptr,
        w_ptr,
        b_ptr,
        y_row_stride,
        x_row_stride,
        res_row_stride,
        n_cols,
        eps,
        BLOCK_SIZE: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        x += tl.load(res_ptr + row * res_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / n_cols
        # zero the padding lanes so they do not enter the variance
        xc = tl.where(mask, x - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = xc * rstd * w + b
        tl.store(y_ptr + row * y_row_stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)

    @register("add_layernorm", "triton", devices=("cpu", "cuda"))
    def add_layernorm_triton(x, residual, weight, bias, eps, out=None):
        """Each program reads its row of x and residual before writing it: out may alias either."""
        H = x.shape[-1]
        (x2, _), (r2, _) = rows_2d(x, H), rows_2d(residual, H)
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
        y2 = y.view(-1, H)
        if y2.shape[0] == 0:
            return y
        BLOCK_SIZE = triton.next_power_of_2(H)
        _add_layernorm_kernel[(y2.shape[0],)](
            y2, x2, r2, weight.contiguous(), bias.contiguous(),
            y2.stride(0), x2.stride(0), r2.stride(0), H, eps,
            BLOCK_SIZE=BLOCK_SIZE, num_warps=min(max(BLOCK_SIZE // 256, 1), 8),
        )
        return y
