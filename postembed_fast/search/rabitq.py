"""RaBitQ-class 1-bit codes for EmbeddingIndex(dim, precision="rabitq") (Gao & Long, RaBitQ,
arXiv 2405.12497; FAISS IndexRaBitQ is the peer).

A vector x is stored as the signs of x' = (x - c) R (R a seeded random orthogonal [dim, dim] rotation,
c a centroid; nothing is trained on the database), packed like ubinary codes, plus two float32
correction factors (float64 arithmetic, rounded once):
  row_scale = ||x'||^2 / sum_d |x'_d|     (= ||x - c|| / (sqrt(dim) <x_bar, o>), 0 for x = c)
  row_add   = <x, c> - <c, c>
where x_bar = sign(x') / sqrt(dim) is the quantized unit vector and o = x' / ||x'||. A query q is
rotated the same way, q' = (q - c) R, and quantized to int8 per query (8 bits, symmetric: q8 =
rint(q' * 127 / max_d |q'_d|), half to even; measured on 5,000 real titles -> texts: recall@10 0.736
at 8 bits against 0.730 at 4, and the AVX2 scan costs the same for either), with
  q_scale = max_d |q'_d| / 127,   q_add = <q, c>.
The estimate of <q, x> is RaBitQ's unbiased estimator of <q - c, x - c>, <x_bar, q'> / <x_bar, o>,
times ||x - c||, plus the centroid terms:
  score = row_scale * (q_scale * S) + row_add + q_add,   S = sum_d q8_d * (bit d ? +1 : -1)
S is an exact integer (kernels/sign_dot_topk.py's score), so the scan (kernels/rabitq_topk.py)
evaluates the same float64 operations as a numpy reference and rounds to float32.

Rows are stored as uint8 [n, B + 8]: B = ceil(dim / 8) bytes of sign bits, then row_scale and row_add
as little-endian float32 (the table's row_factors), FAISS's layout of a 1-bit RaBitQ code.
"""
from __future__ import annotations

import numpy as np
import torch

SEED = 0  # the rotation's seed: a fixed, documented rotation per dimension
QUERY_LEVELS = 127  # the query's int8 range [-127, 127] (8 bits)
FACTORS = 2  # float32 per row: row_scale, row_add


def random_rotation(dim: int, seed: int = SEED) -> np.ndarray:
    """A uniformly random orthogonal [dim, dim] matrix (QR of a Gaussian, signs fixed), float32."""
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, dim)))
    return np.ascontiguousarray(q * np.where(np.diag(r) < 0, -1.0, 1.0), dtype=np.float32)


class RaBitQCodes:
    """The encoder of one rabitq index: its rotation and centroid (float32, as saved; used in float64)."""

    def __init__(self, dim: int, rotation: np.ndarray, centroid: np.ndarray):
        self.dim = dim
        self.rotation = np.ascontiguousarray(rotation, dtype=np.float32)
        self.centroid = np.ascontiguousarray(centroid, dtype=np.float32)
        self._rot64 = self.rotation.astype(np.float64)
        self._c64 = self.centroid.astype(np.float64)
        self._cc = float(self._c64 @ self._c64)
        self.bit_bytes = (dim + 7) // 8

    def encode(self, x: np.ndarray) -> np.ndarray:
        """float vectors [n, dim] -> stored rows uint8 [n, B + 8] (sign bits, row_scale, row_add)."""
        x64 = x.astype(np.float64)
        xr = (x64 - self._c64) @ self._rot64
        bits = np.packbits(xr > 0, axis=1)
        l1 = np.abs(xr).sum(axis=1)
        l2 = np.square(xr).sum(axis=1)
        factors = np.empty((len(x), FACTORS), "<f4")
        factors[:, 0] = np.divide(l2, l1, out=np.zeros_like(l1), where=l1 > 0)
        factors[:, 1] = x64 @ self._c64 - self._cc
        return np.concatenate([bits, factors.view(np.uint8)], axis=1)

    def queries(self, qf: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """float queries [nq, dim] -> (q8 int8 [nq, 8 B], q_scale float64 [nq], q_add float64 [nq]).
        einsum, not BLAS, for the small query products (see EmbeddingIndex._rotate)."""
        q64 = qf.astype(np.float64)
        qr = np.einsum("nd,de->ne", q64 - self._c64, self._rot64)
        peak = np.abs(qr).max(axis=1) if qr.size else np.zeros(len(qr))
        scale = np.divide(QUERY_LEVELS, peak, out=np.zeros_like(peak), where=peak > 0)  # a zero query: all 0
        q8 = np.zeros((len(qr), 8 * self.bit_bytes), np.int8)
        q8[:, : self.dim] = np.rint(qr * scale[:, None]).clip(-QUERY_LEVELS, QUERY_LEVELS).astype(np.int8)
        q_scale = peak / QUERY_LEVELS
        q_add = np.einsum("nd,d->n", q64, self._c64)
        return (torch.from_numpy(q8).to(device), torch.from_numpy(q_scale).to(device),
                torch.from_numpy(q_add).to(device))

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stored rows [n, B + 8] -> (sign bits uint8 [n, B] (a view), row_scale, row_add float32 [n])."""
        b = self.bit_bytes
        f = torch.empty((rows.shape[0], 4 * FACTORS), dtype=torch.uint8, device=rows.device)
        f = f.copy_(rows[:, b:]).view(torch.float32)  # a dense copy at offset 0; little-endian hosts
        return rows[:, :b], f[:, 0].contiguous(), f[:, 1].contiguous()
