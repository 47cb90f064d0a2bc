"""The "cpp" backend: registers the compiled kernels of postembed_fast._C (csrc/) with dispatch.

Layering as in flash-attention: raw extension (_C, raw pointers + sizes + stream)
-> the functions here (argument checks already done by the launchers; this file
allocates outputs and passes pointers, shapes and the stream) -> the public
launchers in this package. Nothing is registered when _C is unavailable, so
"cpp" then reports itself unimplemented/unavailable and dispatch falls back.

Layout policy: hidden / embeddings may have any row stride (a row slice or a
column slice of a bigger tensor is read in place, via the row pitch `ld`); only
a tensor whose last dimension is not contiguous (stride(1) != 1, e.g. a
transpose) or whose rows overlap (expand) is copied with .contiguous() first. cu_seqlens is tiny
and made contiguous freely; ranges arrive checked by the launcher (checks.QuantRanges). On CUDA nothing is synchronized: cu_seqlens is
read by the kernel, the launch goes to torch.cuda.current_stream(device).

Precisions: the table's code (precision.TABLE) selects the store kernel; the output's width and
element size, which the table decides (quantize.empty_output), go as out_cols / out_itemsize: the
kernels write rows of exactly that many bytes, after the bindings check them against what the code's
kernel writes (csrc/embedding_math.h kStoreKernels).

Every impl takes an optional `out=` (a preallocated, contiguous tensor of the
exact result shape/dtype/device); the tests use it with poisoned buffers to
prove that every element gets written.
"""
from __future__ import annotations

import torch

from . import _ext
from .dispatch import register
from .layernorm import rows_2d
from .precision import TABLE
from .quantize import empty_output

_C = _ext._C

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _rows_view(name: str, t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(tensor whose rows are contiguous, row pitch in elements)."""
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.dtype not in _DTYPE_NAMES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    rows, dim = t.shape
    if (dim > 1 and t.stride(1) != 1) or (rows > 1 and t.stride(0) < dim):
        t = t.contiguous()  # transposed, column-strided or expanded (overlapping rows): rare, copy once
    return t, (t.stride(0) if rows > 1 else dim)


def _out(out, rows: int, dim: int, precision: str, device: torch.device) -> torch.Tensor:
    if out is None:
        return empty_output(rows, dim, precision, device)
    spec = TABLE[precision]
    shape, dtype = (rows, spec.columns(dim)), spec.torch_dtype
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous {dtype} tensor of shape {shape} on {device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device} (contiguous={out.is_contiguous()})"
        )
    return out


def _ranges_ptr(ranges) -> int:
    """ranges: None, or the launcher's checked contiguous float32 [2, D] tensor on the data's device."""
    return 0 if ranges is None else ranges.data_ptr()


def _cuda_args(device: torch.device) -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return index, torch.cuda.current_stream(device).cuda_stream


def pool_normalize_cpp(hidden, cu_seqlens, mode, normalize, precision, ranges, out=None):
    """Fused pool + L2 normalize + quantize on CPU (OpenMP) or CUDA; see kernels/pooling.py."""
    hidden, ld = _rows_view("hidden", hidden)
    device = hidden.device
    total, dim = hidden.shape
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but hidden is on {device}")
    cu = cu_seqlens.contiguous()
    B = cu.numel() - 1
    result = _out(out, B, dim, precision, device)
    if result.numel() == 0:  # D == 0: nothing to compute (the C++ API requires D > 0)
        return result
    args = (hidden.data_ptr(), cu.data_ptr(), total, B, dim, ld, _C.DTYPE_CODES[_DTYPE_NAMES[hidden.dtype]],
            _C.MODE_CODES[mode], bool(normalize), TABLE[precision].code, _ranges_ptr(ranges), result.data_ptr(),
            result.shape[0], result.shape[1], result.element_size())
    if device.type == "cuda":
        _C.pool_normalize_cuda(*args, *_cuda_args(device))
    elif device.type == "cpu":
        _C.pool_normalize_cpu(*args)
    else:
        raise ValueError(f"pool_normalize (cpp): unsupported device {device}")
    return result


def quantize_cpp(x, precision, ranges, out=None):
    """quantize_embeddings on CPU (OpenMP) or CUDA; see kernels/quantize.py."""
    x, ld = _rows_view("embeddings", x)
    device = x.device
    rows, dim = x.shape
    result = _out(out, rows, dim, precision, device)
    if result.numel() == 0 or dim == 0:
        return result
    args = (x.data_ptr(), rows, dim, ld, _C.DTYPE_CODES[_DTYPE_NAMES[x.dtype]], TABLE[precision].code,
            _ranges_ptr(ranges),
            result.data_ptr(), result.shape[0], result.shape[1], result.element_size())
    if device.type == "cuda":
        _C.quantize_cuda(*args, *_cuda_args(device))
    elif device.type == "cpu":
        _C.quantize_cpu(*args)
    else:
        raise ValueError(f"quantize_embeddings (cpp): unsupported device {device}")
    return result


# The dtypes of the C++ attention, add_layernorm and bias_gelu: fp32 math for both; float16 has no
# CPU kernel (no CPU computes in it: the encoder runs float32 or bfloat16 there).
_CPU_FLOAT_DTYPES = (torch.float32, torch.bfloat16)
_CPU_FLOAT_NAMES = "float32 or bfloat16"


def _dtype_code(t: torch.Tensor) -> int:
    return _C.DTYPE_CODES[_DTYPE_NAMES[t.dtype]]


def attention_refuses(q, k, v, cu_seqlens, max_seqlen, scale):
    """Why the C++ attention can't take this call (None if it can): float32 or bfloat16 on CPU, head_dim
    16/32/64/128."""
    if q.dtype not in _CPU_FLOAT_DTYPES:
        return f"{_CPU_FLOAT_NAMES} only, got {q.dtype}"
    if q.shape[-1] not in (16, 32, 64, 128):
        return f"head_dim must be 16, 32, 64 or 128, got {q.shape[-1]}"
    if q.shape[1] == 0:
        return "needs at least one head"
    return None


def varlen_attention_cpp(q, k, v, cu_seqlens, max_seqlen, scale, out=None):
    """CPU attention straight from the packed (possibly strided) q/k/v; see csrc/attention_cpu.cpp.
    Shapes, strides and cu_seqlens were checked by the launcher (kernels/attention.py)."""
    reason = attention_refuses(q, k, v, cu_seqlens, max_seqlen, scale)
    if reason is not None:
        raise ValueError(f"varlen_attention (cpp): {reason}")
    T, H, D = q.shape
    if out is None:
        out = torch.empty((T, H, D), dtype=q.dtype)
    elif tuple(out.shape) != (T, H, D) or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be a {q.dtype} [{T}, {H}, {D}] tensor with stride(-1) == 1, got "
                         f"{out.dtype} {tuple(out.shape)} strides {out.stride()}")
    cu = cu_seqlens.contiguous()
    _C.varlen_attention_cpu(q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1),
                            v.data_ptr(), v.stride(0), v.stride(1), out.data_ptr(), out.stride(0), out.stride(1),
                            cu.data_ptr(), T, cu.numel() - 1, H, D, scale, torch.get_num_threads(), _dtype_code(q))
    return out


def layernorm_refuses(x, residual, weight, bias, eps):
    """Why the C++ add_layernorm can't take this call (None if it can): x, residual, weight and bias all
    float32 or all bfloat16."""
    if x.dtype not in _CPU_FLOAT_DTYPES:
        return f"{_CPU_FLOAT_NAMES} only, got {x.dtype}"
    if not all(t.dtype == x.dtype for t in (residual, weight, bias)):
        return (f"x, residual, weight and bias must share one dtype, got {x.dtype}, {residual.dtype}, "
                f"{weight.dtype}, {bias.dtype}")
    if x.numel() == 0:
        return "empty input"
    return None


def add_layernorm_cpp(x, residual, weight, bias, eps, out=None):
    """LayerNorm(x + residual) on CPU, in place when out is x or residual; see csrc/layernorm_cpu.cpp."""
    reason = layernorm_refuses(x, residual, weight, bias, eps)
    if reason is not None:
        raise ValueError(f"add_layernorm (cpp): {reason}")
    H = x.shape[-1]
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype)
    x2, ldx = rows_2d(x, H)
    r2, ldr = rows_2d(residual, H)
    if r2.shape[0] != x2.shape[0]:
        raise ValueError(f"residual has {r2.shape[0]} rows, x has {x2.shape[0]}")
    o2 = out.view(-1, H)
    for name, t in (("x", x2), ("residual", r2)):  # in place is fine, a partial overlap is not
        same = t.data_ptr() == o2.data_ptr() and t.stride() == o2.stride()
        if not same and t.untyped_storage().data_ptr() == o2.untyped_storage().data_ptr():
            raise ValueError(f"add_layernorm (cpp): out must be {name} itself or not overlap it")
    w, b = weight.contiguous(), bias.contiguous()
    _C.add_layernorm_cpu(x2.data_ptr(), ldx, r2.data_ptr(), ldr, w.data_ptr(), b.data_ptr(),
                         o2.data_ptr(), o2.stride(0) if o2.shape[0] > 1 else H, o2.shape[0], H, eps,
                         torch.get_num_threads(), _dtype_code(x))
    return out


def bias_gelu_refuses(x, bias):
    """Why the C++ bias_gelu can't take this call (None if it can): float32 or bfloat16, bias (if any) of
    x's dtype."""
    if x.dtype not in _CPU_FLOAT_DTYPES:
        return f"{_CPU_FLOAT_NAMES} only, got {x.dtype}"
    if bias is not None and bias.dtype != x.dtype:
        return f"bias must have x's dtype {x.dtype}, got {bias.dtype}"
    return None


def bias_gelu_cpp(x, bias, out=None):
    """Exact GELU(x + bias) on CPU, in place when out is x; see csrc/gelu_cpu.cpp. out (if given) was
    checked contiguous, of x's shape and dtype, by the launcher (kernels/gelu.py)."""
    reason = bias_gelu_refuses(x, bias)
    if reason is not None:
        raise ValueError(f"bias_gelu (cpp): {reason}")
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype)
    F = x.shape[-1] if x.dim() else 1
    if out.numel() == 0:
        return out
    x2, ldx = rows_2d(x, F)
    o2 = out.view(-1, F)
    b = None if bias is None else bias.contiguous()
    _C.bias_gelu_cpu(x2.data_ptr(), ldx, 0 if b is None else b.data_ptr(), o2.data_ptr(), F, o2.shape[0], F,
                     _dtype_code(x), torch.get_num_threads())
    return out


# kind code of csrc/kernels.h TopkKind, score dtype
_TOPK_KINDS = {"binary": (0, torch.int32), "int8": (1, torch.int32), "float32": (2, torch.float32),
               "sign_dot": (3, torch.int32)}


def _topk_cpp(kind, q, db, k, allow, db_bias=None, out=None):
    """The exact top-k scans of csrc/topk_cpu.cpp (arguments checked by the launchers: 2-D, matching
    widths, k in [1, N], allow bool [N]). Rows must be contiguous in their last dimension. q has
    db's width, except for sign_dot: int8 [nq, 8 * bytes] against packed bits [N, bytes]."""
    code, sdtype = _TOPK_KINDS[kind]
    nq, qcols = q.shape
    N, cols = db.shape
    if out is None:
        out = (torch.empty(nq, k, dtype=sdtype), torch.empty(nq, k, dtype=torch.int64))
    if nq == 0:
        return out
    q = q if (q.stride(1) == 1 and (nq == 1 or q.stride(0) >= qcols)) else q.contiguous()
    db = db if (db.stride(1) == 1 and (N == 1 or db.stride(0) >= cols)) else db.contiguous()
    allow_u8 = None if allow is None else allow.contiguous().view(torch.uint8)
    bias = None if db_bias is None else db_bias.contiguous()
    _C.topk_cpu(code, q.data_ptr(), nq, q.stride(0) if nq > 1 else qcols, db.data_ptr(), N,
                db.stride(0) if N > 1 else cols, cols, 0 if bias is None else bias.data_ptr(),
                0 if allow_u8 is None else allow_u8.data_ptr(), k, out[0].data_ptr(), out[1].data_ptr(),
                torch.get_num_threads())
    return out


def hamming_topk_cpp(q, db, k, allow, out=None):
    return _topk_cpp("binary", q, db, k, allow, out=out)


def int8_topk_cpp(q, db, k, allow, db_bias=None, out=None):
    return _topk_cpp("int8", q, db, k, allow, db_bias=db_bias, out=out)


def float_topk_cpp(q, db, k, allow, out=None):
    return _topk_cpp("float32", q, db, k, allow, out=out)


if _C is not None:
    register("hamming_topk", "cpp", devices=("cpu",))(hamming_topk_cpp)
    register("int8_topk", "cpp", devices=("cpu",))(int8_topk_cpp)
    register("float_topk", "cpp", devices=("cpu",))(float_topk_cpp)
    register("varlen_attention", "cpp", devices=("cpu",), supports=attention_refuses)(varlen_attention_cpp)
    register("add_layernorm", "cpp", devices=("cpu",), supports=layernorm_refuses)(add_layernorm_cpp)
    register("bias_gelu", "cpp", devices=("cpu",), supports=bias_gelu_refuses)(bias_gelu_cpp)
    register("pool_normalize", "cpp", devices=("cpu", "cuda"))(pool_normalize_cpp)
    register("quantize_embeddings", "cpp", devices=("cpu", "cuda"))(quantize_cpp)
