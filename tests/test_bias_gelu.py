"""bias_gelu (kernels/gelu.py): the exact (erf) GELU of x + bias, BERT's activation, on every backend
(the torch reference, C++ in each ISA build, Triton) against the definition in float64, NaN-poisoned
outputs, in place, NaN propagation, and the launcher's argument check; the C++ kernel's bfloat16 path
(fp32 math: its output is its float32 result rounded once). Which dtypes the C++ kernel takes (float32
and bfloat16) and what backend=None picks: tests/test_dispatch.py."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from postembed_fast.kernels import bias_gelu

FLOAT_TOLS = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 2e-2}  # on ||out - ref|| / ||ref||
# Triton compiled for a GPU (its erf and casts are the device's), as measured there when it was written
GPU_TOLS = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
# The C++ kernel: fp32 math (erf within 3.7e-7 absolute) for either storage type; a bf16 output is off the
# float64 result of the same (bf16) inputs by its one rounding, < 2^-9 relative per element.
CPP_TOLS = {torch.float32: 1e-6, torch.bfloat16: 2 ** -8}
SHAPES = [(1, 1536), (97, 250), (7, 1), (1, 1), (7, 128), (33, 250), (5, 1536), (129, 384), (7, 1537)]  # (rows, features)


def takes(backend, dtype):
    return backend != "cpp" or dtype in CPP_TOLS  # the C++ kernel: float32 and bfloat16 (tests/test_dispatch.py)

def definition64(x, bias):
    y = x.double().cpu() + (0 if bias is None else bias.double().cpu())
    return y * 0.5 * (1 + torch.special.erf(y / math.sqrt(2)))


def rel_err(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    assert not torch.isnan(out).any(), "NaN in the output: an element was never written"
    return float((out - ref).norm() / ref.norm())


@pytest.mark.backends("bias_gelu", "n, f, with_bias, dtype",
                      [(n, f, with_bias, dtype) for n, f in SHAPES for with_bias in (True, False)
                       for dtype in FLOAT_TOLS], cpu_isa=True,
                      keep=lambda backend, device, n, f, with_bias, dtype: takes(backend, dtype)
                      and (n * f < 10_000 or backend != "triton" or device == "cuda"))
def test_matches_float64_reference(backend, device, n, f, with_bias, dtype):
    torch.manual_seed(5)
    x = (torch.randn(n, f) * 3).to(dtype).to(device)
    bias = torch.randn(f).to(dtype).to(device) if with_bias else None
    ref = definition64(x, bias)
    tol = (GPU_TOLS if device == "cuda" else CPP_TOLS if backend == "cpp" else FLOAT_TOLS)[dtype]
    buf = torch.full((n, f), float("nan"), dtype=dtype, device=device)
    out = bias_gelu(x, bias, backend=backend, out=buf)
    assert out is buf and out.dtype == dtype
    assert rel_err(out, ref) < tol
    fresh = bias_gelu(x, bias, backend=backend)
    assert fresh.dtype == dtype and fresh.shape == (n, f) and rel_err(fresh, ref) < tol


@pytest.mark.backends("bias_gelu", "n, f, with_bias, where",
                      [(n, f, with_bias, where) for n in (1, 7, 129) for f in (384, 1536, 13)
                       for with_bias in (True, False) for where in ("fresh", "in-place", "poisoned-buffer")],
                      cpu_isa=True, keep=lambda backend, device, n, f, with_bias, where: backend == "cpp")
def test_cpp_bfloat16_is_its_float32_result_rounded_once(backend, device, n, f, with_bias, where):
    """Bit for bit the float32 kernel's result on the same values, rounded to nearest even; every column
    (the vector body and the tail) and every row written."""
    g = torch.Generator().manual_seed(n * f)
    x = (torch.randn(n, f, generator=g) * 3).to(torch.bfloat16)
    bias = torch.randn(f, generator=g).to(torch.bfloat16) if with_bias else None
    want = bias_gelu(x.float(), None if bias is None else bias.float(), backend=backend).to(torch.bfloat16)
    src = x.clone()
    out = {"fresh": None, "in-place": src, "poisoned-buffer": torch.full((n, f), float("nan"), dtype=torch.bfloat16)}[where]
    got = bias_gelu(src, bias, backend=backend, out=out)
    assert out is None or got is out
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert rel_err(got, definition64(x, bias)) < CPP_TOLS[torch.bfloat16]


@pytest.mark.backends("bias_gelu", "dtype", [(torch.float32,), (torch.bfloat16,)], cpu_isa=True,
                      keep=lambda backend, device, dtype: takes(backend, dtype)
                      and (backend != "triton" or device == "cuda" or dtype == torch.float32))
def test_nan_and_infinities(backend, device, dtype):
    """NaN stays NaN (as torch's gelu); +inf -> +inf; large negative inputs -> -0 or a tiny negative."""
    x = torch.tensor([[float("nan"), float("inf"), -30.0, 30.0, 0.0, -1.0, 1.0, 2.5, -2.5]], dtype=dtype).to(device)
    got = bias_gelu(x, None, backend=backend).double().cpu()[0]
    assert torch.isnan(got[0]) and got[1] == float("inf")
    assert -1e-30 < float(got[2]) <= 0 and float(got[3]) == 30.0 and float(got[4]) == 0.0
    ref = definition64(x[:, 5:], None)[0]
    assert float((got[5:] - ref).abs().max()) < (1e-6 if dtype == torch.float32 else 2 ** -8 * 2.5)


@pytest.mark.backends("bias_gelu", cpu_isa=True)
def test_in_place(backend, device):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(9, 32, generator=g) * 3).to(device)
    h = x.clone()
    assert bias_gelu(h, None, backend=backend, out=h) is h
    torch.testing.assert_close(h, F.gelu(x.double()).float(), rtol=1e-5, atol=1e-5)
    h = x.clone()
    assert bias_gelu(h, torch.ones(32, device=device), backend=backend, out=h) is h
    torch.testing.assert_close(h, F.gelu(x.double() + 1).float(), rtol=1e-5, atol=1e-5)


def test_launcher_arguments_are_checked():
    with pytest.raises(ValueError, match="bias"):
        bias_gelu(torch.randn(10, 8), torch.zeros(3))
