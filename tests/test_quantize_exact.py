"""Quantization is bit-exact on every backend: int8/uint8 codes, exact .5 rounding ties
included, equal the documented formula evaluated on the host in numpy float32
(kernels/precision.py), for the torch reference, the C++ and CUDA kernels and Triton.

On the first GPU run (H200) the Triton codes differed from torch's at 53% of the ties. The
kernel was right: torch on CUDA computes `tensor / python_number` as a multiplication by the
reciprocal (ATen's div_true_kernel_cuda), so the reference's step (max - min) / 255 was one ulp
off in some dimensions. The reference now divides by a tensor. On this CPU-only machine the
CUDA cases skip; on a GPU machine they run and compare every backend with the host numpy
formula, which is what would have caught it. test_tie_inputs_detect_a_reciprocal_step shows
here that the inputs are sharp enough to expose a one-ulp step.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from postembed_fast.kernels import dispatch, pool_normalize, quantize_embeddings
from postembed_fast.kernels.precision import PRECISIONS, TABLE

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                               reason="no CUDA GPU on this machine"))]


def tie_inputs(d=256, seed=3):
    """x sitting on every .5 tie (and the clip edges) of every dimension, and its ranges."""
    g = torch.Generator().manual_seed(seed)
    half = 0.05 + 0.15 * torch.rand(d, generator=g)
    centre = 0.02 * torch.randn(d, generator=g)
    lo, hi = centre - half, centre + half
    code = torch.arange(-1, 256, dtype=torch.float32)[:, None]
    step = (hi - lo) / torch.full_like(hi, 255.0)  # computed on the CPU: IEEE division
    return (lo + (code + 0.5) * step).contiguous(), torch.stack([lo, hi])


def backends_for(op, device):
    """The backends of `op` that run on `device` here (triton on CPU only under TRITON_INTERPRET=1)."""
    impls = dispatch.implemented()[op]
    return [b for b in impls if dispatch.unavailable_reason(b, device) is None
            and (b != "triton" or device == "cuda" or dispatch.triton_interpret())]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["uint8", "int8"])
def test_exact_ties_equal_the_host_formula_on_every_backend(device, precision, reference_quantize):
    x, ranges = tie_inputs()
    want = reference_quantize(x.numpy(), precision, ranges.numpy())  # numpy float32 on the host
    backends = backends_for("quantize_embeddings", device)
    assert "torch" in backends and ("cpp" in backends or device == "cuda")
    for backend in backends:
        got = quantize_embeddings(x.to(device), precision, ranges, backend=backend).cpu().numpy()
        np.testing.assert_array_equal(got, want, err_msg=f"quantize_embeddings backend={backend} on {device}")
    # pool_normalize (cls pooling of one-token sequences, no normalization) writes the same codes
    cu = torch.arange(x.shape[0] + 1, dtype=torch.int32, device=device)
    for backend in backends_for("pool_normalize", device):
        got = pool_normalize(x.to(device), cu, "cls", False, precision, ranges, backend=backend).cpu().numpy()
        np.testing.assert_array_equal(got, want, err_msg=f"pool_normalize backend={backend} on {device}")


def test_tie_inputs_detect_a_reciprocal_step(reference_quantize):
    """The flaw found on the GPU, replayed on the host: a step computed as (max - min) * (1/255)
    moves ties, so the test above fails for any backend that computes its step that way."""
    x, ranges = tie_inputs()
    lo, hi = ranges.numpy()
    recip_step = (hi - lo) * np.float32(1.0 / 255.0)
    assert (recip_step != (hi - lo) / np.float32(255.0)).any()
    q = np.clip(np.floor((x.numpy() - lo) / recip_step + np.float32(0.5)), 0, 255).astype(np.uint8)
    assert (q != reference_quantize(x.numpy(), "uint8", ranges.numpy())).mean() > 0.05


def test_precision_table_agrees_with_the_compiled_codes():
    """The C++/CUDA kernels take the table's integer codes: the bindings export theirs."""
    from postembed_fast.kernels import _ext

    if _ext._C is None:
        pytest.skip(f"compiled extension unavailable: {_ext.UNAVAILABLE_REASON}")
    assert dict(_ext._C.PRECISION_CODES) == {name: spec.code for name, spec in TABLE.items()}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dim", [1, 8, 13, 384])
def test_precision_table_describes_the_outputs(precision, dim, reference_quantize):
    """Output dtype and width of every precision as the table states them, = numpy's formula."""
    spec = TABLE[precision]
    x = torch.randn(5, dim)
    ranges = torch.stack([torch.full((dim,), -3.0), torch.full((dim,), 3.0)]) if spec.needs_ranges else None
    out = quantize_embeddings(x.numpy(), precision, ranges)
    assert out.dtype == spec.numpy_dtype and out.shape == (5, spec.columns(dim))
    assert out.nbytes == 5 * spec.row_bytes(dim)
    want = reference_quantize(x.numpy(), precision, None if ranges is None else ranges.numpy())
    np.testing.assert_array_equal(out, want)
    if spec.needs_ranges:
        with pytest.raises(ValueError, match="needs quantization ranges"):
            quantize_embeddings(x.numpy(), precision)


def test_unknown_precision_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid: float32, float16, int8, uint8, binary, ubinary"):
        quantize_embeddings(np.zeros((1, 4), np.float32), "int4")
