"""The compiled module postembed_fast._C itself (csrc/, glue in kernels/cpp_ops.py): every raw entry
point refuses bad sizes, pointers and codes with a ValueError before touching memory (the glue skips
the launchers' checks, so C++ re-checks), the CUDA entry points fail cleanly without a device, info()
reports it, and concurrent calls from threads (the kernels release the GIL) stay correct.

What the kernels compute: the per-op files (test_attention.py, test_layernorm.py, test_pool_normalize.py,
test_quantize.py, test_topk.py)."""
from __future__ import annotations

import pytest
import torch

from postembed_fast.kernels import _ext, cpp_ops

pytestmark = pytest.mark.skipif(_ext._C is None, reason=f"compiled extension unavailable: {_ext.UNAVAILABLE_REASON}")

C = _ext._C


def make_batch(lengths, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(sum(lengths), dim, generator=g) * 0.5 + torch.randn(1, dim, generator=g) * 0.3
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return hidden, cu


# ---------------------------------------------------------------- pool_normalize / quantize

def test_bad_arguments_reach_the_cpp_checks():
    """Calling the glue directly skips the launcher checks: C++ re-checks and raises ValueError."""
    hidden, cu = make_batch([3, 4], 8)
    with pytest.raises(ValueError, match="strictly increasing"):
        cpp_ops.pool_normalize_cpp(hidden, torch.tensor([0, 5, 5, 7], dtype=torch.int32), "mean", True, "float32", None)
    with pytest.raises(ValueError, match="must equal total_tokens"):
        cpp_ops.pool_normalize_cpp(hidden, torch.tensor([0, 3, 6], dtype=torch.int32), "mean", True, "float32", None)
    with pytest.raises(ValueError, match=r"cu_seqlens\[0\]"):
        cpp_ops.pool_normalize_cpp(hidden, torch.tensor([1, 3, 7], dtype=torch.int32), "mean", True, "float32", None)
    with pytest.raises(ValueError, match="max > min"):
        cpp_ops.pool_normalize_cpp(hidden, cu, "mean", True, "uint8", torch.zeros(2, 8))
    with pytest.raises(ValueError, match="out must be"):
        cpp_ops.pool_normalize_cpp(hidden, cu, "mean", True, "float32", None, out=torch.empty(2, 7))
    with pytest.raises(ValueError, match="out must be"):
        cpp_ops.pool_normalize_cpp(hidden, cu, "mean", True, "float16", None, out=torch.empty(2, 8))
    with pytest.raises(TypeError):
        cpp_ops.quantize_cpp(hidden.double(), "float32", None)


def _raw_pool_args(h, c, o, **over):
    a = dict(hidden=h.data_ptr(), cu_seqlens=c.data_ptr(), total_tokens=h.shape[0], B=c.numel() - 1,
             D=h.shape[1], ld=h.shape[1], dtype=0, mode=0, normalize=True, precision=0, ranges=0,
             out=o.data_ptr(), out_rows=o.shape[0], out_cols=o.shape[1], out_itemsize=o.element_size())
    a.update(over)
    return a


@pytest.mark.parametrize("over, match", [
    (dict(D=0), "D must be > 0"),
    (dict(B=0), "B"),
    (dict(ld=4), "row pitch"),
    (dict(total_tokens=0), "at least one row"),
    (dict(total_tokens=6), "must equal total_tokens"),
    (dict(B=1, out_rows=1), "must equal total_tokens"),
    (dict(out_cols=9), "out must be"),
    (dict(out_rows=3), "out must be"),
    (dict(out_itemsize=2), "element size"),
    (dict(dtype=3), "dtype code"),
    (dict(dtype=-1), "dtype code"),
    (dict(precision=6), "precision code"),
    (dict(mode=2), "mode code"),
    (dict(hidden=0), "null pointer"),
    (dict(cu_seqlens=0), "null pointer"),
    (dict(out=0), "null pointer"),
    (dict(precision=3, out_itemsize=1), "ranges"),
    (dict(total_tokens=1, B=2), "at least B tokens"),
])
def test_raw_pool_normalize_rejects_bad_sizes(over, match):
    hidden, cu = make_batch([3, 4], 8)
    out = torch.empty(2, 8)
    with pytest.raises(ValueError, match=match):
        C.pool_normalize_cpu(**_raw_pool_args(hidden, cu, out, **over))
    if "must equal total_tokens" not in match:  # cu_seqlens contents are checked on the host path only
        # the CUDA entry point applies the same checks before touching any pointer
        with pytest.raises(ValueError, match=match):
            C.pool_normalize_cuda(**_raw_pool_args(hidden, cu, out, **over), device=0, stream=0)


def test_raw_quantize_rejects_bad_sizes():
    x = torch.zeros(4, 16)
    out = torch.empty(4, 2, dtype=torch.uint8)
    good = dict(x=x.data_ptr(), B=4, D=16, ld=16, dtype=0, precision=5, ranges=0, out=out.data_ptr(), out_rows=4,
                out_cols=2, out_itemsize=1)
    C.quantize_cpu(**good)
    for over, match in [(dict(out_cols=16), "out must be"), (dict(B=0), "at least one row"), (dict(D=-3), "D must"),
                        (dict(precision=3, out_cols=16), "ranges"), (dict(ld=8), "row pitch"), (dict(x=0), "null")]:
        with pytest.raises(ValueError, match=match):
            C.quantize_cpu(**{**good, **over})
    with pytest.raises(TypeError):  # negative pointer: pybind11 refuses the conversion
        C.quantize_cpu(**{**good, "x": -1})


# ---------------------------------------------------------------- attention / add_layernorm

def test_raw_attention_rejects_bad_arguments():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 3, 1, 32, generator=g)).unbind(1)
    out = torch.empty(6, 1, 32)
    good = dict(q=q.data_ptr(), sqt=q.stride(0), sqh=q.stride(1), k=k.data_ptr(), skt=k.stride(0), skh=k.stride(1),
                v=v.data_ptr(), svt=v.stride(0), svh=v.stride(1), out=out.data_ptr(), sot=32, soh=32,
                total_tokens=6, B=2, H=1, D=32, scale=0.1, num_threads=1)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    C.varlen_attention_cpu(cu_seqlens=cu.data_ptr(), **good)
    assert torch.isfinite(out).all()
    cases = [
        (dict(D=48), "head_dim must be 16, 32, 64 or 128"),
        (dict(q=0), "q is a null pointer"),
        (dict(total_tokens=7), r"cu_seqlens\[-1\]=6 must equal total_tokens=7"),
        (dict(sot=16), "out rows overlap"),
        (dict(scale=float("nan")), "scale must be finite"),
        (dict(num_threads=0), "num_threads must be >= 1"),
    ]
    for override, match in cases:
        with pytest.raises(ValueError, match=match):
            C.varlen_attention_cpu(cu_seqlens=cu.data_ptr(), **{**good, **override})
    bad_cu = torch.tensor([0, 4, 4, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="strictly increasing"):
        C.varlen_attention_cpu(cu_seqlens=bad_cu.data_ptr(), **{**good, "B": 3})


def test_raw_layernorm_rejects_bad_arguments():
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(4, 16, generator=g) * 3, torch.randn(4, 16, generator=g) + 0.5
    w, b = torch.randn(16, generator=g), torch.randn(16, generator=g)
    big = torch.zeros(8, 16)
    with pytest.raises(ValueError, match="out must be x itself or not overlap it"):
        cpp_ops.add_layernorm_cpp(big[:4], r, w, b, 1e-5, out=big[2:6])
    with pytest.raises(ValueError, match="eps must be finite"):
        C.add_layernorm_cpu(x.data_ptr(), 16, r.data_ptr(), 16, w.data_ptr(), b.data_ptr(), x.data_ptr(), 16,
                            4, 16, float("inf"), 1)
    with pytest.raises(ValueError, match="row pitches must be >= H"):
        C.add_layernorm_cpu(x.data_ptr(), 8, r.data_ptr(), 16, w.data_ptr(), b.data_ptr(), x.data_ptr(), 16,
                            4, 16, 1e-5, 1)


# ---------------------------------------------------------------- the module as a whole

def test_cuda_entry_points_without_a_device_fail_cleanly():
    assert isinstance(C.cuda_compiled(), bool)
    n = C.cuda_device_count()
    assert isinstance(n, int) and n >= 0
    if n == 0:
        x = torch.zeros(4, 16)
        out = torch.empty(4, 2, dtype=torch.uint8)
        with pytest.raises(RuntimeError):
            C.quantize_cuda(x=x.data_ptr(), B=4, D=16, ld=16, dtype=0, precision=5, ranges=0, out=out.data_ptr(),
                            out_rows=4, out_cols=2, out_itemsize=1, device=0, stream=0)


def test_info_reports_extension():
    import postembed_fast

    info = postembed_fast.info()
    assert info["cpu_ext"] is True
    assert "cpp" in info["backends"]["pool_normalize"] and "cpp" in info["backends"]["quantize_embeddings"]


def test_concurrent_calls_from_threads():
    """The CPU kernels release the GIL; concurrent calls must stay correct."""
    from concurrent.futures import ThreadPoolExecutor

    hidden, cu = make_batch([100] * 32, 384, seed=9)
    want = cpp_ops.pool_normalize_cpp(hidden, cu, "mean", True, "float32", None)
    with ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda _: cpp_ops.pool_normalize_cpp(hidden, cu, "mean", True, "float32", None), range(8)))
    for o in outs:
        assert torch.equal(o, want)
