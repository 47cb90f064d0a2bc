"""The exact top-k scans (kernels/hamming_topk.py, int8_topk.py, float_topk.py, sign_dot_topk.py) on
every backend (torch reference, C++ in both ISA builds, Triton under the interpreter) against a numpy
reference: sizes at the kernels' block edges, ties (broken by the lower row), allow masks that leave
fewer than k candidates, the kernels' outputs written into garbage-filled buffers, bad input.

Each scan runs on every backend at the sizes the old per-backend tests used; the interpreted Triton
(slow) at its small ones only, the C++ scan additionally in both builds."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from postembed_fast.kernels import cpp_ops, float_topk, hamming_topk, int8_topk

INT_LOWEST = -(2**31)
_POP = np.array([bin(i).count("1") for i in range(256)], np.int64)


def np_scores(kind, q, x, zero=None):
    if kind == "binary":
        qu, xu = q.view(np.uint8), x.view(np.uint8)
        ham = _POP[qu[:, None, :] ^ xu[None, :, :]].sum(-1)
        return 8 * q.shape[1] - ham
    if kind == "int8":
        z = np.zeros(q.shape[1], np.int64) if zero is None else zero.astype(np.int64)
        return (q.astype(np.int64) - z) @ (x.astype(np.int64) - z).T
    return q.astype(np.float64) @ x.astype(np.float64).T  # exact for the small-integer floats used here


def np_topk(scores, k, allow=None):
    nq, n = scores.shape
    low = -np.inf if scores.dtype.kind == "f" else INT_LOWEST
    out_s = np.full((nq, k), low, dtype=np.float64 if scores.dtype.kind == "f" else np.int64)
    out_i = np.full((nq, k), -1, np.int64)
    rows = np.arange(n) if allow is None else np.flatnonzero(allow)
    for i in range(nq):
        s = scores[i, rows]
        order = np.lexsort((rows, -s))[:k]  # score desc, then row asc
        out_s[i, : len(order)] = s[order]
        out_i[i, : len(order)] = rows[order]
    return out_s, out_i


def make_data(kind, nq, n, dim, seed, ties=True):
    rng = np.random.default_rng(seed)
    if kind == "binary":
        cols = (dim + 7) // 8
        q = rng.integers(-128, 128, (nq, cols), dtype=np.int8)
        x = rng.integers(-128, 128, (n, cols), dtype=np.int8)
        if dim % 8:  # the unused low bits of the last byte are 0 (numpy.packbits)
            keep = np.int16(0xFF << (8 - dim % 8) & 0xFF)
            q[:, -1] = ((q[:, -1].astype(np.int16) + 128) & keep) - 128
            x[:, -1] = ((x[:, -1].astype(np.int16) + 128) & keep) - 128
    elif kind == "int8":
        q = rng.integers(-128, 128, (nq, dim), dtype=np.int8)
        x = rng.integers(-128, 128, (n, dim), dtype=np.int8)
    else:  # small integers as floats: every dot product is exact, so ties are real ties
        q = rng.integers(-3, 4, (nq, dim)).astype(np.float32)
        x = rng.integers(-3, 4, (n, dim)).astype(np.float32)
    if ties and n > 3:
        x[n // 2:: 3] = x[1]  # many exact duplicates of row 1, spread over the rows
        q[0] = x[1]
    return q, x


def raw_scan(kind, backend, qt, xt, k, at, zero, out):
    """The backend's kernel called straight into caller buffers `out`, as the launcher calls it (Triton
    also poisons its internal partial buffers)."""
    ht, it, ft = (importlib.import_module(f"postembed_fast.kernels.{m}")
                  for m in ("hamming_topk", "int8_topk", "float_topk"))
    poison = {"poison": -99} if backend == "triton" else {}
    if kind == "binary":
        fn = cpp_ops.hamming_topk_cpp if backend == "cpp" else ht.hamming_topk_triton
        return fn(qt, xt, k, at, out=out, **poison)
    if kind == "int8":
        fn = cpp_ops.int8_topk_cpp if backend == "cpp" else it.int8_topk_triton
        s, i = fn(qt, xt, k, at, it.int8_row_bias(xt, zero), out=out, **poison)
        return it._finish(s, i, qt, zero)
    fn = cpp_ops.float_topk_cpp if backend == "cpp" else ft.float_topk_triton
    return fn(qt, xt, k, at, out=out, **poison)


def run(kind, backend, q, x, k, allow=None, zero=None, poison=False):
    qt, xt = torch.from_numpy(q), torch.from_numpy(x)
    at = None if allow is None else torch.from_numpy(allow)
    zt = None if zero is None else torch.from_numpy(zero)
    if poison and backend != "torch":  # the kernel must write every element of buffers full of garbage
        sd = torch.float32 if kind == "float32" else torch.int32
        out = (torch.full((len(q), k), 7, dtype=sd), torch.full((len(q), k), -77, dtype=torch.int64))
        s, i = raw_scan(kind, backend, qt, xt, k, at, zt, out)
        if kind != "int8":  # int8 scores get the per-query constant added afterwards (a new tensor)
            assert s.data_ptr() == out[0].data_ptr()
        assert i.data_ptr() == out[1].data_ptr()
        return s.numpy(), i.numpy()
    if kind == "binary":
        s, i = hamming_topk(qt, xt, k, at, backend=backend)
    elif kind == "int8":
        s, i = int8_topk(qt, xt, k, zt, at, backend=backend)
    else:
        s, i = float_topk(qt, xt, k, at, backend=backend)
    return s.numpy(), i.numpy()


def check(kind, backend, q, x, k, allow=None, zero=None, poison=False):
    want_s, want_i = np_topk(np_scores(kind, q, x, zero), k, allow)
    got_s, got_i = run(kind, backend, q, x, k, allow, zero, poison)
    assert got_i.dtype == np.int64 and got_i.shape == (len(q), k)
    assert got_s.dtype == (np.float32 if kind == "float32" else np.int32)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_s.astype(np.float64), want_s.astype(np.float64))


KINDS = ("binary", "int8", "float32")
DIMS = {"binary": (48, 50, 128, 384), "int8": (48, 50, 384), "float32": (48, 50, 128)}


def interpreted(backend, device):
    return backend == "triton" and device == "cpu"

# The three scans have the same backends: the marks name hamming_topk for all of them. Their tests
# build numpy inputs, so every backend runs on CPU tensors (Triton: the interpreter).


def block_edge_sizes(backend, device, n):
    """Not for the interpreted Triton (its sizes: the poisoned-buffer tests), nor the torch reference
    past 1,000 rows (slow there; the compiled scan is what has block edges at 4,096)."""
    return not interpreted(backend, device) and (backend != "torch" or n <= 1000)


@pytest.mark.backends("hamming_topk", "kind, n", [(kind, n) for kind in KINDS for n in (1, 7, 1000, 4097)],
                      device="cpu", cpu_isa=True,
                      keep=lambda backend, device, kind, n: block_edge_sizes(backend, device, n))
def test_exact_at_block_edges(backend, device, kind, n):
    """1, 7, 1000 and 4097 rows in every width; k = 1, 10 and every row; few queries; a sparse allow."""
    for dim in DIMS[kind]:
        q, x = make_data(kind, 9, n, dim, seed=n + dim)
        zero = np.random.default_rng(dim).integers(-128, 128, dim, dtype=np.int8) if kind == "int8" else None
        for k in sorted({1, min(10, n), n}):
            check(kind, backend, q, x, k, zero=zero)
        check(kind, backend, q[:2], x, min(10, n), zero=zero)  # few queries: binary scores rows in place
        allow = np.random.default_rng(n).random(n) < 0.3
        check(kind, backend, q, x, min(10, n), allow=allow, zero=zero)  # may leave fewer than k: padded


@pytest.mark.backends("hamming_topk", "kind, n, dim, k",
                      [(kind, n, dim, k) for kind in KINDS
                       for n, dim, k in [(1, 50, 1), (7, 48, 7), (300, 50, 10), (300, 128, 300), (70, 384, 3)]],
                      device="cpu")
def test_exact_into_poisoned_buffers(backend, device, kind, n, dim, k):
    if kind == "int8" and dim > 128 or kind == "float32" and dim > 128:
        dim = 128
    q, x = make_data(kind, 18, n, dim, seed=n * 7 + dim)
    zero = np.random.default_rng(1).integers(-128, 128, dim, dtype=np.int8) if kind == "int8" else None
    check(kind, backend, q, x, k, zero=zero, poison=True)
    check(kind, backend, q, x, min(k, 4), allow=np.random.default_rng(2).random(n) < 0.5, zero=zero, poison=True)


@pytest.mark.backends("hamming_topk", "kind, n", [(kind, n) for kind in KINDS for n in (7, 1000)], device="cpu",
                      keep=lambda backend, device, kind, n: n <= 7 or not interpreted(backend, device))
def test_exact_with_a_zero_point_and_a_strided_allow(backend, device, kind, n):
    dim = 50
    q, x = make_data(kind, 5, n, dim, seed=3)
    zero = np.arange(-25, 25, dtype=np.int8) if kind == "int8" else None
    for k in (1, n):
        check(kind, backend, q, x, k, zero=zero)
    check(kind, backend, q, x, 5, allow=np.arange(n) % 4 == 1, zero=zero)


def test_scan_is_blocked_not_full_matrix(monkeypatch):
    """The torch reference scores the database in blocks and merges partial top-k (bounded memory)."""
    from postembed_fast.kernels import topk_common

    monkeypatch.setattr(topk_common, "REF_BLOCK_ELEMS", 7 * 6 * 16)  # blocks of 16 rows for 7 queries x 6 bytes
    q, x = make_data("binary", 7, 1000, 48, seed=5)
    check("binary", "torch", q, x, 10)
    check("binary", "torch", q, x, 1000)


@pytest.mark.backends("hamming_topk", device="cpu", keep=lambda backend, device: backend == "cpp")
def test_large_k_and_many_queries(backend, device):
    q, x = make_data("binary", 300, 4097, 384, seed=11)
    check("binary", backend, q, x, 4097)


@pytest.mark.parametrize("fn,dt", [(hamming_topk, torch.int8), (int8_topk, torch.int8), (float_topk, torch.float32)])
def test_bad_input(fn, dt):
    x = torch.zeros(5, 8, dtype=dt)
    with pytest.raises(ValueError, match="k must be"):
        fn(x[:1], x, 0)
    with pytest.raises(ValueError, match="k must be"):
        fn(x[:1], x, 6)
    with pytest.raises(ValueError, match="empty"):
        fn(x[:1], x[:0], 1)
    with pytest.raises(ValueError, match="columns|dimensions|bytes"):
        fn(torch.zeros(1, 7, dtype=dt), x, 1)
    with pytest.raises(TypeError):
        fn(x[:1].to(torch.float64), x, 1)
    with pytest.raises(TypeError, match="allow"):
        fn(x[:1], x, 1, allow=torch.ones(5, dtype=torch.int32))
    with pytest.raises(ValueError, match="allow"):
        fn(x[:1], x, 1, allow=torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="k must be"):
        fn(x[:1], x, 1.5)


# ---- sign_dot_topk (kernels/sign_dot_topk.py): int8 query . (+1/-1 per packed bit) ------------------

def np_sign_scores(q, codes):
    """The documented score from first principles: unpack the true sign bits (binary int8 codes are
    ubinary - 128), s = +1 / -1, integer dot."""
    u = codes.view(np.uint8) if codes.dtype == np.uint8 else (codes.astype(np.int16) + 128).astype(np.uint8)
    s = np.unpackbits(u, axis=1).astype(np.int64) * 2 - 1
    return q.astype(np.int64) @ s.T


def make_sign_data(nq, n, dim, seed, dtype):
    rng = np.random.default_rng(seed)
    q = rng.integers(-127, 128, (nq, dim)).astype(np.int8)
    codes = rng.integers(0, 256, (n, dim // 8)).astype(np.uint8)
    if n > 3:
        codes[n // 2:: 3] = codes[1]  # exact duplicates of row 1: ties broken by row
    if nq > 2:
        q[1] = 0  # every row scores 0: the top k is rows 0..k-1 (of the allowed ones)
        q[2, :] = 127  # the largest scores: mostly set bits
    codes = codes if dtype == np.uint8 else (codes.astype(np.int16) - 128).astype(np.int8)
    return q, codes


def check_sign(backend, q, codes, k, allow=None, poison=False):
    sd = importlib.import_module("postembed_fast.kernels.sign_dot_topk")  # the module (the package has the function)

    want_s, want_i = np_topk(np_sign_scores(q, codes), k, allow)
    qt, xt = torch.from_numpy(q), torch.from_numpy(codes)
    at = None if allow is None else torch.from_numpy(allow)
    if poison and backend != "torch":  # the kernel writes every element of caller buffers full of garbage
        out = (torch.full((len(q), k), 7, dtype=torch.int32), torch.full((len(q), k), -77, dtype=torch.int64))
        sd.sign_dot_topk(qt, xt, 1)  # argument checks as the launcher does them
        if backend == "cpp":
            s, i = sd.sign_dot_topk_cpp(*sd.raw_bit_query(qt, xt), k, at, out=out)
        else:  # Triton: its internal partial buffers poisoned too
            s, i = sd.sign_dot_topk_triton(*sd.raw_bit_query(qt, xt), k, at, out=out, poison=-99)
        assert s.data_ptr() == out[0].data_ptr() and i.data_ptr() == out[1].data_ptr()
    else:
        s, i = sd.sign_dot_topk(qt, xt, k, at, backend=backend)
    s, i = s.numpy(), i.numpy()
    assert s.dtype == np.int32 and i.dtype == np.int64 and i.shape == (len(q), k)
    np.testing.assert_array_equal(i, want_i)
    np.testing.assert_array_equal(s.astype(np.int64), want_s)


SIGN_CODES = [(np.int8,), (np.uint8,)]  # binary, ubinary


def _codes_id(dtype):
    return "binary" if dtype is np.int8 else "ubinary"


@pytest.mark.backends("sign_dot_topk", "n, dtype", [pytest.param(n, d, id=f"{n}-{_codes_id(d)}")
                                                     for n in (1, 7, 1000, 4097) for (d,) in SIGN_CODES],
                      device="cpu", cpu_isa=True,
                      keep=lambda backend, device, n, dtype: block_edge_sizes(backend, device, n))
def test_sign_dot_exact_at_block_edges(backend, device, n, dtype):
    for dim in (48, 64, 384, 1024):
        q, codes = make_sign_data(9, n, dim, seed=n + dim, dtype=dtype)
        for k in sorted({1, min(10, n), n}):
            check_sign(backend, q, codes, k)
        check_sign(backend, q[:1], codes, min(10, n))
        allow = np.random.default_rng(n).random(n) < 0.3
        check_sign(backend, q, codes, min(10, n), allow=allow)  # may leave fewer than k: padded with -1
        check_sign(backend, q, codes, min(10, n), allow=allow, poison=True)
        check_sign(backend, q, codes, n, poison=True)


@pytest.mark.backends("sign_dot_topk", "n, dtype", [pytest.param(n, d, id=f"{n}-{_codes_id(d)}")
                                                     for n in (1, 7, 1000) for (d,) in SIGN_CODES],
                      device="cpu", keep=lambda backend, device, n, dtype: n <= 7 or not interpreted(backend, device))
def test_sign_dot_exact_with_a_strided_allow(backend, device, n, dtype):
    q, codes = make_sign_data(5, n, 64, seed=4, dtype=dtype)
    for k in sorted({1, n}):
        check_sign(backend, q, codes, k)
    check_sign(backend, q, codes, min(5, n), allow=np.arange(n) % 4 == 1)


def test_sign_dot_reference_is_blocked(monkeypatch):
    """The torch reference unpacks and scores the database in blocks (bounded memory), merging partial top-k."""
    from postembed_fast.kernels import topk_common

    monkeypatch.setattr(topk_common, "REF_BLOCK_ELEMS", 8 * 48 * 5)  # 5 rows of 48 bytes unpacked at a time
    q, codes = make_sign_data(7, 300, 384, seed=6, dtype=np.int8)
    check_sign("torch", q, codes, 10)
    check_sign("torch", q, codes, 300)


@pytest.mark.backends("sign_dot_topk", "n, dim, k, dtype",
                      [pytest.param(n, dim, k, d, id=f"{n}-{dim}-{k}-{_codes_id(d)}")
                       for n, dim, k in [(1, 48, 1), (7, 64, 7), (300, 64, 10), (100, 48, 100), (70, 384, 3)]
                       for (d,) in SIGN_CODES], device="cpu")
def test_sign_dot_exact_into_poisoned_buffers(backend, device, n, dim, k, dtype):
    q, codes = make_sign_data(18, n, dim, seed=n * 7 + dim, dtype=dtype)
    check_sign(backend, q, codes, k, poison=True)
    check_sign(backend, q, codes, min(k, 4), allow=np.random.default_rng(2).random(n) < 0.5, poison=True)
    check_sign(backend, q[:3], codes, k)  # through the launcher and the dispatcher


def test_sign_dot_bad_input():
    from postembed_fast.kernels import sign_dot_topk

    q = torch.zeros(2, 16, dtype=torch.int8)
    x = torch.zeros(5, 2, dtype=torch.int8)
    with pytest.raises(ValueError, match="k must be"):
        sign_dot_topk(q, x, 6)
    with pytest.raises(ValueError, match="sign bits"):
        sign_dot_topk(torch.zeros(2, 15, dtype=torch.int8), x, 1)
    with pytest.raises(ValueError, match="-127, 127"):
        sign_dot_topk(torch.full((1, 16), -128, dtype=torch.int8), x, 1)
    with pytest.raises(TypeError, match="queries"):
        sign_dot_topk(q.float(), x, 1)
    with pytest.raises(TypeError, match="database"):
        sign_dot_topk(q, x.to(torch.int16), 1)
    with pytest.raises(ValueError, match="empty"):
        sign_dot_topk(q, x[:0], 1)
    with pytest.raises(ValueError, match="allow"):
        sign_dot_topk(q, x, 1, allow=torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="k must be"):
        sign_dot_topk(q, x, 1.5)


# ---- sign_dot_rerank: the asymmetric score of given candidate rows (the pre-filtered search's second stage) ----
@pytest.mark.backends("sign_dot_rerank", "dtype, n, dim, P, k",
                      [pytest.param(d, n, dim, P, k, id=f"{_codes_id(d)}-{n}-{dim}-{P}-{k}") for d in (np.int8, np.uint8)
                       for n, dim, P, k in [(1, 48, 1, 1), (50, 64, 7, 3), (300, 384, 160, 40), (90, 48, 10, 25)]],
                      device="cpu")
def test_sign_dot_rerank_matches_the_reference_on_its_candidates(backend, device, dtype, n, dim, P, k):
    """The k best of each query's candidates by sum_d q_d s_d, ties by the lower row, -1 candidates ignored,
    -1 / INT32_MIN past them; the same scores as sign_dot_topk."""
    sd = importlib.import_module("postembed_fast.kernels.sign_dot_topk")
    q, codes = make_sign_data(6, n, dim, seed=n + P, dtype=dtype)
    rng = np.random.default_rng(P)
    cand = np.stack([rng.permutation(n)[: min(P, n)] for _ in range(len(q))])
    if P > n:
        cand = np.pad(cand, ((0, 0), (0, P - n)), constant_values=-1)
    if cand.shape[1] > 2:
        cand[0, 1] = -1  # a hole, as an allow-filtered first stage leaves
    scores = np_sign_scores(q, codes)
    s, rows = sd.sign_dot_rerank(torch.from_numpy(q), torch.from_numpy(codes), torch.from_numpy(cand), k, backend=backend)
    assert s.dtype == torch.int32 and rows.dtype == torch.int64 and rows.shape == (len(q), k)
    for i in range(len(q)):
        c = cand[i][cand[i] >= 0]
        o = np.lexsort((c, -scores[i, c]))[:k]
        want_rows = np.full(k, -1, np.int64)
        want_rows[: len(o)] = c[o]
        want_s = np.full(k, INT_LOWEST, np.int64)
        want_s[: len(o)] = scores[i, c[o]]
        np.testing.assert_array_equal(rows[i].numpy(), want_rows)
        np.testing.assert_array_equal(s[i].numpy(), want_s)


def test_sign_dot_rerank_refuses_bad_candidates():
    sd = importlib.import_module("postembed_fast.kernels.sign_dot_topk")
    q, codes = make_sign_data(3, 20, 48, seed=1, dtype=np.uint8)
    qt, xt = torch.from_numpy(q), torch.from_numpy(codes)
    with pytest.raises(ValueError, match=r"cand rows must be in \[-1, 20\)"):
        sd.sign_dot_rerank(qt, xt, torch.tensor([[0, 20]] * 3), 1)
    with pytest.raises(ValueError, match="cand must be int64"):
        sd.sign_dot_rerank(qt, xt, torch.zeros(2, 4, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="cand must be int64"):
        sd.sign_dot_rerank(qt, xt, torch.zeros(3, 4, dtype=torch.int32), 1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        sd.sign_dot_rerank(qt, xt, torch.zeros(3, 4, dtype=torch.int64), 0)
