"""Quantization ranges: per-dimension (min, max) of normalized embeddings, [2, dim] float32.

int8/uint8 codes need them (kernels/precision.py). They never come from the call being
quantized: the default model ships ranges calibrated on out-of-sample posts
(bench/calibrate_default.py), a model folder may carry its own (FOLDER_RANGES_FILE, written by
the training recipe from validation posts), other models get them from Embedder.calibrate(texts)
or the user's ranges= argument.

The same calibration posts give the model's mean embedding ([dim] float32, shipped the same way:
DEFAULT_MEAN_FILE, FOLDER_MEAN_FILE, calibrate()): the default centroid of a rabitq index
(EmbeddingIndex.for_embedder), a statistic of the model, not of any database.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

DEFAULT_RANGES_FILE = Path(__file__).resolve().parent / "data" / "all-MiniLM-L6-v2.ranges.npy"
FOLDER_RANGES_FILE = "quantization_ranges.npy"  # in a model folder: float32 [2, dim]
DEFAULT_MEAN_FILE = DEFAULT_RANGES_FILE.with_name("all-MiniLM-L6-v2.mean.npy")
FOLDER_MEAN_FILE = "embedding_mean.npy"  # in a model folder: float32 [dim]


def _read_float32(path: Path) -> np.ndarray:
    try:
        return np.asarray(np.load(path, allow_pickle=False), dtype=np.float32)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path}: not a readable .npy array ({exc})") from None


def shipped_mean(is_default_model: bool, folder: Path | None = None, dim: int | None = None) -> np.ndarray | None:
    """The mean embedding that comes with a model (as shipped_ranges), checked: finite float32 [dim]; else None."""
    path = DEFAULT_MEAN_FILE if is_default_model else None if folder is None else Path(folder) / FOLDER_MEAN_FILE
    if path is None or not path.is_file():
        return None
    m = _read_float32(path)
    if m.shape != (dim,) or not np.isfinite(m).all():
        raise ValueError(f"{path}: expected a finite float32 [{dim}] mean embedding, got shape {m.shape}")
    return m


def shipped_ranges(is_default_model: bool, folder: Path | None = None, dim: int | None = None) -> np.ndarray | None:
    """The ranges that come with a model: the default model's, or the folder's FOLDER_RANGES_FILE
    (checked: float32-convertible [2, dim], finite, min < max), else None."""
    if is_default_model and DEFAULT_RANGES_FILE.is_file():
        return np.load(DEFAULT_RANGES_FILE)
    path = None if folder is None else Path(folder) / FOLDER_RANGES_FILE
    if path is None or not path.is_file():
        return None
    r = _read_float32(path)
    if r.shape != (2, dim) or not np.isfinite(r).all() or not (r[0] < r[1]).all():
        raise ValueError(f"{path}: expected finite float32 [2, {dim}] ranges with min < max per dimension, "
                         f"got shape {r.shape}")
    return r


def ranges_of(emb: np.ndarray) -> np.ndarray:
    """Per-dimension (min, max) of normalized embeddings, made strictly increasing."""
    x = np.asarray(emb, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    r = np.stack([x.min(0), x.max(0)]).astype(np.float32)
    flat = r[1] <= r[0]
    r[0, flat] -= 1e-6
    r[1, flat] += 1e-6
    return r


def ranges_for_call(precision: str, user_ranges, *, normalize: bool, width: int, model_dim: int,
                    calibrated: np.ndarray | None, calibration: np.ndarray | None):
    """The ranges an embed() call quantizes with (array-like [2, width]), or a ValueError saying
    what is missing. calibrated: the model's ranges (shipped or from calibrate()); calibration:
    calibrate()'s embeddings, from which truncated (dimensions=k) ranges are derived."""
    if user_ranges is not None:
        return user_ranges  # checked once by the caller (kernels.checks.QuantRanges)
    if calibrated is None:
        raise ValueError(f"precision={precision!r} needs quantization ranges for this model: call "
                         "Embedder.calibrate(texts) on real posts, or pass ranges= ([2, D]: min row, max row)")
    if not normalize:
        raise ValueError("the calibrated ranges describe normalized embeddings; with normalize=False pass ranges=")
    if width == model_dim:
        return calibrated
    if calibration is None:
        raise ValueError(f"precision={precision!r} with dimensions={width} needs ranges for the truncated "
                         "embeddings: call calibrate(texts) first, or pass ranges= of shape (2, dimensions)")
    return ranges_of(calibration[:, :width])
