"""What the precision table (kernels/precision.py) states about the outputs, checked against the compiled
codes and quantize_embeddings. (Kept here for tests/test_precision.py, which holds the precision table's
tests. Quantization itself on every backend, exact ties included: tests/test_quantize.py.)"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from postembed_fast.kernels import quantize_embeddings
from postembed_fast.kernels.precision import PRECISIONS, TABLE


def test_precision_table_agrees_with_the_compiled_codes():
    """The C++/CUDA kernels take the table's integer codes: the bindings export theirs."""
    from postembed_fast.kernels import _ext

    if _ext._C is None:
        pytest.skip(f"compiled extension unavailable: {_ext.UNAVAILABLE_REASON}")
    assert dict(_ext._C.PRECISION_CODES) == {name: spec.code for name, spec in TABLE.items() if spec.is_output}


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
