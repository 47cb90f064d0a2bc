"""quantize_embeddings (kernels/quantize.py) on every backend (torch reference, C++, Triton; CUDA where a
GPU exists): int8/uint8 codes and packed sign bits bit-exact against the documented formula evaluated
on the host in numpy float32 (kernels/precision.py), exact .5 rounding ties included; float16 output
the round-to-nearest of float32; every half/bfloat16 value converted exactly; outputs written into
poisoned buffers; numpy in -> numpy out.

On the first GPU run (H200) the Triton codes differed from torch's at 53% of the ties. The kernel was
right: torch on CUDA computes `tensor / python_number` as a multiplication by the reciprocal (ATen's
div_true_kernel_cuda), so the reference's step (max - min) / 255 was one ulp off in some dimensions.
The reference now divides by a tensor. On a CPU-only machine the CUDA cases skip; on a GPU machine
they run and compare every backend with the host numpy formula, which is what would have caught it.
test_tie_inputs_detect_a_reciprocal_step shows here that the inputs are sharp enough to expose a
one-ulp step. What the precision table itself states: tests/test_quantize_exact.py / test_precision.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from postembed_fast.kernels import _ext, cpp_ops, pool_normalize, quantize, quantize_embeddings
from postembed_fast.kernels.precision import PRECISIONS, TABLE

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HAS_CUDA = torch.cuda.is_available() and _ext.has_cuda_ext()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device (or _C built without CUDA kernels)")
needs_c = pytest.mark.skipif(_ext._C is None, reason=f"compiled extension unavailable: {_ext.UNAVAILABLE_REASON}")
SENTINEL = 0x55  # integer outputs of the Triton kernel start filled with this (no NaN for ints)


def kernel_into(backend):
    """The backend's kernel with an out= buffer, or None (the torch reference allocates its own)."""
    return {"cpp": cpp_ops.quantize_cpp, "triton": getattr(quantize, "quantize_triton", None)}.get(backend)


def interpreted(backend, device):
    return backend == "triton" and device == "cpu"


def run(poisoned_runs, backend, device, x, precision, ranges, poisoned=True):
    """quantize x on `backend`: into poisoned buffers where the kernel takes one, else via the launcher."""
    kernel = kernel_into(backend)
    if kernel is None or not poisoned:
        return quantize_embeddings(x, precision, ranges, backend=backend)
    r = None if ranges is None else ranges.to(device)
    return poisoned_runs(lambda o: kernel(x, precision, r, out=o), (x.shape[0], TABLE[precision].columns(x.shape[1])),
                         precision, device)


# ---------------------------------------------------------------- bit-exact formulas

@pytest.mark.backends("quantize_embeddings")
@pytest.mark.parametrize("dim", [384, 250, 1])
def test_formula_is_bit_exact(backend, device, dim, poisoned_runs):
    g = torch.Generator().manual_seed(dim)
    x = torch.randn(300, dim, generator=g) * 0.1
    if interpreted(backend, device):
        x = x[:37]  # the interpreter runs one row per program, slowly
    lo = torch.full((dim,), -0.15) + torch.rand(dim, generator=g) * 0.02
    hi = torch.full((dim,), 0.15) - torch.rand(dim, generator=g) * 0.02
    ranges = torch.stack([lo, hi])
    # numpy float32 replica of the documented op order
    xn, lon, hin = x.numpy(), lo.numpy(), hi.numpy()
    step = (hin - lon) / np.float32(255.0)
    q = np.clip(np.floor((xn - lon) / step + np.float32(0.5)), 0, 255)
    assert q.dtype == np.float32
    x = x.to(device)
    for precision in ("uint8", "int8"):
        out = run(poisoned_runs, backend, device, x, precision, ranges)
        want = q.astype(np.uint8) if precision == "uint8" else (q.astype(np.int16) - 128).astype(np.int8)
        np.testing.assert_array_equal(out.cpu().numpy(), want)
    for precision in ("ubinary", "binary"):
        out = run(poisoned_runs, backend, device, x, precision, None)
        want = np.packbits(xn > 0, axis=1)
        got = out.cpu().numpy()
        got = got if precision == "ubinary" else (got.astype(np.int16) + 128).astype(np.uint8)
        np.testing.assert_array_equal(got, want)
    for precision in ("float32", "float16"):  # a rounding cast
        torch.testing.assert_close(run(poisoned_runs, backend, device, x, precision, None),
                                   x.to(TABLE[precision].torch_dtype),
                                   atol=0, rtol=0)


@pytest.mark.backends("quantize_embeddings")
def test_all_half_and_bfloat16_values_convert_exactly(backend, device):
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    for dtype in (torch.float16, torch.bfloat16):
        x = bits.view(dtype).reshape(256, 256).to(device)
        got = quantize_embeddings(x, "float32", backend=backend).cpu()
        want = x.float().cpu()
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got), nan)
        check = ~nan
        if dtype == torch.bfloat16 and interpreted(backend, device):
            # numpy has no bfloat16: the interpreter emulates it and flushes its subnormals to 0
            check &= (want.abs() >= torch.finfo(torch.bfloat16).tiny) | (want == 0)
        assert torch.equal(got[check].view(torch.int32), want[check].view(torch.int32))  # bitwise, incl. -0


@needs_c
@pytest.mark.parametrize("f16c", [True, False], ids=["f16c-if-cpu-has-it", "portable"])
def test_cpp_float_to_half_rounding_is_bit_exact(f16c):
    """The C++ float32 -> float16 conversion (F16C instructions where the CPU has them, else portable
    code) rounds as torch does, at every fp16 boundary: subnormals, ties, the overflow threshold."""
    prev = _ext._C._set_cpu_f16c_allowed(f16c)
    try:
        g = torch.Generator().manual_seed(0)
        rnd = torch.randint(-2**31, 2**31 - 1, (200_000,), generator=g, dtype=torch.int64).to(torch.int32)
        half_vals = torch.arange(0, 0x7c00, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
        mids = (half_vals[1:].double() + half_vals[:-1].double()) / 2
        special = torch.tensor([65504.0, 65519.99, 65520.0, 65536.0, 1e30, float("inf"), 2**-25, 2**-24, 3 * 2**-26,
                                2**-14, 2**-14 - 2**-25, 0.0, -0.0, float("nan")])
        below_mids = torch.nextafter(mids.float(), torch.tensor(0.0))
        x = torch.cat([rnd.view(torch.float32), half_vals, mids.float(), below_mids, special])
        x = torch.cat([x, -x]).reshape(-1, 1)
        got = cpp_ops.quantize_cpp(x, "float16", None)
        want = x.to(torch.float16)
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got), nan)
        bad = got[~nan].view(torch.int16) != want[~nan].view(torch.int16)
        assert not bad.any(), f"{int(bad.sum())} mismatches, e.g. {x[~nan][bad][:5].tolist()}"
    finally:
        _ext._C._set_cpu_f16c_allowed(prev)


# ---------------------------------------------------------------- against float64 and the torch reference

def make_ranges(d, seed=0):
    """Per-dimension [min, max] narrow enough that some values clip at 0 and 255."""
    g = torch.Generator().manual_seed(seed)
    half = 0.05 + 0.15 * torch.rand(d, generator=g)
    centre = 0.02 * torch.randn(d, generator=g)
    return torch.stack([centre - half, centre + half])


def check_codes(out, x64, precision, ranges):
    """Codes must equal the formulas applied to the float64 values, except where that value lies
    within 1e-6 of a rounding boundary (a .5 tie for uint8/int8, 0 for the sign bits)."""
    x = x64.numpy()
    out = out.cpu().numpy()
    if precision in ("binary", "ubinary"):
        want = np.packbits(x > 0, axis=1)  # numpy's MSB-first order, zero-padded last byte
        if precision == "binary":
            want = (want.astype(np.int16) - 128).astype(np.int8)
        near = np.abs(x) < 1e-6
        padded = np.zeros((x.shape[0], want.shape[1] * 8), bool)
        padded[:, : x.shape[1]] = near
        tie = padded.reshape(x.shape[0], -1, 8).any(-1)
    else:
        lo, hi = ranges[0].double().numpy(), ranges[1].double().numpy()
        step = (hi - lo) / 255.0
        t = (x - lo) / step
        want = np.clip(np.floor(t + 0.5), 0, 255)
        tie = np.abs(t - np.floor(t) - 0.5) * step < 1e-6
        want = want.astype(np.uint8) if precision == "uint8" else (want - 128).astype(np.int8)
    assert out.dtype == want.dtype and out.shape == want.shape
    bad = (out != want) & ~tie
    assert not bad.any(), f"{bad.sum()} codes differ, first at {np.argwhere(bad)[0]}"
    assert tie.mean() < 0.01


@pytest.mark.backends("quantize_embeddings")
@pytest.mark.parametrize("d", [384, 250, 1])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_matches_the_reference_and_float64_codes(backend, device, d, precision):
    torch.manual_seed(0)
    x = 0.1 * torch.randn(37, d, device=device)
    ranges = make_ranges(d) if TABLE[precision].needs_ranges else None
    r = None if ranges is None else ranges.to(device)
    ref = quantize.quantize_torch(x, precision, r)
    kernel = kernel_into(backend)
    if kernel is None:
        out = quantize_embeddings(x, precision, r, backend=backend)
    else:
        buf = torch.full_like(ref, float("nan")) if ref.is_floating_point() else torch.full_like(ref, SENTINEL)
        out = kernel(x, precision, r, out=buf)
        assert out is buf
    if precision in ("float32", "float16"):
        torch.testing.assert_close(out, ref, atol=0, rtol=0)
    else:
        check_codes(out, x.double().cpu(), precision, ranges)


@pytest.mark.backends("quantize_embeddings", "dtype", [(d,) for d in DTYPES],
                      keep=lambda backend, device, dtype: backend != "torch")
def test_matches_the_torch_backend(backend, device, dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(64, 250, generator=g) * 0.1).to(dtype).to(device)
    ranges = torch.stack([torch.full((250,), -0.2), torch.full((250,), 0.2)])
    for precision in PRECISIONS:
        r = ranges if TABLE[precision].needs_ranges else None
        a = quantize_embeddings(x, precision, r, backend=backend)
        b = quantize_embeddings(x, precision, r, backend="torch")
        assert a.dtype == b.dtype and a.shape == b.shape
        if precision in ("int8", "uint8"):
            assert (a.int() - b.int()).abs().max() <= 1  # identical formula; fp32 ties only
        else:
            assert torch.equal(a, b), precision


@pytest.mark.backends("quantize_embeddings", device="cpu")
def test_numpy_in_numpy_out_and_empty_input(backend, device):
    xn = (np.random.default_rng(1).standard_normal((64, 250)) * 0.1).astype(np.float32)
    ranges = torch.stack([torch.full((250,), -0.2), torch.full((250,), 0.2)])
    out = quantize_embeddings(xn, "ubinary", backend=backend)
    assert isinstance(out, np.ndarray) and out.shape == (64, 32)
    np.testing.assert_array_equal(out, np.packbits(xn > 0, axis=1))
    assert quantize_embeddings(np.zeros((0, 250), np.float32), "int8", ranges, backend=backend).shape == (0, 250)


# ---------------------------------------------------------------- exact ties

def tie_inputs(d=256, seed=3):
    """x sitting on every .5 tie (and the clip edges) of every dimension, and its ranges."""
    g = torch.Generator().manual_seed(seed)
    half = 0.05 + 0.15 * torch.rand(d, generator=g)
    centre = 0.02 * torch.randn(d, generator=g)
    lo, hi = centre - half, centre + half
    code = torch.arange(-1, 256, dtype=torch.float32)[:, None]
    step = (hi - lo) / torch.full_like(hi, 255.0)  # computed on the CPU: IEEE division
    return (lo + (code + 0.5) * step).contiguous(), torch.stack([lo, hi])


@pytest.mark.backends("quantize_embeddings", device=("cpu", "cuda"))
@pytest.mark.parametrize("precision", ["uint8", "int8"])
def test_exact_ties_equal_the_host_formula(backend, device, precision, reference_quantize):
    x, ranges = tie_inputs()
    want = reference_quantize(x.numpy(), precision, ranges.numpy())  # numpy float32 on the host
    got = quantize_embeddings(x.to(device), precision, ranges, backend=backend).cpu().numpy()
    np.testing.assert_array_equal(got, want, err_msg=f"quantize_embeddings backend={backend} on {device}")


@pytest.mark.backends("pool_normalize", device=("cpu", "cuda"))
@pytest.mark.parametrize("precision", ["uint8", "int8"])
def test_exact_ties_through_pool_normalize(backend, device, precision, reference_quantize):
    """pool_normalize (cls pooling of one-token sequences, no normalization) writes the same codes."""
    x, ranges = tie_inputs()
    want = reference_quantize(x.numpy(), precision, ranges.numpy())
    cu = torch.arange(x.shape[0] + 1, dtype=torch.int32, device=device)
    got = pool_normalize(x.to(device), cu, "cls", False, precision, ranges, backend=backend).cpu().numpy()
    np.testing.assert_array_equal(got, want, err_msg=f"pool_normalize backend={backend} on {device}")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU on this machine"))])
def test_the_tie_tests_cover_the_reference_and_the_compiled_kernel(device, kernel_backends):
    backends = kernel_backends("quantize_embeddings", device)
    assert "torch" in backends and ("cpp" in backends or device == "cuda")


def test_tie_inputs_detect_a_reciprocal_step(reference_quantize):
    """The flaw found on the GPU, replayed on the host: a step computed as (max - min) * (1/255)
    moves ties, so the tests above fail for any backend that computes its step that way."""
    x, ranges = tie_inputs()
    lo, hi = ranges.numpy()
    recip_step = (hi - lo) * np.float32(1.0 / 255.0)
    assert (recip_step != (hi - lo) / np.float32(255.0)).any()
    q = np.clip(np.floor((x.numpy() - lo) / recip_step + np.float32(0.5)), 0, 255).astype(np.uint8)
    assert (q != reference_quantize(x.numpy(), "uint8", ranges.numpy())).mean() > 0.05


# ---------------------------------------------------------------- CUDA kernel vs CPU kernel, arguments

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


@pytest.mark.backends("quantize_embeddings", device="cpu")
def test_launcher_arguments_are_checked(backend, device):
    hidden = torch.randn(7, 8)
    with pytest.raises(ValueError, match="ranges"):
        quantize_embeddings(hidden, "uint8", ranges=np.zeros((2, 9), np.float32), backend=backend)
    with pytest.raises(ValueError, match="needs quantization ranges"):
        quantize_embeddings(hidden, "int8", backend=backend)
    with pytest.raises(TypeError):
        quantize_embeddings(hidden.double(), "float32", backend=backend)
