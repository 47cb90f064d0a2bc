"""The pooling head: hidden states of a packed batch -> the requested embeddings.

Pooling (mean or CLS), the optional sentence-transformers Dense layers, Matryoshka-style
truncation to the first k dimensions, L2 normalization and the output precision. Without
Dense layers or truncation all of it is one fused kernel (pool_normalize) that writes only
the final bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from postembed_fast.kernels import pool_normalize, quantize_embeddings
from postembed_fast.kernels.checks import QuantRanges


@dataclass(frozen=True)
class HeadOptions:
    """One embed() call's output options, checked once at the public boundary."""

    precision: str
    normalize: bool
    dimensions: int | None  # None: all of the model's dimensions
    ranges: QuantRanges | None  # for the precisions that need them


class PoolingHead:
    def __init__(self, pooling: str, dense: list):
        self.pooling, self.dense = pooling, dense

    def __call__(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor, opts: HeadOptions, backend=None) -> torch.Tensor:
        with torch.inference_mode():
            if not self.dense and opts.dimensions is None:
                return pool_normalize(hidden, cu_seqlens, self.pooling, opts.normalize, opts.precision, opts.ranges,
                                      backend=backend)
            x = pool_normalize(hidden, cu_seqlens, self.pooling, False, "float32", backend=backend)
            for dense in self.dense:
                x = dense(x)
            if opts.dimensions is not None:  # keep the first k, re-normalize
                x = x[:, : opts.dimensions]
            if opts.normalize:
                x = torch.nn.functional.normalize(x, dim=1)
            return quantize_embeddings(x.contiguous(), opts.precision, opts.ranges, backend=backend)
