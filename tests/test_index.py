"""EmbeddingIndex (postembed_fast/search/index.py) against a numpy reference: every precision, awkward sizes,
ties by insertion order, allow masks / id lists, remove + add, upsert, rescoring, save/load, bad input.
The rabitq precision has its own file (tests/test_rabitq.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from postembed_fast.search import EmbeddingIndex, itq_rotation
from postembed_fast.search.index import HAMMING_PREFILTER

INT_LOWEST = -(2**31)
_POP = np.array([bin(i).count("1") for i in range(256)], np.int64)


def unit_rows(n, dim, seed):
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ranges_for(dim, seed=0):
    rng = np.random.default_rng(seed)
    lo = -0.2 - 0.1 * rng.random(dim)
    return np.stack([lo, -lo * (0.8 + 0.4 * rng.random(dim))]).astype(np.float32)


def int8_estimate(q64, x8, ranges):
    """The int8 index's documented score: (S int64 [nq, n], the float32 estimate of <q, x> [nq, n]).
    The stored codes decode to lo + step (x8 + 128); w = q * step quantized to int8 per query,
    S = w8 . x8 exact, estimate = (max|w| / 127) S + sum_d q_d (lo_d + 128 step_d) in float64."""
    lo = ranges[0].astype(np.float64)
    step = (ranges[1].astype(np.float64) - lo) / 255
    w = q64 * step
    peak = np.abs(w).max(axis=1)
    mult = np.divide(127.0, peak, out=np.zeros_like(peak), where=peak > 0)
    w8 = np.rint(w * mult[:, None]).clip(-127, 127).astype(np.int64)
    S = w8 @ x8.astype(np.int64).T
    const = np.einsum("nd,d->n", q64, lo + 128 * step)
    return S, ((peak / 127)[:, None] * S + const[:, None]).astype(np.float32)


def ref_scores(precision, qf, xf, quant, ranges):
    """Scores by the documented formulas, in int64 / float64 (int8: the integer S it ranks by)."""
    if precision == "binary":
        q, x = quant(qf, "ubinary"), quant(xf, "ubinary")
        return 8 * q.shape[1] - _POP[q[:, None, :] ^ x[None, :, :]].sum(-1)
    if precision == "int8":
        return int8_estimate(qf.astype(np.float64), quant(xf, "int8", ranges), ranges)[0]
    if precision == "float16":
        return qf.astype(np.float16).astype(np.float64) @ xf.astype(np.float16).astype(np.float64).T
    return qf.astype(np.float64) @ xf.astype(np.float64).T


def asym_scores(qf, xf, rotation=None):
    """The binary first stage of search(..., rescore=r) by its documented formula: q8 = rint(q R * 127 /
    max|q R|) (half to even), s = +1 where (x R)_d > 0 else -1, score = q8 . s (int64)."""
    if rotation is not None:
        qf = qf.astype(np.float64) @ rotation.astype(np.float64)
        xf = (xf.astype(np.float64) @ rotation.astype(np.float64)).astype(np.float32)
    q8 = np.rint(qf.astype(np.float64) * 127 / np.abs(qf).max(axis=1, keepdims=True)).astype(np.int64)
    return q8 @ np.where(xf > 0, 1, -1).T


def prefiltered_candidates(qf, xf, kk, factor, rotation=None, allow_rows=None, stride=16):
    """search(..., rescore=r)'s binary first stage with the Hamming pre-filter, by its documented
    formula: per query the gate = the Hamming score (equal sign bits; query bits: q8 > 0; rows: x R > 0)
    of rank ceil(p m / n) among the m allowed rows of every stride-th row (p = factor * kk, n the
    allowed rows; 0 if the sample has fewer), then the asymmetric top kk (score desc, row asc) of the
    allowed rows reaching the gate; a query left with fewer than min(kk, n) of them: the asymmetric
    top kk of every allowed row; -1 past the candidates."""
    if rotation is not None:
        qf = qf.astype(np.float64) @ rotation.astype(np.float64)
        xf = (xf.astype(np.float64) @ rotation.astype(np.float64)).astype(np.float32)
    q8 = np.rint(qf.astype(np.float64) * 127 / np.abs(qf).max(axis=1, keepdims=True)).astype(np.int64)
    dim, N = xf.shape[1], len(xf)
    ham = (dim + np.where(q8 > 0, 1, -1) @ np.where(xf > 0, 1, -1).T) // 2  # equal sign bits
    allowed = np.ones(N, bool) if allow_rows is None else np.isin(np.arange(N), allow_rows)
    sample = np.arange(0, N, stride)
    sample = sample[allowed[sample]]
    n, m = int(allowed.sum()), len(sample)
    r = -(-factor * kk * m // max(n, 1))
    asym = q8 @ np.where(xf > 0, 1, -1).T
    out = np.full((len(qf), kk), -1, np.int64)
    for i in range(len(qf)):
        gate = 0 if (m == 0 or r > m) else max(0, np.sort(ham[i, sample])[::-1][r - 1])
        c = np.flatnonzero(allowed & (ham[i] >= gate))
        if len(c) < min(kk, n):
            c = np.flatnonzero(allowed)
        o = np.lexsort((c, -asym[i, c]))[:kk]
        out[i, : len(o)] = c[o]
    return out


def ref_topk(scores, k, ids, allow_rows=None):
    nq, n = scores.shape
    low = -np.inf if scores.dtype.kind == "f" else INT_LOWEST
    out_s = np.full((nq, k), low, np.float64)
    out_i = np.full((nq, k), -1, np.int64)
    rows = np.arange(n) if allow_rows is None else np.asarray(allow_rows)
    for i in range(nq):
        s = scores[i, rows]
        o = np.lexsort((rows, -s))[:k]
        out_s[i, : len(o)] = s[o]
        out_i[i, : len(o)] = ids[rows[o]]
    return out_s, out_i


def assert_search(index, qf, xf, k, ids, quant, ranges=None, allow=None, allow_rows=None):
    s, got = index.search(qf, k, allow=allow)
    want_s, want = ref_topk(ref_scores(index.precision, qf, xf, quant, ranges), k, ids, allow_rows)
    if index.precision == "binary":
        assert s.dtype == np.int32
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(s.astype(np.float64), want_s)
    elif index.precision == "int8":  # ranked by the exact integer S; the scores: its float32 estimate, exactly
        assert s.dtype == np.float32
        np.testing.assert_array_equal(got, want)
        est = int8_estimate(qf.astype(np.float64), quant(xf, "int8", ranges), ranges)[1]
        row_of = {int(i): r for r, i in enumerate(ids)}
        want_est = np.array([[est[i, row_of[j]] if j >= 0 else -np.inf for j in row] for i, row in enumerate(want)],
                            np.float32)
        np.testing.assert_array_equal(s, want_est)
    else:  # float: the scan's summation order differs from float64 in the last bits
        assert s.dtype == np.float32
        np.testing.assert_allclose(s, want_s, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(np.sort(got, 1)[:, -1] >= -1, True)
        for i in range(len(qf)):  # same ids unless two scores are within rounding of each other
            fin = want_s[i][np.isfinite(want_s[i])]
            gap = np.abs(np.diff(fin)).min() if len(fin) > 1 else 1.0
            if gap > 1e-5:
                np.testing.assert_array_equal(got[i], want[i])


@pytest.mark.parametrize("precision,dim", [("binary", 48), ("binary", 50), ("binary", 384), ("int8", 50),
                                           ("int8", 384), ("float32", 50), ("float16", 128)])
@pytest.mark.parametrize("n", [1, 7, 1000, 4097])
def test_search_matches_numpy(precision, dim, n, reference_quantize):
    if n == 4097 and dim == 384 and precision == "int8":
        n = 2049  # keep the int64 numpy reference quick
    ranges = ranges_for(dim) if precision == "int8" else None
    index = EmbeddingIndex(dim, precision=precision, ranges=ranges)
    xf = unit_rows(n, dim, seed=n + dim)
    if n > 3:
        xf[n // 2:: 5] = xf[2]  # exact duplicates: ties broken by insertion order
    qf = unit_rows(6, dim, seed=1)
    qf[0] = xf[min(2, n - 1)]
    ids = np.arange(1000, 1000 + n, dtype=np.int64)[::-1].copy()  # ids unrelated to insertion order
    index.add(xf[: n // 2], ids[: n // 2])
    index.add(xf[n // 2:], ids[n // 2:])
    assert len(index) == n
    for k in sorted({1, min(10, n), n}):
        assert_search(index, qf, xf, k, ids, reference_quantize, ranges)
    allow = np.random.default_rng(n).random(n) < 0.2
    assert_search(index, qf, xf, min(10, n), ids, reference_quantize, ranges, allow=allow,
                  allow_rows=np.flatnonzero(allow))
    chosen = ids[allow][::-1]
    assert_search(index, qf, xf, min(10, n), ids, reference_quantize, ranges, allow=chosen,
                  allow_rows=np.flatnonzero(allow))


def test_codes_in_and_out_agree(reference_quantize):
    dim = 50
    xf, qf = unit_rows(300, dim, 0), unit_rows(4, dim, 1)
    a = EmbeddingIndex(dim, precision="binary")
    a.add(xf)
    b = EmbeddingIndex(dim, precision="binary")
    codes = reference_quantize(xf, "binary")
    assert codes.shape == (300, 7) and codes.dtype == np.int8
    b.add(codes)
    for queries in (qf, reference_quantize(qf, "binary")):
        sa, ia = a.search(queries, 10)
        sb, ib = b.search(queries, 10)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(sa, sb)
    r = ranges_for(dim)
    c = EmbeddingIndex(dim, precision="int8", ranges=r)
    c.add(reference_quantize(xf, "int8", r))
    d = EmbeddingIndex(dim, precision="int8", ranges=r)
    d.add(xf)
    q8 = reference_quantize(qf, "int8", r)
    for queries in (qf, q8):  # codes added = floats added, for float and code queries
        np.testing.assert_array_equal(c.search(queries, 5)[1], d.search(queries, 5)[1])
        np.testing.assert_array_equal(c.search(queries, 5)[0], d.search(queries, 5)[0])
    # int8 code queries are decoded to the bins' centres, lo + step (q8 + 128), then scored as floats
    lo, step = r[0].astype(np.float64), (r[1].astype(np.float64) - r[0]) / 255
    decoded = (lo + step * (q8.astype(np.float64) + 128)).astype(np.float32)
    np.testing.assert_array_equal(c.search(q8, 5)[1], c.search(decoded, 5)[1])
    np.testing.assert_allclose(c.search(q8, 5)[0], c.search(decoded, 5)[0], rtol=0, atol=1e-6)


def test_fewer_candidates_than_k_are_padded():
    index = EmbeddingIndex(16, precision="binary")
    index.add(unit_rows(5, 16, 0), ids=[10, 11, 12, 13, 14])
    s, ids = index.search(unit_rows(2, 16, 1), k=4, allow=[11, 99])
    assert (ids[:, 0] == 11).all() and (ids[:, 1:] == -1).all()
    assert (s[:, 1:] == INT_LOWEST).all()
    s, ids = index.search(unit_rows(1, 16, 1), k=3, allow=np.zeros(5, bool))
    assert (ids == -1).all() and (s == INT_LOWEST).all()
    f = EmbeddingIndex(16, precision="float32")
    f.add(unit_rows(5, 16, 0))
    s, ids = f.search(unit_rows(1, 16, 1), k=5, allow=[0])
    assert ids[0, 0] == 0 and (ids[0, 1:] == -1).all() and np.isneginf(s[0, 1:]).all()


def test_remove_add_upsert(reference_quantize):
    dim = 48
    xf = unit_rows(50, dim, 0)
    index = EmbeddingIndex(dim, precision="binary")
    assert list(index.add(xf[:30])) == list(range(30))  # default ids: running numbers
    assert index.remove([3, 7, 29]) == 3
    assert len(index) == 27 and 7 not in index and 8 in index
    assert list(index.add(xf[30:35])) == list(range(30, 35))  # numbering goes on after removals
    keep = [i for i in range(35) if i not in (3, 7, 29)]
    np.testing.assert_array_equal(index.ids, keep)
    q = unit_rows(3, dim, 9)
    assert_search(index, q, xf[keep], 10, np.array(keep), reference_quantize)
    with pytest.raises(ValueError, match="already in the index"):
        index.add(xf[:1], ids=[5])
    with pytest.raises(ValueError, match="not in the index"):
        index.remove([7])
    # upsert: id 5 gets vector 40 and keeps its position; id 100 is new (appended)
    index.add(xf[[40, 41]], ids=[5, 100], upsert=True)
    rows = {i: r for r, i in enumerate(index.ids)}
    assert rows[5] == keep.index(5) and rows[100] == len(index) - 1
    vecs = xf[keep + [0]].copy()
    vecs[keep.index(5)] = xf[40]
    vecs[-1] = xf[41]
    assert_search(index, q, vecs, 12, np.array(keep + [100]), reference_quantize)
    s, ids = index.search(xf[40], 1)
    assert ids[0, 0] == 5 and s[0, 0] == 48


def test_rescore_float16(reference_quantize):
    dim, n = 64, 2000
    xf = unit_rows(n, dim, 3)
    qf = unit_rows(8, dim, 4)
    index = EmbeddingIndex(dim, precision="binary", keep_float16=True)
    index.add(xf)
    x16 = xf.astype(np.float16).astype(np.float32)
    # binary candidates: the top 40 by the asymmetric score (int8 query . +-1 signs), ties by row, of
    # every row (prefilter=0), or of the rows reaching a Hamming gate (prefilter=f; None: the default)
    full = ref_topk(asym_scores(qf, xf), 40, np.arange(n))[1]
    default = prefiltered_candidates(qf, xf, 40, HAMMING_PREFILTER)
    assert 2 * HAMMING_PREFILTER * 40 < n  # the default pre-filters here
    for prefilter, cand in ((None, default), (0, full), (4, prefiltered_candidates(qf, xf, 40, 4)),
                            (2, prefiltered_candidates(qf, xf, 40, 2))):
        s, ids = index.search(qf, 10, rescore=4, prefilter=prefilter)
        for i in range(len(qf)):
            sc = x16[cand[i]] @ qf[i]
            o = np.lexsort((cand[i], -sc))[:10]  # candidates come back in row order of their ids here
            np.testing.assert_array_equal(ids[i], cand[i][o])
            np.testing.assert_allclose(s[i], sc[o], rtol=0, atol=1e-6)
        assert s.dtype == np.float32
    for bad in (-1, 1.5, True, "4"):
        with pytest.raises(ValueError, match="prefilter must be an int >= 0"):
            index.search(qf, 10, rescore=4, prefilter=bad)
    with pytest.raises(ValueError, match="prefilter is for a binary index searched with rescore=; this is a "
                                         "'binary' index searched without rescore"):
        index.search(qf, 10, prefilter=4)
    f16 = EmbeddingIndex(dim, precision="float16", keep_float16=True)
    f16.add(xf)
    with pytest.raises(ValueError, match="this is a 'float16' index"):
        f16.search(qf, 10, rescore=4, prefilter=4)
    np.testing.assert_array_equal(f16.search(qf, 10, rescore=4, prefilter=0)[1], f16.search(qf, 10, rescore=4)[1])
    # rescore over all rows = exact float16 search
    s_all, ids_all = index.search(qf, 10, rescore=n)
    exact = np.argsort(-(qf @ x16.T), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(ids_all, exact)
    plain = EmbeddingIndex(dim, precision="binary")
    plain.add(xf)
    with pytest.raises(ValueError, match="keep_float16"):
        plain.search(qf, 1, rescore=2)
    with pytest.raises(ValueError, match="float vectors"):
        index.search(reference_quantize(qf, "binary"), 1, rescore=2)
    with pytest.raises(ValueError, match="float vectors"):
        index.add(reference_quantize(qf, "binary"))


@pytest.mark.parametrize("precision", ["binary", "int8", "float16", "float32"])
def test_save_load_round_trip(tmp_path, precision):
    dim = 50
    ranges = ranges_for(dim) if precision == "int8" else None
    index = EmbeddingIndex(dim, precision=precision, ranges=ranges, keep_float16=True, model_tag="m-123")
    xf = unit_rows(120, dim, 0)
    index.add(xf, ids=np.arange(120) * 3)
    index.remove([0, 33])
    index.save(tmp_path / "idx")
    assert not list((tmp_path / "idx").glob("*.pkl"))
    loaded = EmbeddingIndex.load(tmp_path / "idx")
    assert (loaded.dim, loaded.precision, loaded.model_tag, len(loaded)) == (dim, precision, "m-123", 118)
    np.testing.assert_array_equal(loaded.ids, index.ids)
    if ranges is not None:
        np.testing.assert_array_equal(loaded.ranges, ranges)
    q = unit_rows(5, dim, 1)
    for kw in ({}, {"rescore": 3}, {"allow": index.ids[::2]}):
        a, b = index.search(q, 7, **kw), loaded.search(q, 7, **kw)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    assert list(loaded.add(xf[:1])) == [358]  # the running numbers continue after the largest id
    loaded.to("cpu")
    assert loaded.search(q, 3)[1].shape == (5, 3)
    (tmp_path / "bad").mkdir()
    with pytest.raises(ValueError, match="header"):
        EmbeddingIndex.load(tmp_path / "bad")


def test_bad_input():
    index = EmbeddingIndex(16, precision="binary")
    with pytest.raises(ValueError, match="empty"):
        index.search(unit_rows(1, 16, 0), 1)
    index.add(unit_rows(5, 16, 0))
    q = unit_rows(2, 16, 1)
    with pytest.raises(ValueError, match="k must be"):
        index.search(q, 0)
    with pytest.raises(ValueError, match="k must be"):
        index.search(q, 6)
    with pytest.raises(TypeError, match="k must be"):
        index.search(q, 2.0)
    with pytest.raises(ValueError, match="dimension"):
        index.search(unit_rows(1, 15, 0), 1)
    with pytest.raises(ValueError, match="columns"):
        index.search(np.zeros((1, 3), np.int8), 1)
    with pytest.raises(TypeError, match="int8"):
        index.search(np.zeros((1, 2), np.uint8), 1)
    bad = q.copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        index.search(bad, 1)
    with pytest.raises(ValueError, match="NaN"):
        index.add(bad)
    with pytest.raises(ValueError, match="repeat"):
        index.add(q, ids=[1000, 1000])
    with pytest.raises(ValueError, match="shape"):
        index.add(q, ids=[1, 2, 3])
    with pytest.raises(TypeError, match="ids"):
        index.add(q, ids=[1.5, 2.5])
    with pytest.raises(ValueError, match="allow"):
        index.search(q, 1, allow=np.ones(4, bool))
    with pytest.raises(ValueError, match="precision"):
        EmbeddingIndex(16, precision="uint8")
    with pytest.raises(ValueError, match="ranges"):
        EmbeddingIndex(16, precision="int8")
    with pytest.raises(ValueError, match="ranges"):
        EmbeddingIndex(16, precision="int8", ranges=np.zeros((2, 15), np.float32))
    with pytest.raises(TypeError, match="float"):
        EmbeddingIndex(16, precision="float32").add(np.zeros((1, 16), np.int8))
    tagged = EmbeddingIndex(16, precision="binary", model_tag="a-1")
    tagged.add(q, model_tag="a-1")
    with pytest.raises(ValueError, match="model"):
        tagged.search(q, 1, model_tag="b-2")
    with pytest.raises(ValueError, match="model"):
        tagged.add(q, model_tag="b-2")


def test_for_embedder(embedder, tmp_path):
    texts = ["Excited to share our new paper on post embeddings!", "We are hiring ML engineers in Dublin",
             "Great talk at the conference today", "Our new office opens next week"]
    emb = embedder.embed(texts)
    for precision in ("binary", "int8"):
        index = EmbeddingIndex.for_embedder(embedder, precision=precision)
        assert index.model_tag == embedder.model_tag and index.dim == emb.shape[1]
        index.add(emb)
        _, ids = index.search(emb, 1)
        np.testing.assert_array_equal(ids[:, 0], np.arange(4))
        index.check_embedder(embedder)
        index.save(tmp_path / precision)
        EmbeddingIndex.load(tmp_path / precision).check_embedder(embedder)
        with pytest.raises(ValueError, match="model"):
            index.search(emb, 1, model_tag="other-model-0123")
    int8 = EmbeddingIndex.for_embedder(embedder, precision="int8")
    np.testing.assert_array_equal(int8.ranges, embedder.quantization_ranges)
    other = EmbeddingIndex(emb.shape[1], precision="int8", ranges=embedder.quantization_ranges * 1.5,
                           model_tag=embedder.model_tag)
    with pytest.raises(ValueError, match="mismatched ranges"):
        other.check_embedder(embedder)
    wrong = EmbeddingIndex(emb.shape[1], precision="binary", model_tag="other-model-0123")
    with pytest.raises(ValueError, match="model"):
        wrong.check_embedder(embedder)


def test_torch_inputs_and_single_vector():
    index = EmbeddingIndex(32, precision="float32")
    x = torch.from_numpy(unit_rows(10, 32, 0))
    index.add(x)
    s, ids = index.search(x[3], 2)
    assert ids.shape == (1, 2) and ids[0, 0] == 3
    s, ids = index.search(np.zeros((0, 32), np.float32), 2)
    assert s.shape == (0, 2) and ids.shape == (0, 2)


# ---- rotation (ITQ) and the asymmetric binary first stage -------------------------------------------

def anisotropic_rows(n, dim, seed):
    """Unit vectors whose variance decays over the directions of a fixed random basis, with a common
    offset: like real sentence embeddings, most sign bits carry little."""
    basis = np.linalg.qr(np.random.default_rng(0).standard_normal((dim, dim)))[0]
    x = (np.random.default_rng(seed).standard_normal((n, dim)) * np.exp(-np.arange(dim) / 8)) @ basis.T
    x += 0.3 * basis[:, 0]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_itq_rotation():
    x = anisotropic_rows(500, 32, 1)
    r = itq_rotation(x, iterations=20)
    assert r.dtype == np.float32 and r.shape == (32, 32)
    np.testing.assert_allclose(r.T.astype(np.float64) @ r, np.eye(32), atol=1e-5)
    np.testing.assert_array_equal(r, itq_rotation(x, iterations=20))  # deterministic for a seed
    assert not np.array_equal(r, itq_rotation(x, iterations=20, seed=1))
    # the ITQ objective (quantization loss ||sign(VR) - VR||) falls with the iterations
    def loss(rot):
        v = x.astype(np.float64) @ rot
        return float(np.square(np.where(v > 0, 1, -1) - v).sum())
    assert loss(r) < loss(itq_rotation(x, iterations=0)) - 1.0
    with pytest.raises(ValueError, match="at least dim"):
        itq_rotation(x[:31])
    with pytest.raises(ValueError, match="2-D"):
        itq_rotation(x[0])
    with pytest.raises(TypeError, match="float"):
        itq_rotation(np.ones((40, 32), np.int64))
    bad = x.copy()
    bad[3, 4] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        itq_rotation(bad)
    with pytest.raises(ValueError, match="iterations"):
        itq_rotation(x, iterations=-1)


def test_rotation_validation():
    dim = 16
    r = itq_rotation(unit_rows(64, dim, 0), iterations=3)
    with pytest.raises(ValueError, match="binary"):
        EmbeddingIndex(dim, precision="int8", ranges=ranges_for(dim), rotation=r)
    with pytest.raises(ValueError, match="binary"):
        EmbeddingIndex(dim, precision="float32", rotation=r)
    with pytest.raises(ValueError, match="shape"):
        EmbeddingIndex(dim, rotation=r[:15])
    with pytest.raises(ValueError, match="shape"):
        EmbeddingIndex(dim + 1, rotation=r)
    bad = r.copy()
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        EmbeddingIndex(dim, rotation=bad)
    with pytest.raises(ValueError, match="orthogonal"):
        EmbeddingIndex(dim, rotation=r * 1.01)
    with pytest.raises(ValueError, match="orthogonal"):
        EmbeddingIndex(dim, rotation=np.ones((dim, dim)))
    with pytest.raises(TypeError, match="float"):
        EmbeddingIndex(dim, rotation=np.eye(dim, dtype=bool))
    EmbeddingIndex(dim, rotation=np.eye(dim))  # float64 identity: fine
    EmbeddingIndex(dim, rotation=torch.from_numpy(r))


@pytest.mark.parametrize("dim", [50, 64])
def test_rotated_binary_matches_reference(dim, reference_quantize):
    """A rotated index binarizes x R: its Hamming scores are those of the rotated vectors' sign bits,
    its rescore candidates the asymmetric top-k of the rotated query; rescoring uses unrotated float16."""
    xf, qf = anisotropic_rows(400, dim, 1), anisotropic_rows(6, dim, 2)
    r = itq_rotation(xf, iterations=10)
    index = EmbeddingIndex(dim, precision="binary", rotation=r, keep_float16=True)
    index.add(xf)
    rot = lambda v: (v.astype(np.float64) @ r.astype(np.float64)).astype(np.float32)  # noqa: E731
    assert_search(index, qf, xf, 10, np.arange(400), lambda v, p, *a: reference_quantize(rot(v), p, *a))
    x16 = xf.astype(np.float16).astype(np.float32)
    for prefilter, cand in ((4, prefiltered_candidates(qf, xf, 20, 4, r)),
                            (None, ref_topk(asym_scores(qf, xf, r), 20, np.arange(400))[1])):
        s, ids = index.search(qf, 5, rescore=4, prefilter=prefilter)
        for i in range(len(qf)):
            sc = x16[cand[i]] @ qf[i]
            o = np.lexsort((cand[i], -sc))[:5]
            np.testing.assert_array_equal(ids[i], cand[i][o])
            np.testing.assert_allclose(s[i], sc[o], rtol=0, atol=1e-6)
    # the same index without the rotation ranks differently (the rotation is really applied)
    plain = EmbeddingIndex(dim, precision="binary", keep_float16=True)
    plain.add(xf)
    assert not np.array_equal(plain.search(qf, 10)[1], index.search(qf, 10)[1])
    # allow filters the asymmetric stage too
    allow = np.arange(400) % 3 == 0
    _, ids = index.search(qf, 5, rescore=2, allow=allow)
    assert (ids % 3 == 0).all()
    # ... and the Hamming pre-filter: the documented candidates among the allowed rows only
    s, ids = index.search(qf, 5, rescore=4, allow=allow, prefilter=1)
    cand = prefiltered_candidates(qf, xf, 20, 1, r, allow_rows=np.flatnonzero(allow))
    for i in range(len(qf)):
        sc = x16[cand[i]] @ qf[i]
        o = np.lexsort((cand[i], -sc))[:5]
        np.testing.assert_array_equal(ids[i], cand[i][o])


def test_rotation_refuses_codes(reference_quantize):
    dim = 32
    xf = unit_rows(50, dim, 0)
    index = EmbeddingIndex(dim, precision="binary", rotation=itq_rotation(xf, iterations=2))
    index.add(xf)
    codes = reference_quantize(xf, "binary")
    with pytest.raises(ValueError, match="rotation"):
        index.add(codes)
    with pytest.raises(ValueError, match="rotation"):
        index.search(codes[:2], 3)
    assert len(index) == 50


def test_save_load_rotation(tmp_path):
    dim = 48
    xf, qf = anisotropic_rows(200, dim, 3), anisotropic_rows(5, dim, 4)
    r = itq_rotation(xf, iterations=5)
    index = EmbeddingIndex(dim, precision="binary", rotation=r, keep_float16=True, model_tag="m-1")
    index.add(xf, ids=np.arange(200) + 10)
    index.save(tmp_path / "rot")
    import json

    assert json.loads((tmp_path / "rot" / "header.json").read_text())["format"].endswith("/2")
    loaded = EmbeddingIndex.load(tmp_path / "rot")
    np.testing.assert_array_equal(loaded.rotation, r)
    for kw in ({}, {"rescore": 4}):
        a, b = index.search(qf, 7, **kw), loaded.search(qf, 7, **kw)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    plain = EmbeddingIndex(dim, precision="binary")
    plain.add(xf)
    plain.save(tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "header.json").read_text())["format"].endswith("/1")
    assert EmbeddingIndex.load(tmp_path / "plain").rotation is None
    # a /2 header whose arrays lack the rotation is refused, not searched unrotated
    from safetensors.numpy import load_file, save_file

    arrays = load_file(str(tmp_path / "rot" / "arrays.safetensors"))
    del arrays["rotation"]
    save_file(arrays, str(tmp_path / "rot" / "arrays.safetensors"))
    with pytest.raises(ValueError, match="rotation"):
        EmbeddingIndex.load(tmp_path / "rot")


def test_asymmetric_first_stage_beats_hamming():
    """On anisotropic data the exact top-10 (float16 search) is far more often inside the asymmetric
    top-40 (what rescore=4 recovers) than inside the Hamming top-40, with or without ITQ."""
    dim = 64
    xf, qf = anisotropic_rows(3000, dim, 1), anisotropic_rows(50, dim, 2)
    x16 = xf.astype(np.float16).astype(np.float32)
    exact = np.argsort(-(qf @ x16.T), axis=1, kind="stable")[:, :10]

    def recall(ids):
        return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)]))

    recalls = {}
    for name, rot in (("plain", None), ("itq", itq_rotation(xf, iterations=20))):
        index = EmbeddingIndex(dim, precision="binary", keep_float16=True, rotation=rot)
        index.add(xf)
        recalls[name + " hamming40"] = recall(index.search(qf, 40)[1])
        recalls[name + " asym x4"] = recall(index.search(qf, 10, rescore=4)[1])
    # measured: plain hamming40 0.76, plain asym 0.92, itq asym 0.91, itq hamming40 0.80
    assert recalls["itq asym x4"] >= recalls["plain hamming40"] + 0.1, recalls
    assert recalls["plain asym x4"] >= recalls["plain hamming40"] + 0.1, recalls
    assert recalls["itq hamming40"] > recalls["plain hamming40"], recalls


def test_asymmetric_zero_query_and_ties():
    """A zero query scores 0 everywhere (no division by zero): the candidates are the first rows."""
    dim = 24
    xf = unit_rows(30, dim, 0)
    index = EmbeddingIndex(dim, precision="binary", keep_float16=True)
    index.add(xf, ids=np.arange(30) * 2)
    s, ids = index.search(np.zeros((1, dim), np.float32), 3, rescore=2)
    np.testing.assert_array_equal(ids[0], [0, 2, 4])
    np.testing.assert_array_equal(s[0], [0, 0, 0])


def test_loads_files_of_the_older_formats(tmp_path, reference_quantize):
    """Folders written before the rabitq format (/3) existed: a /1 int8 index and a /2 rotated binary one,
    written here array by array as those versions did, load and search (int8 now with its float estimate)."""
    import json

    from safetensors.numpy import save_file

    dim = 24
    xf, qf = unit_rows(40, dim, 0), unit_rows(3, dim, 1)
    r = ranges_for(dim)
    codes = reference_quantize(xf, "int8", r)
    (tmp_path / "v1").mkdir()
    save_file({"codes": codes, "ids": np.arange(40, dtype=np.int64) + 7, "ranges": r},
              str(tmp_path / "v1" / "arrays.safetensors"))
    (tmp_path / "v1" / "header.json").write_text(json.dumps(
        {"format": "postembed_fast.EmbeddingIndex/1", "dim": dim, "precision": "int8", "count": 40, "next_id": 47,
         "keep_float16": False, "model_tag": "m-0", "has_ranges": True}))
    old = EmbeddingIndex.load(tmp_path / "v1")
    assert (len(old), old.model_tag, list(old.add(xf[:1]))) == (40, "m-0", [47])
    old.remove([47])
    assert_search(old, qf, xf, 5, np.arange(40) + 7, reference_quantize, r)
    rot = itq_rotation(xf, iterations=2)
    bits = reference_quantize((xf.astype(np.float64) @ rot.astype(np.float64)).astype(np.float32), "binary")
    (tmp_path / "v2").mkdir()
    save_file({"codes": bits, "ids": np.arange(40, dtype=np.int64), "rotation": rot},
              str(tmp_path / "v2" / "arrays.safetensors"))
    (tmp_path / "v2" / "header.json").write_text(json.dumps(
        {"format": "postembed_fast.EmbeddingIndex/2", "dim": dim, "precision": "binary", "count": 40, "next_id": 40,
         "keep_float16": False, "model_tag": None, "has_ranges": False}))
    rotated = EmbeddingIndex.load(tmp_path / "v2")
    np.testing.assert_array_equal(rotated.rotation, rot)
    fresh = EmbeddingIndex(dim, precision="binary", rotation=rot)
    fresh.add(xf)
    np.testing.assert_array_equal(rotated.search(qf, 5)[1], fresh.search(qf, 5)[1])
