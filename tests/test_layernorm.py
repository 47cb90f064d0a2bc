"""add_layernorm (kernels/layernorm.py): LayerNorm(x + residual) on every backend (torch reference, C++
in each ISA build, Triton) against the definition in float64: odd widths, one row to thousands,
NaN-poisoned outputs, in place into x or the residual (the encoder keeps its activations in a reused
workspace), stride-0 (broadcast) and row-strided inputs, and the launcher's argument checks; the C++
kernel's bfloat16 path (fp32 sum and statistics: its output is its float32 result rounded once).

The C++ kernel takes float32 or bfloat16 (tests/test_dispatch.py); its raw entry point: tests/test_extension.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from postembed_fast.kernels import add_layernorm

FLOAT_TOLS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}  # on ||out - ref|| / ||ref||
GPU_TOLS = {**FLOAT_TOLS, torch.float16: 3e-3}  # Triton compiled for a GPU, as measured there when it was written
# The C++ kernel keeps x + residual and the statistics in fp32 for either storage type: a bf16 output is
# off the float64 result of the same (bf16) inputs by its one rounding, < 2^-9 relative per element.
CPP_TOLS = {torch.float32: 1e-5, torch.bfloat16: 2 ** -8}
SHAPES = [(1, 384), (7, 250), (129, 64), (1, 1), (7, 64), (33, 250), (5, 384), (3, 1000)]  # (rows, H)


def inputs(rows, H, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x, r = torch.randn(rows, H, generator=g) * 3, torch.randn(rows, H, generator=g) + 0.5
    w, b = torch.randn(H, generator=g), torch.randn(H, generator=g)
    return tuple(t.to(device) for t in (x, r, w, b))


def definition64(x, r, w, b, eps):
    """(y - mean) / sqrt(var + eps) * w + b of y = x + r, per row, in float64 (biased variance)."""
    y = x.double().cpu() + r.double().cpu()
    norm = (y - y.mean(-1, keepdim=True)) / torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + eps)
    return norm * w.double().cpu() + b.double().cpu()


def ref64(x, r, w, b, eps):
    return F.layer_norm(x.double().cpu() + r.double().cpu(), (x.shape[-1],), w.double().cpu(), b.double().cpu(), eps)


def rel_err(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    assert not torch.isnan(out).any(), "NaN in the output: an element was never written"
    return float((out - ref).norm() / ref.norm())


def max_abs(out, ref):
    return float((out.double().cpu() - ref).abs().max())


def interpreted(backend, device):
    return backend == "triton" and device == "cpu"


def takes(backend, dtype):
    return backend != "cpp" or dtype in CPP_TOLS  # the C++ kernel: float32 and bfloat16 (tests/test_dispatch.py)


@pytest.mark.backends("add_layernorm", "rows, H, dtype", [(n, h, d) for n, h in SHAPES for d in FLOAT_TOLS],
                      cpu_isa=True, keep=lambda backend, device, rows, H, dtype: takes(backend, dtype))
def test_matches_float64_reference(backend, device, rows, H, dtype):
    torch.manual_seed(0)
    x, r = (torch.randn(rows, H, device=device).to(dtype) for _ in range(2))
    w, b = torch.randn(H, device=device).to(dtype), torch.randn(H, device=device).to(dtype)
    ref = definition64(x, r, w, b, 1e-12)
    tol = (GPU_TOLS if device == "cuda" else CPP_TOLS if backend == "cpp" else FLOAT_TOLS)[dtype]
    buf = torch.full((rows, H), float("nan"), dtype=dtype, device=device)
    out = add_layernorm(x, r, w, b, 1e-12, backend=backend, out=buf)
    assert out is buf and out.dtype == dtype
    if H == 1:  # LayerNorm of one element is exactly its bias
        torch.testing.assert_close(out.double().cpu(), ref, atol=0, rtol=0)
    else:
        assert rel_err(out, ref) < tol
    fresh = add_layernorm(x, r, w, b, 1e-12, backend=backend)
    assert fresh.dtype == dtype and fresh.shape == (rows, H) and rel_err(fresh, ref) < tol


@pytest.mark.backends("add_layernorm", "rows, H, where",
                      [(n, h, where) for n in (1, 7, 97, 4097) for h in (384, 250, 768, 1)
                       for where in ("fresh", "into-x", "into-residual", "poisoned-buffer")],
                      cpu_isa=True,
                      keep=lambda backend, device, rows, H, where: rows <= 7 or not interpreted(backend, device))
def test_float32_in_place_and_into_poisoned_buffers(backend, device, rows, H, where):
    x, r, w, b = inputs(rows, H, device=device)
    ref = ref64(x, r, w, b, 1e-12)
    out = {"fresh": None, "into-x": x, "into-residual": r,
           "poisoned-buffer": torch.full((rows, H), float("nan"), device=device)}[where]
    got = add_layernorm(x, r, w, b, 1e-12, backend=backend, out=out)
    assert out is None or got is out
    assert not torch.isnan(got).any()
    assert max_abs(got, ref) < 1e-5


@pytest.mark.backends("add_layernorm", "rows, H, where",
                      [(n, h, where) for n in (1, 7, 129, 4097) for h in (384, 250, 1)
                       for where in ("fresh", "into-x", "into-residual", "poisoned-buffer")],
                      cpu_isa=True, keep=lambda backend, device, rows, H, where: backend == "cpp")
def test_cpp_bfloat16_is_its_float32_result_rounded_once(backend, device, rows, H, where):
    """bf16 x, residual, weight, bias -> bf16 out, in place or not: bit for bit the float32 kernel's result
    on the same values rounded to nearest even (the sum x + residual is never rounded to bf16)."""
    x, r, w, b = (t.to(torch.bfloat16) for t in inputs(rows, H, seed=4))
    want = add_layernorm(x.float(), r.float(), w.float(), b.float(), 1e-12, backend=backend).to(torch.bfloat16)
    out = {"fresh": None, "into-x": x.clone(), "into-residual": r.clone(),
           "poisoned-buffer": torch.full((rows, H), float("nan"), dtype=torch.bfloat16)}[where]
    xs, rs = (out if where == "into-x" else x), (out if where == "into-residual" else r)
    got = add_layernorm(xs, rs, w, b, 1e-12, backend=backend, out=out)
    assert out is None or got is out
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    if H > 1:
        assert rel_err(got, definition64(x, r, w, b, 1e-12)) < CPP_TOLS[torch.bfloat16]


@pytest.mark.backends("add_layernorm")
def test_launcher_out_in_place(backend, device):
    x, r, w, b = inputs(9, 32, seed=2, device=device)
    ref = add_layernorm(x, r, w, b, 1e-6, backend="torch")
    xi = x.clone()
    assert add_layernorm(xi, r, w, b, 1e-6, backend=backend, out=xi) is xi
    torch.testing.assert_close(xi, ref, rtol=1e-5, atol=1e-5)
    ri = r.clone()
    assert add_layernorm(x, ri, w, b, 1e-6, backend=backend, out=ri) is ri
    torch.testing.assert_close(ri, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="out must be a torch.float32 tensor of shape"):
        add_layernorm(x, r, w, b, 1e-6, backend=backend, out=torch.empty(9, 31, device=device))


@pytest.mark.backends("add_layernorm")
def test_broadcast_and_row_strided_inputs(backend, device):
    """The encoder's embedding LayerNorm passes a stride-0 residual (token_type0.expand_as(x)); row
    slices of wider buffers are read in place; a stride-0 x works too."""
    x, r, w, b = inputs(33, 64, seed=1, device=device)
    row = torch.randn(64, device=device)
    got = add_layernorm(x, row.expand(33, 64), w, b, 1e-5, backend=backend)  # stride-0 residual rows
    assert max_abs(got, ref64(x, row.expand(33, 64), w, b, 1e-5)) < 1e-5
    wide = torch.randn(33, 100, device=device)
    got = add_layernorm(wide[:, 10:74], r[:, :64].contiguous(), w, b, 1e-5, backend=backend)  # row pitch 100
    assert max_abs(got, ref64(wide[:, 10:74], r[:, :64], w, b, 1e-5)) < 1e-5

    torch.manual_seed(0)
    x, vec, w, b = torch.randn(9, 96, device=device), *(torch.randn(96, device=device) for _ in range(3))
    out = add_layernorm(x, vec.expand_as(x), w, b, 1e-5, backend=backend)
    assert rel_err(out, ref64(x, vec.expand_as(x), w, b, 1e-5)) < 1e-5

    x, r, w, b = inputs(5, 32, seed=6, device=device)
    row = torch.randn(32, device=device)
    got = add_layernorm(row.expand(5, 32), r, w, b, 1e-5, backend=backend)  # x with row stride 0
    assert max_abs(got, ref64(row.expand(5, 32), r, w, b, 1e-5)) < 1e-5


def test_launcher_arguments_are_checked():
    h = torch.randn(10, 8)
    with pytest.raises(ValueError, match="residual"):
        add_layernorm(h, h[:, :4], torch.ones(8), torch.zeros(8), 1e-5)
    x, r, w, b = inputs(5, 32, seed=6)
    with pytest.raises(ValueError, match="weight is on meta"):
        add_layernorm(x, r, w.to("meta"), b, 1e-5)
