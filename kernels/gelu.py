"""bias_gelu: exact (erf) GELU(x + bias), as BERT's "gelu" activation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_float, check_out
from .dispatch import TRITON_IMPORT_ERROR, choose, register


@register("bias_gelu", "torch")
def bias_gelu_torch(x, bias, out=None):
    """Reference: fp32 math, cast once to x's dtype. GELU(+inf) = +inf restored after torch's op: its
    AVX-512 float32 erf-GELU returns NaN there (torch 2.13 on an AMD EPYC with AVX-512; AVX2 is right)."""
    if x.dtype == torch.float32 and out is not None:  # CPU hot path: in place in out (which may be x)
        y = out.copy_(x) if bias is None and out is not x else (out if bias is None else torch.add(x, bias, out=out))
        posinf = torch.isposinf(y)
        return torch.ops.aten.gelu_(y).masked_fill_(posinf, float("inf"))
    y = x.float() if bias is None else x.float() + bias.float()
    y = F.gelu(y).masked_fill_(torch.isposinf(y), float("inf")).to(x.dtype)
    return y if out is None else out.copy_(y)


def bias_gelu(x, bias, backend=None, out=None):
    """x: [N, F]; bias: [F] or None -> gelu(x + bias), shape and dtype of x.
    out: optional contiguous buffer for the result; it may be x itself (in place)."""
    check_float("x", x)
    if bias is not None and bias.shape != (x.shape[-1],):
        raise ValueError(f"bias must be [{x.shape[-1]}], got {tuple(bias.shape)}")
    if bias is not None and bias.device != x.device:
        raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    if out is not None:
        check_out(out, x.shape, x)
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
    args = (x, bias)  # the C++ kernel's `supports` check sees them (float32 / bfloat16 only)
    return choose("bias_gelu", x.device, backend, args)(*args, out=out)


if TRITON_IMPORT_ERROR is None:
    import triton
    import triton.language as tl

    @triton.jit
    def _bias_gelu_kernel(
        y_ptr,
        x_ptr,
        bias_ptr,
        n_elements,
        n_cols,
        HAS_BIAS: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < n_elements
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            # x is a contiguous [N, F]: the column of a flat index is offs % F
            x += tl.load(bias_ptr + offs % n_cols, mask=mask, other=0.0).to(tl.float32)
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))  # exact GELU, not the tanh one
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @register("bias_gelu", "triton", devices=("cpu", "cuda"))
    def bias_gelu_triton(x, bias, out=None):
        """Elementwise: out may be x itself."""
        x = x.contiguous()
        y = torch.empty_like(x) if out is None else out
        n = x.numel()
        if n == 0:
            return y
        BLOCK_SIZE = 1024
        _bias_gelu_kernel[(triton.cdiv(n, BLOCK_SIZE),)](
            y, x, x if bias is None else bias.contiguous(), n, x.shape[-1],
            HAS_BIAS=bias is not None, BLOCK_SIZE=BLOCK_SIZE,
        )
        return y
