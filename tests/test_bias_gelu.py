"""bias_gelu (kernels/gelu.py): the exact (erf) GELU of x + bias, BERT's activation, on every backend
(the torch reference and Triton; there is no C++ one: the encoder uses torch's in-place gelu_ on CPU)
against the definition in float64, NaN-poisoned outputs, in place, and the launcher's argument check."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from postembed_fast.kernels import bias_gelu

FLOAT_TOLS = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 2e-2}  # on ||out - ref|| / ||ref||
# Triton compiled for a GPU (its erf and casts are the device's), as measured there when it was written
GPU_TOLS = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
SHAPES = [(1, 1536), (97, 250), (7, 1), (1, 1), (7, 128), (33, 250), (5, 1536)]  # (rows, features)


def definition64(x, bias):
    y = x.double().cpu() + (0 if bias is None else bias.double().cpu())
    return y * 0.5 * (1 + torch.special.erf(y / math.sqrt(2)))


def rel_err(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    assert not torch.isnan(out).any(), "NaN in the output: an element was never written"
    return float((out - ref).norm() / ref.norm())


@pytest.mark.backends("bias_gelu", "n, f, with_bias, dtype",
                      [(n, f, with_bias, dtype) for n, f in SHAPES for with_bias in (True, False)
                       for dtype in FLOAT_TOLS])
def test_matches_float64_reference(backend, device, n, f, with_bias, dtype):
    torch.manual_seed(5)
    x = (torch.randn(n, f) * 3).to(dtype).to(device)
    bias = torch.randn(f).to(dtype).to(device) if with_bias else None
    ref = definition64(x, bias)
    tol = (GPU_TOLS if device == "cuda" else FLOAT_TOLS)[dtype]
    buf = torch.full((n, f), float("nan"), dtype=dtype, device=device)
    out = bias_gelu(x, bias, backend=backend, out=buf)
    assert out is buf and out.dtype == dtype
    assert rel_err(out, ref) < tol
    fresh = bias_gelu(x, bias, backend=backend)
    assert fresh.dtype == dtype and fresh.shape == (n, f) and rel_err(fresh, ref) < tol


@pytest.mark.backends("bias_gelu")
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
