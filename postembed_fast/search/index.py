"""EmbeddingIndex: exact (brute-force) top-k search over quantized embeddings.

A system part on top of the engine's public API (postembed_fast.quantize_embeddings, the scan
launchers of postembed_fast.kernels); the engine never imports this module.

    index = EmbeddingIndex.for_embedder(embedder, precision="binary", keep_float16=True)
    index.add(embedder.embed(texts), ids=post_ids)
    scores, ids = index.search(embedder.embed(queries), k=10, rescore=4)

Rows are kept in insertion order; that order breaks score ties (earlier first). An upsert replaces
the vector of an existing id in place (the id keeps its position). Scores:
  binary:  8 * bytes - Hamming distance (int32) of the sign bits (of R x, with a rotation R)
  int8:    an estimate of the float dot product <q, x> (float32): the stored codes decode to
           x_d ~ lo_d + step_d (x8_d + 128) (lo, hi = the ranges, step = (hi - lo) / 255), so
           <q, x> ~ sum_d w_d x8_d + sum_d q_d (lo_d + 128 step_d) with w_d = q_d step_d; w is
           quantized to int8 per query (w8 = rint(w * 127 / max|w|)) and the scan is the exact
           integer dot S = w8 . x8: score = (max|w| / 127) * S + sum_d q_d (lo_d + 128 step_d), in
           float64, rounded to float32; ranked by S (ties by insertion order). int8 code queries
           are decoded the same way first. (Before: the integer (q - z).(x - z) of codes centred
           on the code of 0.0, which weights dimension d by 1 / step_d^2.)
  rabitq:  RaBitQ's estimate of <q, x> (float32) from 1 bit per dimension (search/rabitq.py)
  float16 / float32: dot product (float32)
  rescore=r: the top k*r by the index precision re-ranked by exact float32 dot products with the
  stored float16 vectors (keep_float16=True); the returned scores are then those dot products.
  A binary index takes those k*r candidates by the asymmetric score sum_d q8_d * s_d instead
  (q8: the float query, rotated, quantized to int8 per query; s_d = +1 / -1 for a set / clear
  bit), which finds far more of the exact top k than Hamming does (see search()); with
  search(prefilter=f), computed for the Hamming top f * k * r rows only (query bits: q8_d > 0).

Rotation (binary only): EmbeddingIndex(dim, precision="binary", rotation=R) binarizes x @ R (R an
orthogonal [dim, dim] matrix, e.g. itq_rotation(vectors), ITQ) instead of x, which balances the
variance over the sign bits. Dot products are rotation-invariant, so the float16 vectors are kept
unrotated and rescoring is unchanged. Binary codes cannot be added or searched with a rotation
(codes from an Embedder are signs of unrotated vectors).
A row with fewer than k allowed / present candidates ends with id -1 and the lowest score
(INT32_MIN for integer scores, -inf for float ones).

Which model made the vectors: an index made by for_embedder() (or given model_tag=) records the
Embedder's model_tag (and, for int8, its quantization ranges). check_embedder(embedder) raises
ValueError when an Embedder does not match; add() and search() take model_tag= and refuse float
vectors tagged with another model. Vectors passed without model_tag are trusted.

save(path) writes a folder: header.json (format, dim, precision, model tag, counters) and
arrays.safetensors (codes, ids, ranges, rotation, float16 vectors): no pickle anywhere. An index
with a rotation is saved as format /2, a rabitq index as /3 (its rotation and centroid as arrays
"rabitq_rotation", "rabitq_centroid"), which older loaders refuse instead of misreading; /1 and /2
files load as before.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from postembed_fast.kernels import (
    float16_rerank,
    float_topk,
    gated_sign_dot_topk,
    hamming_kth_score,
    hamming_topk,
    int8_topk,
    quantize_embeddings,
    rabitq_topk,
    sign_dot_topk,
)
from postembed_fast.kernels.precision import TABLE, Precision
from postembed_fast.search.rabitq import RaBitQCodes, random_rotation

FORMAT = "postembed_fast.EmbeddingIndex/1"
FORMAT_ROTATED = "postembed_fast.EmbeddingIndex/2"  # /1 + a rotation (arrays "rotation")
FORMAT_RABITQ = "postembed_fast.EmbeddingIndex/3"  # /1 + a rabitq encoder (arrays "rabitq_rotation", "rabitq_centroid")
FORMATS = (FORMAT, FORMAT_ROTATED, FORMAT_RABITQ)
# The index precisions: the precision table's rows that hold their own codes (each names its scan op),
# smallest codes first. The codes' dtype and width, whether they need ranges, are the table's.
INDEX_PRECISIONS = tuple(sorted((name for name, p in TABLE.items() if p.index_precision == name),
                                key=lambda name: TABLE[name].row_bytes(64)))
_INT_LOWEST = -(2**31)
# Binary search with rescore=r, search(prefilter=f): the asymmetric first stage scores only the rows whose
# Hamming score reaches a per-query gate (about f * k * r rows; _prefilter_gates), fused into one scan.
# The default, 12: on 5,000 real titles -> texts recall@10 of exact float32 0.96804 against 0.96806 for
# every row (0.9672 at f = 8, 0.96812 at 16); the speed is in README (bench.search's prefilter rows).
HAMMING_PREFILTER = 12
PREFILTER_STRIDE = 16  # prefilter_gates ranks every 16th row's Hamming score: 1/16 of a scan
INT8_MAX_DIM = 16384  # int8_topk's int32 scores: 16384 * 255 * 255 < 2^31


def _index_spec(precision) -> Precision:
    """The precision table's entry of an index precision, or a ValueError naming the valid ones."""
    spec = TABLE.get(precision) if isinstance(precision, str) else None
    if spec is None or spec.index_precision != spec.name:
        raise ValueError(f"unknown index precision {precision!r}; valid: {', '.join(INDEX_PRECISIONS)}")
    return spec


# The table's scan ops as an index runs them on its codes [n, cols]: (index, queries, codes, k, allow mask)
def _scan_hamming(index, q, codes, k, allow):
    return hamming_topk(q, codes, k, allow)


def _scan_int8(index, q, codes, k, allow):
    """q: (w8 int8 [nq, dim], scale, constant float64 [nq]) from _int8_query: the integer top-k of
    w8 . x8, then the float estimate scale * S + constant (float64 -> float32; -inf where no row)."""
    w8, scale, const = q
    s, rows = int8_topk(w8, codes, k, None, allow)
    est = (scale.to(s.device)[:, None] * s.double() + const.to(s.device)[:, None]).float()
    return est.masked_fill(rows < 0, float("-inf")), rows


def _scan_rabitq(index, q, codes, k, allow):
    """q: (q8, q_scale, q_add) from RaBitQCodes.queries; the rows' bits and factors split once per change."""
    if index._factors is None:
        index._factors = index._rabitq.split(codes)
    bits, row_scale, row_add = index._factors
    q8, q_scale, q_add = q
    return rabitq_topk(q8, bits, k, q_scale, q_add, row_scale, row_add, allow)


def _scan_float(index, q, codes, k, allow):
    return float_topk(q.float(), codes.float(), k, allow)  # float16 codes: scored in float32


SCANS = {"hamming_topk": _scan_hamming, "int8_topk": _scan_int8, "float_topk": _scan_float,
         "rabitq_topk": _scan_rabitq}


def _recode_hint(spec: Precision, dtype) -> str:
    """For codes of another precision this index holds (ubinary for binary): how to convert them."""
    for other in TABLE.values():
        if other.index_precision == spec.name and other is not spec and other.numpy_dtype == dtype:
            shift = spec.code_offset - other.code_offset
            return f" ({other.name} codes: {'add' if shift > 0 else 'subtract'} {abs(shift)} to get {spec.name} ones)"
    return ""


# R.T @ R may differ from the identity by this much (float32 rounding of an orthogonal matrix: ~1e-6)
ROTATION_TOLERANCE = 1e-4


def _as_array(name: str, x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except Exception as exc:  # ragged lists and the like
            raise TypeError(f"{name} must be an array, got {type(x).__name__}: {exc}") from None
    return x


def _check_rotation(rotation, dim: int) -> np.ndarray:
    """A [dim, dim] orthogonal float matrix as float32, or ValueError / TypeError naming the problem."""
    r = _as_array("rotation", rotation)
    if not (np.issubdtype(r.dtype, np.floating) or np.issubdtype(r.dtype, np.integer)) or r.dtype == np.bool_:
        raise TypeError(f"rotation must be a float matrix, got {r.dtype}")
    if r.shape != (dim, dim):
        raise ValueError(f"rotation must have shape ({dim}, {dim}) (dim x dim), got {r.shape}")
    r64 = r.astype(np.float64)
    if not np.isfinite(r64).all():
        raise ValueError("rotation has NaN or infinite values")
    err = float(np.abs(r64.T @ r64 - np.eye(dim)).max())
    if err > ROTATION_TOLERANCE:
        raise ValueError(f"rotation must be orthogonal (R.T @ R = I): max |R.T @ R - I| = {err:.3g} > "
                         f"{ROTATION_TOLERANCE}")
    return np.ascontiguousarray(r, dtype=np.float32)


def _check_centroid(centroid, dim: int) -> np.ndarray:
    """A finite float vector [dim] as float32, or ValueError / TypeError naming the problem."""
    c = _as_array("centroid", centroid)
    if not np.issubdtype(c.dtype, np.floating):
        raise TypeError(f"centroid must be a float vector, got {c.dtype}")
    if c.shape != (dim,):
        raise ValueError(f"centroid must have shape ({dim},), got {c.shape}")
    if not np.isfinite(c).all():
        raise ValueError("centroid has NaN or infinite values")
    return np.ascontiguousarray(c, dtype=np.float32)


def itq_rotation(vectors, *, iterations=50, seed=0) -> np.ndarray:
    """An ITQ rotation (Gong & Lazebnik, Iterative Quantization) for sign-binarizing `vectors`:
    float32 [dim, dim] orthogonal R minimizing ||sign(V R) - V R||_F, found by alternating
    B = sign(V R) and the orthogonal Procrustes step R = U Wt (U S Wt = svd(V.T B)) from a random
    orthogonal start (`seed`). Pass it as EmbeddingIndex(..., precision="binary", rotation=R).

    vectors: float [n, dim] (n >= dim: fewer leave the rotation undetermined), typically the
    database's own vectors or a sample of them; they are not centred (the index binarizes at 0).
    Computed in float64."""
    v = _as_array("vectors", vectors)
    if v.ndim != 2:
        raise ValueError(f"vectors must be 2-D [n, dim], got shape {v.shape}")
    if not np.issubdtype(v.dtype, np.floating):
        raise TypeError(f"vectors must be float, got {v.dtype}")
    n, dim = v.shape
    if dim < 1:
        raise ValueError("vectors have no dimensions")
    if n < dim:
        raise ValueError(f"itq_rotation needs at least dim={dim} vectors to determine a rotation, got {n}")
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 0:
        raise ValueError(f"iterations must be an int >= 0, got {iterations!r}")
    v = v.astype(np.float64)
    if not np.isfinite(v).all():
        raise ValueError("vectors have NaN or infinite values")
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, dim)))
    rot = q * np.where(np.diag(r) < 0, -1.0, 1.0)  # sign fix: a uniformly random orthogonal start
    for _ in range(int(iterations)):
        b = np.where(v @ rot > 0, 1.0, -1.0)  # the index's bit: x > 0
        u, _, wt = np.linalg.svd(b.T @ v)
        rot = (u @ wt).T
    return np.ascontiguousarray(rot, dtype=np.float32)


class EmbeddingIndex:
    """Exact top-k search over embeddings stored as binary / int8 / float16 / float32 codes."""

    def __init__(self, dim, *, precision="binary", device=None, ranges=None, keep_float16=False, model_tag=None,
                 rotation=None, centroid=None):
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        spec = self.spec = _index_spec(precision)
        if spec.scan == "int8_topk" and dim > INT8_MAX_DIM:
            raise ValueError(f"{precision} index: dim {dim} > {INT8_MAX_DIM} would overflow int32 scores")
        self.dim = int(dim)
        self.precision = precision
        if rotation is not None and not spec.is_output:
            raise ValueError(f"rotation is for precision='binary' only: a {precision!r} index makes its own seeded "
                             "random rotation")
        if rotation is not None and not spec.packed_bits:
            raise ValueError(f"rotation is for precision='binary' only, got {precision!r} (int8 ranges are per "
                             "dimension of the unrotated space; float search is rotation-invariant)")
        if centroid is not None and spec.scan != "rabitq_topk":
            raise ValueError(f"centroid is for precision='rabitq' only, got {precision!r}")
        # rabitq: the encoder (seeded rotation, centroid; zeros unless given)
        self._rabitq = None
        if spec.scan == "rabitq_topk":
            c = np.zeros(self.dim, np.float32) if centroid is None else _check_centroid(centroid, self.dim)
            self._rabitq = RaBitQCodes(self.dim, random_rotation(self.dim), c)
        # float64 copy: x @ R in float64 makes a sign flip from rounding (which would depend on the
        # batch shape the BLAS sees) practically impossible
        self.rotation = None if rotation is None else _check_rotation(rotation, self.dim)
        self._rot64 = None if rotation is None else self.rotation.astype(np.float64)
        self.keep_float16 = bool(keep_float16)
        self.model_tag = None if model_tag is None else str(model_tag)
        self.device = torch.device(device if device is not None else "cpu")
        if spec.needs_ranges:
            if ranges is None:
                raise ValueError(f"an {precision} index needs ranges ([2, dim] per-dimension min and max), or use "
                                 f"EmbeddingIndex.for_embedder(embedder, precision={precision!r})")
            r = np.asarray(_as_array("ranges", ranges), dtype=np.float32)
            if r.shape != (2, self.dim):
                raise ValueError(f"ranges must have shape (2, {self.dim}), got {r.shape}")
            if not np.isfinite(r).all() or not (r[1] > r[0]).all():
                raise ValueError("ranges must be finite with max (row 1) > min (row 0) in every dimension")
            self.ranges = r.copy()
        else:
            self.ranges = None if ranges is None else np.asarray(ranges, dtype=np.float32).copy()
        self._codes = torch.empty(0, spec.index_columns(self.dim), dtype=spec.torch_dtype, device=self.device)
        self._f16 = torch.empty(0, self.dim, dtype=torch.float16, device=self.device) if self.keep_float16 else None
        self._ids = np.empty(0, np.int64)
        self._n = 0
        self._next_id = 0
        self._factors = None  # rabitq: (bits, row_scale, row_add) of the rows, split once per change
        self._sorted = None  # (sorted ids, their rows), rebuilt lazily after a change

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def for_embedder(cls, embedder, *, precision="binary", device=None, keep_float16=False, dim=None, rotation=None,
                     centroid=None):
        """An index for `embedder`'s vectors: its dimension, model_tag and (int8) quantization_ranges;
        rotation: see EmbeddingIndex (binary only). rabitq: centroid defaults to the model's
        embedding_mean (the mean of its calibration posts, shipped like the ranges: posts other than
        the database's), else the midpoint of its ranges, else zeros. Measured on 5,000 real titles ->
        texts, recall@10: 0.736 with the default model's mean, 0.725 with the midpoint, 0.713 with
        zeros, 0.736 with the database's own mean."""
        spec = _index_spec(precision)
        needs_ranges = spec.needs_ranges
        ranges = embedder.quantization_ranges
        if dim is None:
            dim = embedder.dim if hasattr(embedder, "dim") else None
        if dim is None and ranges is not None:
            dim = ranges.shape[1]
        if dim is None:
            dim = int(embedder.embed(["x"]).shape[1])
        if needs_ranges and ranges is None:
            raise ValueError("this Embedder has no quantization_ranges: run embedder.calibrate(texts) first")
        mean = getattr(embedder, "embedding_mean", None)
        if spec.scan == "rabitq_topk" and centroid is None:
            if mean is not None and mean.shape == (dim,):
                centroid = mean
            elif ranges is not None and ranges.shape[1] == dim:
                centroid = (np.asarray(ranges, np.float64).sum(axis=0) / 2).astype(np.float32)
        return cls(dim, precision=precision, device=device, ranges=ranges if needs_ranges else None,
                   keep_float16=keep_float16, model_tag=embedder.model_tag, rotation=rotation, centroid=centroid)

    def check_embedder(self, embedder) -> None:
        """ValueError unless `embedder` made this index's vectors (same model_tag, same int8 ranges)."""
        if self.model_tag is not None and embedder.model_tag != self.model_tag:
            raise ValueError(f"this index holds vectors of model {self.model_tag!r}, the Embedder is "
                             f"{embedder.model_tag!r}")
        if self.spec.needs_ranges:
            r = embedder.quantization_ranges
            if r is None or r.shape != self.ranges.shape or not np.array_equal(r, self.ranges):
                raise ValueError(f"mismatched ranges: the Embedder's quantization_ranges differ from this "
                                 f"{self.precision} index's ranges")

    def _check_tag(self, model_tag):
        if model_tag is not None and self.model_tag is not None and str(model_tag) != self.model_tag:
            raise ValueError(f"vectors of model {model_tag!r} given to an index of model {self.model_tag!r}")

    # ---- basic state ---------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return (f"EmbeddingIndex(dim={self.dim}, precision={self.precision!r}, n={self._n}, device={self.device}, "
                f"keep_float16={self.keep_float16}, model_tag={self.model_tag!r}"
                f"{', rotated' if self.rotation is not None else ''})")

    @property
    def ids(self) -> np.ndarray:
        """int64 ids in row (insertion) order."""
        return self._ids[: self._n].copy()

    @property
    def bytes_per_vector(self) -> int:
        b = self._codes.shape[1] * self._codes.element_size() + 8
        return b + (2 * self.dim if self.keep_float16 else 0)

    def __contains__(self, id_) -> bool:
        return bool(self._lookup(np.asarray([id_], np.int64))[0] >= 0)

    def _changed(self):
        self._sorted = None
        self._factors = None

    def _lookup(self, ids: np.ndarray) -> np.ndarray:
        """rows of `ids` (-1 where absent)."""
        if self._sorted is None:
            order = np.argsort(self._ids[: self._n], kind="stable")
            self._sorted = (self._ids[: self._n][order], order.astype(np.int64))
        sid, srow = self._sorted
        if len(sid) == 0:
            return np.full(len(ids), -1, np.int64)
        pos = np.searchsorted(sid, ids).clip(0, len(sid) - 1)
        return np.where(sid[pos] == ids, srow[pos], -1)

    # ---- input conversion ----------------------------------------------------------------
    def _encode(self, name: str, x, *, need_float: bool = False, quantize: bool = True):
        """vectors or codes -> (codes tensor on device [n, cols], float32 numpy [n, dim] or None).
        quantize=False: float vectors come back as (None, float32) (the caller does not need codes)."""
        x = _as_array(name, x)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2:
            raise ValueError(f"{name} must be 2-D [n, {self.dim}] (or one 1-D vector), got shape {x.shape}")
        spec = self.spec
        cols = spec.columns(self.dim)
        if np.issubdtype(x.dtype, np.floating):
            if x.shape[1] != self.dim:
                raise ValueError(f"{name} have dimension {x.shape[1]}, the index has dim={self.dim}")
            xf = np.ascontiguousarray(x, dtype=np.float32)
            if not np.isfinite(xf).all():
                bad = int(np.argwhere(~np.isfinite(xf).all(1))[0, 0])
                raise ValueError(f"{name} row {bad} has NaN or infinite values")
            if not quantize:
                return None, xf
            if self._rabitq is not None:
                return torch.from_numpy(self._rabitq.encode(xf)).to(self.device), xf
            if spec.is_float:  # a rounding cast, as quantize_embeddings does
                codes = xf.astype(spec.numpy_dtype, copy=False)
            elif self.rotation is not None:
                codes = quantize_embeddings(self._rotate(xf, query=name == "queries").astype(np.float32),
                                            self.precision)
            else:
                codes = quantize_embeddings(xf, self.precision, self.ranges if spec.needs_ranges else None)
            return torch.from_numpy(np.ascontiguousarray(codes)).to(self.device), xf
        if self._rabitq is not None:
            raise ValueError(f"{name}: a rabitq index takes float vectors only (it encodes them with its own rotation "
                             f"and centroid); got {x.dtype} codes")
        if need_float:
            raise ValueError(f"{name}: rescoring needs float vectors, got {x.dtype} codes")
        if self.rotation is not None:
            raise ValueError(f"{name}: this binary index has a rotation, so it takes float vectors only (binary "
                             f"codes, e.g. from an Embedder, are signs of the unrotated vectors); got {x.dtype}")
        if spec.is_float:
            raise TypeError(f"{name} must be float vectors for a {self.precision} index, got {x.dtype}")
        if x.dtype != spec.numpy_dtype:
            raise TypeError(f"{name}: {self.precision} codes must be {spec.numpy_dtype} (float vectors are "
                            f"quantized), got {x.dtype}" + _recode_hint(spec, x.dtype))
        if x.shape[1] != cols:
            raise ValueError(f"{name}: {self.precision} codes of dim {self.dim} have {cols} columns, got {x.shape[1]}")
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.device), None

    def _rotate(self, xf: np.ndarray, *, query: bool = False) -> np.ndarray:
        """x @ R in float64. Queries go through np.einsum's own loop, not BLAS: a
        threaded OpenBLAS call leaves its threads spinning, and on the 2-core machine the scan
        right after it then ran 12-50 ms slower per 256 queries (the rotation itself: ~7 ms)."""
        x64 = xf.astype(np.float64)
        return np.einsum("nd,de->ne", x64, self._rot64) if query else x64 @ self._rot64

    def _query_int8(self, qf: np.ndarray) -> torch.Tensor:
        """Float queries -> the asymmetric first stage's int8 queries [nq, 8 * bytes]: rotated (with a
        rotation), scaled per query by 127 / max|q| and rounded half to even, in float64; zero-padded
        to the packed width (a zero adds nothing to the score)."""
        q = qf.astype(np.float64) if self._rot64 is None else self._rotate(qf, query=True)
        peak = np.abs(q).max(axis=1, keepdims=True) if q.size else np.ones((len(q), 1))
        scale = np.divide(127.0, peak, out=np.zeros_like(peak), where=peak > 0)  # a zero query: all 0
        q8 = np.zeros((len(q), 8 * self.spec.columns(self.dim)), np.int8)
        q8[:, : self.dim] = np.rint(q * scale).clip(-127, 127).astype(np.int8)
        return torch.from_numpy(q8).to(self.device)

    def _int8_query(self, q64: np.ndarray):
        """float64 queries [nq, dim] -> (w8 int8 [nq, dim], scale, constant float64 [nq]) of the int8
        estimate of <q, x> (module docstring): w = q * step, w8 = rint(w * 127 / max|w|) half to even,
        scale = max|w| / 127, constant = sum_d q_d (lo_d + 128 step_d); einsum, not BLAS (see _rotate)."""
        lo = self.ranges[0].astype(np.float64)
        step = (self.ranges[1].astype(np.float64) - lo) / 255
        w = q64 * step
        peak = np.abs(w).max(axis=1) if w.size else np.zeros(len(w))
        mult = np.divide(127.0, peak, out=np.zeros_like(peak), where=peak > 0)  # a zero query: all 0
        w8 = np.rint(w * mult[:, None]).clip(-127, 127).astype(np.int8)
        const = np.einsum("nd,d->n", q64, lo + 128 * step)
        return (torch.from_numpy(w8).to(self.device), torch.from_numpy(peak / 127), torch.from_numpy(const))

    def _decode_int8(self, codes: torch.Tensor) -> np.ndarray:
        """int8 codes -> the float64 vectors they stand for, lo + step (x8 + 128) (the bins' centres)."""
        lo = self.ranges[0].astype(np.float64)
        step = (self.ranges[1].astype(np.float64) - lo) / 255
        return lo + step * (codes.cpu().numpy().astype(np.float64) + 128)

    # ---- mutation ------------------------------------------------------------------------
    def _reserve(self, n: int):
        cap = self._codes.shape[0]
        if n <= cap:
            return
        new = max(n, 2 * cap, 1024)

        def grow(t):
            g = torch.empty((new,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
            g[: self._n] = t[: self._n]
            return g

        self._codes = grow(self._codes)
        if self._f16 is not None:
            self._f16 = grow(self._f16)
        ids = np.empty(new, np.int64)
        ids[: self._n] = self._ids[: self._n]
        self._ids = ids

    def add(self, vectors, ids=None, *, upsert=False, model_tag=None):
        """Add float embeddings (quantized with the index's precision and ranges) or codes already in
        the index's precision. ids: int64 [n] (default: running numbers). An id already present is a
        ValueError unless upsert=True, which replaces its vector in place. Returns the ids (int64)."""
        self._check_tag(model_tag)
        codes, xf = self._encode("vectors", vectors)
        n = codes.shape[0]
        if self.keep_float16 and xf is None:
            raise ValueError("this index keeps float16 vectors for rescoring (keep_float16=True): add float "
                             "vectors, not codes")
        if ids is None:
            ids_np = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        else:
            a = _as_array("ids", ids)
            if a.ndim == 0:
                a = a[None]
            if not (np.issubdtype(a.dtype, np.integer) or (a.size == 0 and a.dtype == np.float64)):
                raise TypeError(f"ids must be integers (int64), got {a.dtype}")
            if a.shape != (n,):
                raise ValueError(f"ids must have shape ({n},) (one per vector), got {a.shape}")
            if a.dtype == np.uint64 and a.size and a.max() > np.iinfo(np.int64).max:
                raise ValueError("ids must fit int64")
            ids_np = a.astype(np.int64)
        if n == 0:
            return ids_np
        if len(np.unique(ids_np)) != n:
            raise ValueError("ids repeat within one add() call")
        rows = self._lookup(ids_np)
        present = rows >= 0
        if present.any() and not upsert:
            raise ValueError(f"id {int(ids_np[present][0])} is already in the index ({int(present.sum())} present); "
                             "pass upsert=True to replace")
        if present.any():
            r = torch.from_numpy(rows[present]).to(self.device)
            sel = torch.from_numpy(np.flatnonzero(present)).to(self.device)
            self._codes[r] = codes[sel]
            if self._f16 is not None:
                self._f16[r] = torch.from_numpy(xf[present]).to(self.device, torch.float16)
        new = ~present
        m = int(new.sum())
        if m:
            self._reserve(self._n + m)
            sel = torch.from_numpy(np.flatnonzero(new)).to(self.device)
            self._codes[self._n: self._n + m] = codes[sel] if m < n else codes
            if self._f16 is not None:
                self._f16[self._n: self._n + m] = torch.from_numpy(xf[new]).to(self.device, torch.float16)
            self._ids[self._n: self._n + m] = ids_np[new]
            self._n += m
        self._next_id = max(self._next_id, int(ids_np.max()) + 1)
        self._changed()
        return ids_np

    def remove(self, ids) -> int:
        """Remove these ids (absent ones are a ValueError). Returns how many rows were removed."""
        a = _as_array("ids", ids)
        if a.ndim == 0:
            a = a[None]
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"ids must be integers (int64), got {a.dtype}")
        a = np.unique(a.astype(np.int64))
        rows = self._lookup(a)
        if (rows < 0).any():
            raise ValueError(f"id {int(a[rows < 0][0])} is not in the index")
        if len(rows) == 0:
            return 0
        keep = np.ones(self._n, bool)
        keep[rows] = False
        kt = torch.from_numpy(np.flatnonzero(keep)).to(self.device)
        m = int(keep.sum())
        self._codes[:m] = self._codes[: self._n][kt].clone()
        if self._f16 is not None:
            self._f16[:m] = self._f16[: self._n][kt].clone()
        self._ids[:m] = self._ids[: self._n][keep]
        self._n = m
        self._changed()
        return len(rows)

    # ---- search --------------------------------------------------------------------------
    def _allow_mask(self, allow):
        if allow is None:
            return None
        a = _as_array("allow", allow)
        if a.dtype == np.bool_:
            if a.shape != (self._n,):
                raise ValueError(f"allow as a boolean mask must have shape ({self._n},) (one per row, in "
                                 f"insertion order: index.ids), got {a.shape}")
            mask = a
        elif np.issubdtype(a.dtype, np.integer) or a.size == 0:
            rows = self._lookup(a.reshape(-1).astype(np.int64))
            mask = np.zeros(self._n, bool)
            mask[rows[rows >= 0]] = True  # ids not in the index are ignored
        else:
            raise TypeError(f"allow must be a boolean mask over rows or an array of ids, got {a.dtype}")
        return torch.from_numpy(np.ascontiguousarray(mask)).to(self.device)

    def _scan(self, q, kk, allow_t):
        return SCANS[self.spec.scan](self, q, self._codes[: self._n], kk, allow_t)

    def search(self, queries, k=10, *, rescore=None, allow=None, model_tag=None, prefilter=None):
        """(scores [nq, k], ids int64 [nq, k]) numpy, best first, ties by insertion order.

        queries: float embeddings (quantized like the database) or codes in the index precision
        (not for rabitq: float queries only). Scores: see the module docstring (int8 and rabitq:
        float32 estimates of the dot product).
        rescore=r: top k*r candidates re-ranked by float32 dot products with the stored float16
        vectors (needs keep_float16=True and float queries); the scores are those dot products.
        The candidates: int8 / rabitq / float16 / float32 by the index's own score; binary by the asymmetric
        score sum_d q8_d * s_d, an exact integer with ties by insertion order, where s_d = +1 if the
        row's bit d is set, else -1, and q8 = the query (times the rotation, if any) quantized to
        int8 per query: rint(q * 127 / max_d |q_d|) in float64, rint rounding half to even (kernel:
        kernels/sign_dot_topk.py). Without rescore a binary index scores 8 * bytes - Hamming.
        allow: a boolean mask over rows (insertion order) or an array of allowed ids, applied inside
        the scan.
        prefilter=f (binary with rescore only; default HAMMING_PREFILTER = 12, 0 = every row): the
        asymmetric score is computed only for the rows reaching a Hamming gate (about f * k * r rows;
        _asymmetric_candidates), not every row."""
        self._check_tag(model_tag)
        if self._n == 0:
            raise ValueError("the index is empty")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"k must be an int, got {type(k).__name__}")
        k = int(k)
        if not 1 <= k <= self._n:
            raise ValueError(f"k must be in [1, len(index)={self._n}], got {k}")
        if rescore is not None:
            if isinstance(rescore, bool) or not isinstance(rescore, (int, np.integer)) or rescore < 1:
                raise ValueError(f"rescore must be a positive int (candidates = k * rescore), got {rescore!r}")
            if not self.keep_float16:
                raise ValueError("rescore needs the float16 vectors: build the index with keep_float16=True")
        if prefilter is not None and (isinstance(prefilter, bool) or not isinstance(prefilter, (int, np.integer))
                                      or prefilter < 0):
            raise ValueError(f"prefilter must be an int >= 0 (0: no Hamming pre-filter), got {prefilter!r}")
        scan = self.spec.scan
        asymmetric = rescore is not None and scan == "hamming_topk"  # its own int8 queries: no codes
        if prefilter and not asymmetric:
            raise ValueError(f"prefilter is for a binary index searched with rescore=; this is a {self.precision!r} "
                             f"index{'' if rescore is not None else ' searched without rescore'}")
        # int8 and rabitq make their own queries from the float ones (int8 codes are decoded)
        own_query = asymmetric or scan in ("int8_topk", "rabitq_topk")
        q, qf = self._encode("queries", queries, need_float=rescore is not None, quantize=not own_query)
        allow_t = self._allow_mask(allow)
        nq = qf.shape[0] if q is None else q.shape[0]
        if scan == "int8_topk":
            q = self._int8_query(qf.astype(np.float64) if q is None else self._decode_int8(q))
        elif scan == "rabitq_topk":
            q = self._rabitq.queries(qf, self.device)
        if rescore is None:
            s, rows = self._scan(q, k, allow_t)
        else:
            kk = min(self._n, k * int(rescore))
            if not nq:
                cand = torch.empty(0, kk, dtype=torch.int64)
            elif asymmetric:
                cand = self._asymmetric_candidates(qf, kk, allow_t, HAMMING_PREFILTER if prefilter is None else prefilter)
            else:
                _, cand = self._scan(q, kk, allow_t)
            s, rows = self._rescore(torch.from_numpy(qf).to(self.device), cand.to(self.device), k)
        s, rows = s.cpu().numpy(), rows.cpu().numpy()
        ids = np.where(rows >= 0, self._ids[: self._n][rows.clip(0)] if self._n else -1, -1).astype(np.int64)
        return s, ids

    def _asymmetric_candidates(self, qf, kk, allow_t, prefilter):
        """Rows [nq, kk] of a binary index's asymmetric first stage. prefilter = f > 0: the exact
        asymmetric score of only the rows whose Hamming score reaches the query's gate, the score
        expected to keep f * kk rows (_prefilter_gates), fused into one scan (gated_sign_dot_topk:
        Hamming per row, the int8 x sign dot for the few that pass); a query left with fewer than kk
        candidates is scanned again without the gate. 0, or an index of at most 2 f kk rows: the
        asymmetric score of every row (sign_dot_topk)."""
        q8 = self._query_int8(qf)
        codes = self._codes[: self._n]
        if prefilter == 0 or 2 * prefilter * kk >= self._n:
            return sign_dot_topk(q8, codes, kk, allow_t)[1]
        # the sign bits of the (rotated) query, packed as the codes are (binary = ubinary - 128)
        bits = np.packbits(q8.cpu().numpy()[:, : self.dim] > 0, axis=1)
        qcodes = torch.from_numpy(bits if codes.dtype == torch.uint8 else (bits ^ 0x80).view(np.int8)).to(self.device)
        gate = self._prefilter_gates(qcodes, prefilter * kk, allow_t)
        cand = gated_sign_dot_topk(q8, qcodes, codes, gate, kk, allow_t)[1]
        allowed = self._n if allow_t is None else int(allow_t.sum())
        short = (cand >= 0).sum(1) < min(kk, allowed)  # the gate kept too few: never fewer candidates than asked
        if bool(short.any()):
            cand[short] = sign_dot_topk(q8[short], codes, kk, allow_t)[1]
        return cand

    def _prefilter_gates(self, qcodes, p, allow_t=None) -> torch.Tensor:
        """int32 [nq]: per query the Hamming score (8 * bytes - Hamming) of rank ceil(p m / n) among the
        m allowed rows of every PREFILTER_STRIDE-th row (n: the allowed rows), so that about p rows
        of the index reach it; 0 (every row) where the sample has fewer. A fixed sample: the gates,
        and so the search, do not depend on thread count."""
        codes = self._codes[: self._n]
        sample = codes[::PREFILTER_STRIDE]
        sallow = None if allow_t is None else allow_t[::PREFILTER_STRIDE].contiguous()
        m = len(sample) if sallow is None else int(sallow.sum())
        n = self._n if allow_t is None else int(allow_t.sum())
        r = -(-p * m // max(n, 1))
        if m == 0 or r > m:
            return torch.zeros(qcodes.shape[0], dtype=torch.int32, device=qcodes.device)
        return hamming_kth_score(qcodes, sample, r, sallow).clamp(min=0).contiguous()

    def _rescore(self, qf, cand, k):
        """The k best of the candidates by float32 dot products with the float16 vectors (float16_rerank),
        best first, ties by row (= insertion order)."""
        return float16_rerank(qf.float().contiguous(), self._f16[: self._n], cand, k)

    # ---- persistence ---------------------------------------------------------------------
    def to(self, device):
        """Move the stored codes/vectors to `device` (in place); returns self."""
        dev = torch.device(device)
        self._codes = self._codes[: self._n].to(dev)
        if self._f16 is not None:
            self._f16 = self._f16[: self._n].to(dev)
        self._ids = self._ids[: self._n].copy()
        self.device = dev
        self._factors = None
        return self

    def save(self, path) -> None:
        """Write the index to folder `path` (created): header.json + arrays.safetensors."""
        from safetensors.torch import save_file

        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        tensors = {"codes": self._codes[: self._n].cpu().contiguous(),
                   "ids": torch.from_numpy(self._ids[: self._n].copy())}
        if self._f16 is not None:
            tensors["float16"] = self._f16[: self._n].cpu().contiguous()
        if self.ranges is not None:
            tensors["ranges"] = torch.from_numpy(self.ranges.copy())
        if self.rotation is not None:
            tensors["rotation"] = torch.from_numpy(self.rotation.copy())
        fmt = FORMAT if self.rotation is None else FORMAT_ROTATED
        if self._rabitq is not None:
            tensors["rabitq_rotation"] = torch.from_numpy(self._rabitq.rotation.copy())
            tensors["rabitq_centroid"] = torch.from_numpy(self._rabitq.centroid.copy())
            fmt = FORMAT_RABITQ
        save_file(tensors, str(p / "arrays.safetensors"))
        header = {"format": fmt, "dim": self.dim,
                  "precision": self.precision, "count": self._n,
                  "next_id": self._next_id, "keep_float16": self.keep_float16, "model_tag": self.model_tag,
                  "has_ranges": self.ranges is not None}
        tmp = p / "header.json.tmp"
        tmp.write_text(json.dumps(header, indent=1) + "\n")
        os.replace(tmp, p / "header.json")

    @classmethod
    def load(cls, path, device=None) -> "EmbeddingIndex":
        from safetensors.torch import load_file

        p = Path(path)
        try:
            header = json.loads((p / "header.json").read_text())
        except FileNotFoundError:
            raise ValueError(f"{p}: not a saved EmbeddingIndex (no header.json)") from None
        if header.get("format") not in FORMATS:
            raise ValueError(f"{p}: unknown index format {header.get('format')!r} (expected one of "
                             f"{', '.join(map(repr, FORMATS))})")
        t = load_file(str(p / "arrays.safetensors"))
        ranges = t["ranges"].numpy() if header["has_ranges"] else None
        rotation = None
        if header["format"] == FORMAT_ROTATED:
            if "rotation" not in t:
                raise ValueError(f"{p}: format {FORMAT_ROTATED!r} but no rotation array")
            rotation = t["rotation"].numpy()
        centroid = None
        if header["format"] == FORMAT_RABITQ:
            if "rabitq_rotation" not in t or "rabitq_centroid" not in t:
                raise ValueError(f"{p}: format {FORMAT_RABITQ!r} but no rabitq_rotation / rabitq_centroid arrays")
            centroid = t["rabitq_centroid"].numpy()
        elif _index_spec(header["precision"]).scan == "rabitq_topk":
            raise ValueError(f"{p}: a rabitq index needs format {FORMAT_RABITQ!r}, got {header['format']!r}")
        index = cls(header["dim"], precision=header["precision"], device=device, ranges=ranges,
                    keep_float16=header["keep_float16"], model_tag=header["model_tag"], rotation=rotation,
                    centroid=centroid)
        if centroid is not None:  # the saved rotation, not a fresh one (whatever numpy's generator does later)
            index._rabitq = RaBitQCodes(index.dim, _check_rotation(t["rabitq_rotation"].numpy(), index.dim),
                                        index._rabitq.centroid)
        n = int(header["count"])
        codes, ids = t["codes"], t["ids"].numpy()
        cols = index.spec.index_columns(index.dim)
        if tuple(codes.shape) != (n, cols) or codes.dtype != index.spec.torch_dtype or ids.shape != (n,):
            raise ValueError(f"{p}: arrays do not match the header (codes {codes.dtype} {tuple(codes.shape)}, "
                             f"ids {ids.shape}, expected {n} rows of {cols} columns)")
        index._codes = codes.to(index.device)
        index._ids = ids.astype(np.int64).copy()
        if index.keep_float16:
            f = t.get("float16")
            if f is None or tuple(f.shape) != (n, index.dim):
                raise ValueError(f"{p}: float16 vectors missing or of the wrong shape")
            index._f16 = f.to(index.device)
        index._n = n
        index._next_id = int(header["next_id"])
        if len(np.unique(index._ids)) != n:
            raise ValueError(f"{p}: repeated ids")
        return index
