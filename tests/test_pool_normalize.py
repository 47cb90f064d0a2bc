"""pool_normalize (kernels/pooling.py): mean or CLS pooling of packed hidden states, optional L2
normalization and the output precision in one pass, on every backend (torch reference, C++, Triton;
the CUDA kernel where a GPU exists) against float64 pooling and the documented quantization formula:
odd lengths and widths, every input dtype, every precision, outputs written into two differently
poisoned buffers (every element must be overwritten), strided inputs, the launcher's argument checks.

Quantized codes are compared with the float64 reference except where the reference value
v = (x - min) / step + 0.5 lies within TIE_TOL of an integer: there fp32 rounding of the pooled value
legitimately decides the code (|v| error is ~1e-4 at the steps used here). The formula itself is
checked exactly against numpy in float32 (test_codes_equal_the_host_formula here, and on exact ties
tests/test_quantize.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from postembed_fast.kernels import _ext, cpp_ops, pool_normalize, pooling
from postembed_fast.kernels.precision import PRECISIONS, TABLE

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TIE_TOL = 1e-3
HAS_CUDA = torch.cuda.is_available() and _ext.has_cuda_ext()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device (or _C built without CUDA kernels)")

LENGTH_SETS = {
    "many": [1, 512, 7, 100, 33, 1, 2, 300, 64, 128, 5, 17, 250, 1, 90, 3, 411, 8, 1, 60],
    # 1 and 2 (shorter than any block), 7, 97, 129 (one past a 128 block), 256 (exact blocks) and 300
    "mixed": [1, 2, 7, 97, 129, 256, 300],
    "single": [137],
    "single-300": [300],
    "single_token": [1],
}
DIMS = (384, 250, 768, 1)


# ---------------------------------------------------------------- references

def cu_of(lengths, device="cpu"):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return cu.to(device)


def make_batch(lengths, dim, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    total = int(sum(lengths))
    # a shared offset per dimension, so means do not all collapse towards 0
    hidden = torch.randn(total, dim, generator=g) * 0.5 + torch.randn(1, dim, generator=g) * 0.3
    return hidden.to(dtype).to(device), cu_of(lengths, device)


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
    # asymmetric: no exact ties
    return torch.tensor(np.stack([center - half, center + 1.3 * half]), dtype=torch.float32)


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
    assert tie.sum() <= max(3, 0.01 * tie.size)  # the exclusion stays small


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


def rel_err(out, ref64) -> float:
    out = out.double().cpu().numpy()
    assert not np.isnan(out).any(), "NaN in the output: an element was never written"
    return float(np.linalg.norm(out - ref64) / np.linalg.norm(ref64))


def check_all(out, p64, precision, ranges, normalize, dim):
    """out (pooled in `precision`) against the float64 pooled values p64."""
    if precision == "float32":
        np.testing.assert_allclose(out.cpu().numpy(), p64, **float_tols(normalize))
        assert rel_err(out, p64) < 1e-6
    elif precision == "float16":
        np.testing.assert_allclose(out.float().cpu().numpy(), p64.astype(np.float16).astype(np.float64), rtol=1e-3,
                                   atol=1e-5)
        assert rel_err(out, p64) < 1e-3
    elif precision in ("int8", "uint8"):
        assert_codes(out, p64, ranges, precision)
    else:
        assert out.shape[1] == (dim + 7) // 8
        assert_bits(out, p64, precision)


def kernel_into(backend):
    """The backend's kernel with an out= buffer (as the launcher calls it), or None: the torch reference
    allocates its own result."""
    return {"cpp": cpp_ops.pool_normalize_cpp, "triton": getattr(pooling, "pool_normalize_triton", None)}.get(backend)


def interpreted(backend, device):
    return backend == "triton" and device == "cpu"


# ---------------------------------------------------------------- every backend vs float64

def interpreter_sizes(backend, device, batch, dim, dtype, mode, normalize):
    """The interpreted Triton runs fp32 mixed batches normalized, and fp16/bf16 unnormalized at D=250."""
    if not interpreted(backend, device):
        return True
    return ((batch == "mixed" and dim in (384, 250, 1) and dtype == torch.float32 and normalize)
            or (dim == 250 and batch in ("single-300", "single_token", "mixed") and mode == "mean" and not normalize))


@pytest.mark.backends("pool_normalize", "batch, dim, dtype, mode, normalize",
                      [(b, d, t, m, n) for b in LENGTH_SETS for d in DIMS for t in DTYPES for m in ("mean", "cls")
                       for n in (True, False)], keep=interpreter_sizes)
def test_matches_float64_reference_at_every_precision(backend, device, batch, dim, dtype, mode, normalize,
                                                        poisoned_runs):
    lengths = LENGTH_SETS[batch]
    hidden, cu = make_batch(lengths, dim, dtype, seed=dim + len(lengths), device=device)
    B = len(lengths)
    p64 = ref_pool64(hidden, cu, mode, normalize)
    ranges = ranges_for(p64)
    kernel = kernel_into(backend)
    for precision in PRECISIONS:
        r = ranges.to(device) if TABLE[precision].needs_ranges else None
        if kernel is None:
            out = pool_normalize(hidden, cu, mode, normalize, precision, r, backend=backend)
        else:
            out = poisoned_runs(lambda o: kernel(hidden, cu, mode, normalize, precision, r, out=o),
                                (B, TABLE[precision].columns(dim)), precision, device)
        assert out.dtype == TABLE[precision].torch_dtype and out.shape == (B, TABLE[precision].columns(dim))
        try:
            check_all(out, p64, precision, ranges, normalize, dim)
        except AssertionError as e:
            raise AssertionError(f"precision={precision}: {e}") from e
        if kernel is not None and not interpreted(backend, device):
            # the public launcher picks the same kernel
            assert torch.equal(pool_normalize(hidden, cu, mode, normalize, precision, r, backend=backend), out)


def naive_pool(hidden, lens, mode, normalize):
    x = hidden.double().cpu()
    rows, start = [], 0
    for n in lens:
        rows.append(x[start] if mode == "cls" else x[start: start + n].mean(0))
        start += n
    p = torch.stack(rows)
    return p / p.norm(dim=1, keepdim=True) if normalize else p


@pytest.mark.backends("pool_normalize")
@pytest.mark.parametrize("precision", ["float16", "int8", "uint8", "binary", "ubinary"])
@pytest.mark.parametrize("D", [384, 250, 1])
def test_codes_equal_the_host_formula(backend, device, precision, D, reference_quantize, tie_mask):
    """Codes = the documented formula (numpy float32, conftest.np_quantize) of the float32-rounded
    pooled values, off rounding ties."""
    lens = LENGTH_SETS["mixed"]
    torch.manual_seed(3)
    hidden = torch.randn(sum(lens), D)
    x = naive_pool(hidden, lens, "mean", True).float().numpy()
    ranges = np.stack([x.min(0) - 0.01, x.max(0) + 0.01]).astype(np.float32)
    cu = cu_of(lens, device)
    out = pool_normalize(hidden.to(device), cu, "mean", True, precision, ranges, backend=backend).cpu().numpy()
    want = reference_quantize(x, precision, ranges)
    assert out.dtype == want.dtype and out.shape == want.shape
    if precision in ("int8", "uint8"):
        ok = ~tie_mask(x, ranges)
        np.testing.assert_array_equal(out[ok], want[ok])
    elif precision == "float16":
        np.testing.assert_allclose(out.astype(np.float32), want.astype(np.float32), rtol=1e-3, atol=1e-5)
    else:
        np.testing.assert_array_equal(out, want)


@pytest.mark.backends("pool_normalize")
def test_float16_output_is_round_to_nearest_of_float32_output(backend, device):
    hidden, cu = make_batch([3, 50, 200], 384, torch.float32, seed=3, device=device)
    for normalize in (True, False):
        f32 = pool_normalize(hidden, cu, "mean", normalize, "float32", backend=backend)
        f16 = pool_normalize(hidden, cu, "mean", normalize, "float16", backend=backend)
        assert torch.equal(f16, f32.to(torch.float16))


@pytest.mark.backends("pool_normalize", keep=lambda backend, device: backend != "torch")
def test_matches_the_torch_backend(backend, device):
    hidden, cu = make_batch([5, 100, 1, 64], 384, torch.float16, seed=11, device=device)
    for mode in ("mean", "cls"):
        a = pool_normalize(hidden, cu, mode, True, "float32", backend=backend)
        b = pool_normalize(hidden, cu, mode, True, "float32", backend="torch")
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    lens = LENGTH_SETS["mixed"]
    hidden, cu = torch.randn(sum(lens), 64, device=device), cu_of(lens, device)
    out = pool_normalize(hidden, cu, "mean", True, "binary", backend=backend)
    ref = pool_normalize(hidden, cu, "mean", True, "binary", backend="torch")
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


@pytest.mark.backends("pool_normalize")
def test_row_strided_inputs_are_read_in_place_and_transposed_ones_copied(backend, device):
    hidden, cu = make_batch([10, 3, 40], 256, torch.float32, seed=5, device=device)
    want = pool_normalize(hidden, cu, "mean", True, "float32", backend=backend)
    wide = torch.zeros(hidden.shape[0], 300, device=device)
    wide[:, 17:17 + 256] = hidden
    cols = wide[:, 17:17 + 256]  # row pitch 300, offset 17
    assert not cols.is_contiguous()
    assert torch.equal(pool_normalize(cols, cu, "mean", True, "float32", backend=backend), want)
    rows = torch.zeros(hidden.shape[0] * 2, 256, device=device)
    rows[::2] = hidden
    assert torch.equal(pool_normalize(rows[::2], cu, "mean", True, "float32", backend=backend), want)
    transposed = hidden.t().contiguous().t()
    assert torch.equal(pool_normalize(transposed, cu, "mean", True, "float32", backend=backend), want)
    expanded = hidden[:1].expand(5, 256)  # overlapping rows (stride 0)
    cu1 = torch.tensor([0, 5], dtype=torch.int32, device=device)
    got = pool_normalize(expanded, cu1, "mean", False, "float32", backend=backend)
    torch.testing.assert_close(got, hidden[:1], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- the CUDA kernel vs the CPU one

@needs_cuda
@pytest.mark.parametrize("dim", [384, 250, 768, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_cuda_pool_normalize_matches_cpu(dim, dtype, poisoned_runs):
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


# ---------------------------------------------------------------- the launcher's argument checks

@pytest.mark.backends("pool_normalize")
def test_launcher_arguments_are_checked(backend, device):
    hidden, cu = make_batch([3, 4], 8, torch.float32, device=device)
    with pytest.raises(TypeError):
        pool_normalize(hidden.double(), cu, backend=backend)
    with pytest.raises(TypeError):
        pool_normalize(hidden, cu.long(), backend=backend)
    if device == "cpu":  # cu_seqlens contents are read on the host only (no device sync on the hot path)
        with pytest.raises(ValueError, match="strictly increasing"):
            pool_normalize(hidden, torch.tensor([0, 4, 4, 7], dtype=torch.int32), backend=backend)
        with pytest.raises(ValueError, match="total_tokens"):
            pool_normalize(hidden, torch.tensor([0, 3, 6], dtype=torch.int32), backend=backend)
    with pytest.raises(ValueError, match="ranges"):
        pool_normalize(hidden, cu, precision="int8", ranges=torch.zeros(2, 7), backend=backend)
    with pytest.raises(ValueError, match="mean, cls"):
        pool_normalize(hidden, cu, mode="max", backend=backend)
    with pytest.raises(ValueError, match="binary"):
        pool_normalize(hidden, cu, precision="int4", backend=backend)
    with pytest.raises(ValueError, match=r"\(2, 8\)"):
        pool_normalize(hidden, cu, precision="int8", ranges=np.zeros((2, 7)), backend=backend)
    with pytest.raises(TypeError, match="float32"):
        pool_normalize(hidden.long(), cu, backend=backend)


def test_cu_seqlens_is_checked():
    h = torch.randn(10, 8)
    for cu, match in [
        (torch.tensor([0, 4, 10], dtype=torch.int64), "int32"),
        (torch.tensor([0, 4, 9], dtype=torch.int32), "total_tokens"),
        (torch.tensor([1, 4, 10], dtype=torch.int32), r"cu_seqlens\[0\]"),
        (torch.tensor([0, 6, 6, 10], dtype=torch.int32), "strictly increasing"),
        (torch.tensor([0], dtype=torch.int32), "B\\+1"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            pool_normalize(h, cu)
