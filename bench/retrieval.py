"""Title-to-text retrieval: query = a post's title, the one right answer = its own text.

Scores (higher = better):
  float32: dot product of the normalized embeddings (= cosine).
  int8:    dot product of the codes after centering each dimension on the code of 0.0
           (c = q - round(-min_d / step_d) + 128 for the calibrated per-dimension ranges),
           exact integer arithmetic (float64 GEMM: every partial sum < 2^53).
  binary:  minus the Hamming distance of the packed bits (via (+1/-1) dot products, exact).
Ties are broken by document index, as a stable sort would.
"""
from __future__ import annotations

import numpy as np


def recall_at_k(scores: np.ndarray, k: int = 10) -> float:
    """scores [Q, Q], right answer of query i = document i."""
    own = np.diag(scores)[:, None]
    idx = np.arange(len(scores))
    better = (scores > own).sum(1) + ((scores == own) & (idx[None, :] < idx[:, None])).sum(1)
    return float((better < k).mean())


def int8_codes_centered(codes: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    lo, hi = ranges.astype(np.float32)
    step = (hi - lo) / np.float32(255.0)
    zero = np.floor(-lo / step + 0.5) - 128  # the int8 code of 0.0 in each dimension
    return codes.astype(np.float64) - zero.astype(np.float64)


def scores(q: np.ndarray, d: np.ndarray, precision: str, ranges=None, chunk=1024) -> np.ndarray:
    if precision == "float32":
        return q.astype(np.float32) @ d.astype(np.float32).T
    if precision == "int8":
        return int8_codes_centered(q, ranges) @ int8_codes_centered(d, ranges).T
    if precision in ("binary", "ubinary"):
        def pm1(x):  # packed bytes -> +1/-1 per bit; hamming = (bits - pm1(a) . pm1(b)) / 2
            u = x.view(np.uint8) if precision == "ubinary" else (x.astype(np.int16) + 128).astype(np.uint8)
            return np.unpackbits(u, axis=1).astype(np.float32) * 2 - 1
        return pm1(q) @ pm1(d).T  # exact small integers in float32
    raise ValueError(precision)


def evaluate(q_emb: dict, d_emb: dict, ranges=None, k=10) -> dict:
    """q_emb / d_emb: {precision: array}; -> {precision: recall@k, "<p>_retention": ratio to float32}."""
    out = {}
    for p in q_emb:
        out[f"recall@{k}_{p}"] = recall_at_k(scores(q_emb[p], d_emb[p], p, ranges), k)
    base = out.get(f"recall@{k}_float32")
    for p in q_emb:
        if p != "float32" and base:
            out[f"retention_{p}"] = out[f"recall@{k}_{p}"] / base
    return out
