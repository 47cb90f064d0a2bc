"""The compiled "cpp" backend (csrc/, kernels/cpp_ops.py): CPU kernel vs a float64
numpy reference, bit-exact conversions, poisoned outputs, bad arguments at every
layer, and (where a GPU exists) the CUDA kernel vs the CPU one.

Quantized codes are compared with the float64 reference except where the reference
value v = (x - min) / step + 0.5 lies within TIE_TOL of an integer: there fp32
rounding of the pooled value legitimately decides the code (|v| error is ~1e-4 at
the steps used here). The formula itself is checked bit-exactly against a numpy
float32 replica on fp32 input, without any tie exclusion.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from postembed_fast.kernels import _ext
from postembed_fast.kernels.precision import PRECISIONS, TABLE
from postembed_fast.kernels import pool_normalize, quantize_embeddings
from postembed_fast.kernels import cpp_ops

pytestmark = pytest.mark.skipif(_ext._C is None, reason=f"compiled extension unavailable: {_ext.UNAVAILABLE_REASON}")

C = _ext._C
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TIE_TOL = 1e-3
HAS_CUDA = torch.cuda.is_available() and _ext.has_cuda_ext()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device (or _C built without CUDA kernels)")


# ---------------------------------------------------------------- references

def make_batch(lengths, dim, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    total = int(sum(lengths))
    # a shared offset per dimension, so means do not all collapse towards 0
    hidden = torch.randn(total, dim, generator=g) * 0.5 + torch.randn(1, dim, generator=g) * 0.3
    hidden = hidden.to(dtype)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return hidden.to(device), cu.to(device)


def ref_pool64(hidden, cu, mode, normalize):
    x = hidden.float().cpu().numpy().astype(np.float64)
    cu = cu.cpu().numpy()
    rows = [x[cu[i]] if mode == "cls" else x[cu[i]:cu[i + 1]].mean(0) for i in range(len(cu) - 1)]
    p = np.stack(rows)
    if normalize:
        p = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    return p


def ranges_for(p64):
    """Per-dimension (min, max) from the data, slightly inside the data's span so some values clip;
    never degenerate (a single row still gets a proper range around it)."""
    lo, hi = p64.min(0), p64.max(0)
    center = (lo + hi) / 2
    half = np.maximum(0.45 * (hi - lo), 0.5 * np.abs(p64).mean() + 1e-3)
    return torch.tensor(np.stack([center - half, center + 1.3 * half]), dtype=torch.float32)  # asymmetric: no exact ties


def ref_codes64(p64, ranges):
    lo = ranges[0].double().numpy()
    hi = ranges[1].double().numpy()
    v = (p64 - lo) / ((hi - lo) / 255.0) + 0.5
    codes = np.clip(np.floor(v), 0, 255)
    tie = np.abs(v - np.round(v)) < TIE_TOL
    return codes, tie


def assert_codes(out, p64, ranges, precision):
    codes, tie = ref_codes64(p64, ranges)
    got = out.cpu().numpy().astype(np.int64)
    if precision == "int8":
        got = got + 128
    diff = np.abs(got - codes)
    bad = (diff > 0) & ~tie
    assert not bad.any(), f"{bad.sum()} codes differ off ties, e.g. at {np.argwhere(bad)[:5].tolist()}"
    assert diff.max() <= 1
    assert tie.sum() <= max(3, 0.02 * tie.size)  # the exclusion stays small


def assert_bits(out, p64, precision):
    got = out.cpu().numpy()
    if precision == "binary":
        got = (got.astype(np.int16) + 128).astype(np.uint8)
    want = np.packbits(p64 > 0, axis=1)
    if not np.array_equal(got, want):
        # only sign flips of values within rounding distance of 0 are acceptable
        near0 = np.packbits(np.abs(p64) < 1e-6, axis=1)
        assert np.all(((got ^ want) & ~near0) == 0), "packed bits differ from numpy.packbits"


def float_tols(normalize):
    return dict(rtol=2e-5, atol=2e-6) if normalize else dict(rtol=2e-5, atol=2e-5)


def poisoned_runs(fn, shape, precision, device="cpu"):
    """Run fn(out=...) into two differently poisoned buffers; both must be fully overwritten."""
    dtype = TABLE[precision].torch_dtype
    outs = []
    for fill in (0x00, 0xFF):
        out = torch.empty(shape, dtype=dtype, device=device)
        if dtype.is_floating_point:
            out.fill_(float("nan") if fill else 12345.0)
        else:
            out.view(torch.uint8).fill_(fill)
        res = fn(out)
        assert res is out
        outs.append(out.clone())
    a, b = outs
    if dtype.is_floating_point:
        assert not torch.isnan(a).any() and not (b == 12345.0).any() and not torch.isnan(b).any()
    assert torch.equal(a.view(torch.uint8) if not dtype.is_floating_point else a,
                       b.view(torch.uint8) if not dtype.is_floating_point else b), "some elements were not written"
    return a


def check_all(out, p64, precision, ranges, normalize, dim):
    if precision == "float32":
        np.testing.assert_allclose(out.numpy(), p64, **float_tols(normalize))
    elif precision == "float16":
        np.testing.assert_allclose(out.float().numpy(), p64.astype(np.float16).astype(np.float64), rtol=1e-3,
                                   atol=1e-5)
    elif precision in ("int8", "uint8"):
        assert_codes(out, p64, ranges, precision)
    else:
        assert out.shape[1] == (dim + 7) // 8
        assert_bits(out, p64, precision)


# ---------------------------------------------------------------- CPU kernel vs reference

LENGTH_SETS = {
    "many": [1, 512, 7, 100, 33, 1, 2, 300, 64, 128, 5, 17, 250, 1, 90, 3, 411, 8, 1, 60],
    "single": [137],
    "single_token": [1],
}


@pytest.mark.parametrize("dim", [384, 250, 768, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("batch", list(LENGTH_SETS))
def test_pool_normalize_cpu_matches_reference(dim, dtype, batch):
    lengths = LENGTH_SETS[batch]
    hidden, cu = make_batch(lengths, dim, dtype, seed=dim + len(lengths))
    B = len(lengths)
    for mode in ("mean", "cls"):
        for normalize in (True, False):
            p64 = ref_pool64(hidden, cu, mode, normalize)
            ranges = ranges_for(p64)
            for precision in PRECISIONS:
                r = ranges if precision in ("int8", "uint8") else None
                shape = (B, TABLE[precision].columns(dim))
                out = poisoned_runs(
                    lambda o: cpp_ops.pool_normalize_cpp(hidden, cu, mode, normalize, precision, r, out=o),
                    shape, precision)
                try:
                    check_all(out, p64, precision, ranges, normalize, dim)
                except AssertionError as e:
                    raise AssertionError(f"mode={mode} normalize={normalize} precision={precision}: {e}") from e
                # the public launcher picks the same kernel with backend="cpp"
                again = pool_normalize(hidden, cu, mode, normalize, precision, r, backend="cpp")
                assert torch.equal(again, out)


def test_float16_output_is_round_to_nearest_of_float32_output():
    hidden, cu = make_batch([3, 50, 200], 384, torch.float32, seed=3)
    for normalize in (True, False):
        f32 = cpp_ops.pool_normalize_cpp(hidden, cu, "mean", normalize, "float32", None)
        f16 = cpp_ops.pool_normalize_cpp(hidden, cu, "mean", normalize, "float16", None)
        assert torch.equal(f16, f32.to(torch.float16))


def test_matches_torch_reference_backend():
    hidden, cu = make_batch([5, 100, 1, 64], 384, torch.float16, seed=11)
    for mode in ("mean", "cls"):
        a = pool_normalize(hidden, cu, mode, True, "float32", backend="cpp")
        b = pool_normalize(hidden, cu, mode, True, "float32", backend="torch")
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_row_strided_inputs_are_read_in_place_and_transposed_ones_copied():
    hidden, cu = make_batch([10, 3, 40], 256, torch.float32, seed=5)
    want = cpp_ops.pool_normalize_cpp(hidden, cu, "mean", True, "float32", None)
    wide = torch.zeros(hidden.shape[0], 300)
    wide[:, 17:17 + 256] = hidden
    cols = wide[:, 17:17 + 256]  # row pitch 300, offset 17
    assert not cols.is_contiguous()
    assert torch.equal(cpp_ops.pool_normalize_cpp(cols, cu, "mean", True, "float32", None), want)
    rows = torch.zeros(hidden.shape[0] * 2, 256)
    rows[::2] = hidden
    assert torch.equal(cpp_ops.pool_normalize_cpp(rows[::2], cu, "mean", True, "float32", None), want)
    transposed = hidden.t().contiguous().t()
    assert torch.equal(cpp_ops.pool_normalize_cpp(transposed, cu, "mean", True, "float32", None), want)
    expanded = hidden[:1].expand(5, 256)  # overlapping rows (stride 0)
    cu1 = torch.tensor([0, 5], dtype=torch.int32)
    got = cpp_ops.pool_normalize_cpp(expanded, cu1, "mean", False, "float32", None)
    torch.testing.assert_close(got, hidden[:1], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- conversions and quantize_embeddings

def test_all_half_and_bfloat16_values_convert_exactly():
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    for dtype in (torch.float16, torch.bfloat16):
        x = bits.view(dtype).reshape(256, 256)
        got = cpp_ops.quantize_cpp(x, "float32", None)
        want = x.float()
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got), nan)
        assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))  # bitwise, incl. -0


@pytest.mark.parametrize("f16c", [True, False], ids=["f16c-if-cpu-has-it", "portable"])
def test_float_to_half_rounding_is_bit_exact(f16c):
    prev = C._set_cpu_f16c_allowed(f16c)
    try:
        _check_float_to_half()
    finally:
        C._set_cpu_f16c_allowed(prev)


def _check_float_to_half():
    g = torch.Generator().manual_seed(0)
    rnd = torch.randint(-2**31, 2**31 - 1, (200_000,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    # values around every fp16 boundary: subnormals, ties, the overflow threshold
    half_vals = torch.arange(0, 0x7c00, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    mids = (half_vals[1:].double() + half_vals[:-1].double()) / 2
    special = torch.tensor([65504.0, 65519.99, 65520.0, 65536.0, 1e30, float("inf"), 2**-25, 2**-24, 3 * 2**-26,
                            2**-14, 2**-14 - 2**-25, 0.0, -0.0, float("nan")])
    x = torch.cat([rnd, half_vals, mids.float(), torch.nextafter(mids.float(), torch.tensor(0.0)), special])
    x = torch.cat([x, -x]).reshape(-1, 1)
    got = cpp_ops.quantize_cpp(x, "float16", None)
    want = x.to(torch.float16)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    bad = got[~nan].view(torch.int16) != want[~nan].view(torch.int16)
    assert not bad.any(), f"{int(bad.sum())} mismatches, e.g. {x[~nan][bad][:5].tolist()}"


@pytest.mark.parametrize("dim", [384, 250, 1])
def test_quantize_cpu_formula_is_bit_exact(dim):
    g = torch.Generator().manual_seed(dim)
    x = torch.randn(300, dim, generator=g) * 0.1
    lo = torch.full((dim,), -0.15) + torch.rand(dim, generator=g) * 0.02
    hi = torch.full((dim,), 0.15) - torch.rand(dim, generator=g) * 0.02
    ranges = torch.stack([lo, hi])
    # numpy float32 replica of the documented op order
    xn, lon, hin = x.numpy(), lo.numpy(), hi.numpy()
    step = (hin - lon) / np.float32(255.0)
    q = np.clip(np.floor((xn - lon) / step + np.float32(0.5)), 0, 255)
    assert q.dtype == np.float32
    for precision in ("uint8", "int8"):
        out = poisoned_runs(lambda o: cpp_ops.quantize_cpp(x, precision, ranges, out=o), (300, dim), precision)
        want = q.astype(np.uint8) if precision == "uint8" else (q.astype(np.int16) - 128).astype(np.int8)
        np.testing.assert_array_equal(out.numpy(), want)
    for precision in ("ubinary", "binary"):
        out = poisoned_runs(lambda o: cpp_ops.quantize_cpp(x, precision, None, out=o), (300, (dim + 7) // 8),
                            precision)
        want = np.packbits(xn > 0, axis=1)
        got = out.numpy() if precision == "ubinary" else (out.numpy().astype(np.int16) + 128).astype(np.uint8)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_quantize_embeddings_cpp_matches_torch_backend(dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(64, 250, generator=g) * 0.1).to(dtype)
    ranges = torch.stack([torch.full((250,), -0.2), torch.full((250,), 0.2)])
    for precision in PRECISIONS:
        r = ranges if precision in ("int8", "uint8") else None
        a = quantize_embeddings(x, precision, r, backend="cpp")
        b = quantize_embeddings(x, precision, r, backend="torch")
        assert a.dtype == b.dtype and a.shape == b.shape
        if precision in ("int8", "uint8"):
            assert (a.int() - b.int()).abs().max() <= 1  # identical formula; fp32 ties only
        else:
            assert torch.equal(a, b), precision
    # numpy in -> numpy out, and empty input
    xn = x.float().numpy()
    assert isinstance(quantize_embeddings(xn, "ubinary", backend="cpp"), np.ndarray)
    assert quantize_embeddings(np.zeros((0, 250), np.float32), "int8", ranges, backend="cpp").shape == (0, 250)


# ---------------------------------------------------------------- bad arguments

def test_bad_arguments_through_the_launcher():
    hidden, cu = make_batch([3, 4], 8, torch.float32)
    with pytest.raises(TypeError):
        pool_normalize(hidden.double(), cu, backend="cpp")
    with pytest.raises(TypeError):
        pool_normalize(hidden, cu.long(), backend="cpp")
    with pytest.raises(ValueError, match="strictly increasing"):
        pool_normalize(hidden, torch.tensor([0, 4, 4, 7], dtype=torch.int32), backend="cpp")
    with pytest.raises(ValueError, match="total_tokens"):
        pool_normalize(hidden, torch.tensor([0, 3, 6], dtype=torch.int32), backend="cpp")
    with pytest.raises(ValueError, match="ranges"):
        pool_normalize(hidden, cu, precision="int8", ranges=torch.zeros(2, 7), backend="cpp")
    with pytest.raises(ValueError, match="ranges"):
        quantize_embeddings(hidden, "uint8", ranges=np.zeros((2, 9), np.float32), backend="cpp")


def test_bad_arguments_reach_the_cpp_checks():
    """Calling the glue directly skips the launcher checks: C++ re-checks and raises ValueError."""
    hidden, cu = make_batch([3, 4], 8, torch.float32)
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
def test_raw_extension_rejects_bad_sizes(over, match):
    hidden, cu = make_batch([3, 4], 8, torch.float32)
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

    hidden, cu = make_batch([100] * 32, 384, torch.float32, seed=9)
    want = cpp_ops.pool_normalize_cpp(hidden, cu, "mean", True, "float32", None)
    with ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda _: cpp_ops.pool_normalize_cpp(hidden, cu, "mean", True, "float32", None), range(8)))
    for o in outs:
        assert torch.equal(o, want)


# ---------------------------------------------------------------- CUDA kernel vs CPU kernel

@needs_cuda
@pytest.mark.parametrize("dim", [384, 250, 768, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_cuda_pool_normalize_matches_cpu(dim, dtype):
    lengths = LENGTH_SETS["many"]
    hidden, cu = make_batch(lengths, dim, dtype, seed=dim)
    hd, cud = hidden.cuda(), cu.cuda()
    for mode in ("mean", "cls"):
        for normalize in (True, False):
            p64 = ref_pool64(hidden, cu, mode, normalize)
            ranges = ranges_for(p64)
            for precision in PRECISIONS:
                r = ranges if precision in ("int8", "uint8") else None
                shape = (len(lengths), TABLE[precision].columns(dim))
                out = poisoned_runs(
                    lambda o: cpp_ops.pool_normalize_cpp(hd, cud, mode, normalize, precision,
                                                         None if r is None else r.cuda(), out=o),
                    shape, precision, device="cuda").cpu()
                check_all(out, p64, precision, ranges, normalize, dim)
                cpu = cpp_ops.pool_normalize_cpp(hidden, cu, mode, normalize, precision, r)
                if precision in ("float32", "float16"):
                    torch.testing.assert_close(out.float(), cpu.float(), rtol=1e-3 if precision == "float16" else 2e-5,
                                               atol=1e-5 if precision == "float16" else 2e-6)


@needs_cuda
def test_cuda_unaligned_and_strided_inputs():
    hidden, cu = make_batch([5, 200, 1, 77], 384, torch.float16, seed=2)
    want = cpp_ops.pool_normalize_cpp(hidden, cu, "mean", True, "float32", None)
    big = torch.zeros(hidden.shape[0], 384 + 3, dtype=torch.float16, device="cuda")
    big[:, 3:] = hidden.cuda()
    got = cpp_ops.pool_normalize_cpp(big[:, 3:], cu.cuda(), "mean", True, "float32", None)  # misaligned -> scalar path
    torch.testing.assert_close(got.cpu(), want, rtol=2e-5, atol=2e-6)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_cuda_quantize_matches_cpu_exactly(dtype):
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(300, 250, generator=g) * 0.1).to(dtype)
    ranges = torch.stack([torch.full((250,), -0.2), torch.full((250,), 0.2)])
    for precision in PRECISIONS:
        r = ranges if precision in ("int8", "uint8") else None
        cpu = cpp_ops.quantize_cpp(x, precision, r)
        gpu = cpp_ops.quantize_cpp(x.cuda(), precision, None if r is None else r.cuda())
        assert torch.equal(gpu.cpu(), cpu), precision
