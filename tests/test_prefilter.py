"""The Hamming pre-filter of binary search with rescore, op by op: hamming_kth_score (the gates),
gated_sign_dot_topk (the fused first stage), float16_rerank (the last stage). Each C++ build (every
ISA level this CPU runs) against the torch reference, on odd shapes, with poisoned outputs."""
import numpy as np
import pytest
import torch

from postembed_fast.kernels import float16_rerank, gated_sign_dot_topk, hamming_kth_score
from postembed_fast.kernels import _ext

needs_cpp = pytest.mark.skipif(_ext._C is None, reason="postembed_fast._C is not built")
SHAPES = [(1, 37, 3, torch.uint8), (5, 1000, 48, torch.int8), (9, 3001, 13, torch.int8), (17, 777, 8, torch.uint8)]


def _codes(g, n, b, dt):
    return torch.randint(0, 256, (n, b), generator=g, dtype=torch.uint8).view(dt)


@needs_cpp
@pytest.mark.parametrize("nq,N,B,dt", SHAPES)
@pytest.mark.parametrize("k", [1, 10, 40, 100])
def test_gated_sign_dot_topk_matches_reference(cpu_isa, nq, N, B, dt, k):
    g = torch.Generator().manual_seed(nq * N + k)
    q = torch.randint(-127, 128, (nq, 8 * B), generator=g, dtype=torch.int8)
    db, qb = _codes(g, N, B, dt), _codes(g, nq, B, dt)
    gate = torch.randint(4 * B - 4, 4 * B + 6, (nq,), generator=g, dtype=torch.int32)
    allow = torch.rand(N, generator=g) > 0.2
    k = min(k, N)
    for al in (None, allow):
        want = gated_sign_dot_topk(q, qb, db, gate, k, al, backend="torch")
        got = gated_sign_dot_topk(q, qb, db, gate, k, al, backend="cpp")
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    # the reference itself: every returned row passes the gate, the rest are -1 / INT32_MIN
    s, rows = want
    ham = 8 * B - torch.from_numpy(np.unpackbits(qb.view(torch.uint8).numpy()[:, None, :] ^ db.view(torch.uint8).numpy()[None], axis=-1).sum(-1).astype(np.int64))
    ok = rows >= 0
    assert bool((torch.gather(ham, 1, rows.clamp(min=0))[ok] >= gate[:, None].expand_as(rows)[ok].long()).all())
    assert bool((s[~ok] == -(2**31)).all())


@needs_cpp
@pytest.mark.parametrize("nq,N,B,dt", SHAPES + [(300, 1000, 8, torch.uint8)])
@pytest.mark.parametrize("k", [1, 2, 7, 40, 500])
def test_hamming_kth_score_matches_reference(cpu_isa, nq, N, B, dt, k):
    g = torch.Generator().manual_seed(nq + N + k)
    q, db = _codes(g, nq, B, dt), _codes(g, N, B, dt)
    allow = torch.rand(N, generator=g) > 0.5
    for al in (None, allow):
        assert torch.equal(hamming_kth_score(q, db, k, al, backend="torch"), hamming_kth_score(q, db, k, al, backend="cpp"))
    sample = db[::3]  # a strided view, read in place
    assert torch.equal(hamming_kth_score(q, sample, 2, backend="torch"), hamming_kth_score(q, sample, 2, backend="cpp"))


def test_hamming_kth_score_is_the_kth_of_all_scores():
    g = torch.Generator().manual_seed(3)
    q, db = _codes(g, 4, 5, torch.uint8), _codes(g, 50, 5, torch.uint8)
    ham = 40 - np.unpackbits(q.numpy()[:, None, :] ^ db.numpy()[None], axis=-1).sum(-1)
    for k in (1, 5, 50):
        want = -np.sort(-ham, axis=1)[:, k - 1]
        for be in ("torch",) + (("cpp",) if _ext._C is not None else ()):
            assert hamming_kth_score(q, db, k, backend=be).numpy().tolist() == want.tolist()
        assert (hamming_kth_score(q, db, 51, backend="torch") == -(2**31)).all()


@needs_cpp
@pytest.mark.parametrize("nq,N,D", [(1, 5, 1), (3, 100, 17), (7, 500, 384), (33, 64, 50)])
@pytest.mark.parametrize("k", [1, 10, 60])
def test_float16_rerank_matches_float64(cpu_isa, nq, N, D, k):
    g = torch.Generator().manual_seed(nq * D + k)
    q = torch.randn(nq, D, generator=g)
    vec = torch.randn(N, D, generator=g).half()
    # distinct rows per query (as a scan gives), some -1 (a scan's padding)
    cand = torch.stack([torch.randperm(N, generator=g)[:50] for _ in range(nq)])
    cand = cand.masked_fill(torch.rand(cand.shape, generator=g) < 0.2, -1)
    out = (torch.full((nq, k), float("nan")), torch.full((nq, k), -7, dtype=torch.int64))
    from postembed_fast.kernels.float16_rerank import float16_rerank_cpp
    s, rows = float16_rerank_cpp(q, vec, cand, k, out=out)
    ws, wrows = float16_rerank(q, vec, cand, k, backend="torch")
    ref = (q.double()[:, None, :] * vec.double()[cand.clamp(min=0)]).sum(-1)
    for i in range(nq):
        valid = sorted(set(cand[i][cand[i] >= 0].tolist()))
        m = min(k, len(valid))
        assert (rows[i, m:] == -1).all() and torch.isinf(s[i, m:]).all()
        exact = {r: float((q[i].double() * vec[r].double()).sum()) for r in valid}
        for j in range(m):
            assert abs(float(s[i, j]) - exact[int(rows[i, j])]) < 1e-4 * max(1.0, D ** 0.5)
        got_scores = [exact[int(r)] for r in rows[i, :m]]
        best = sorted(exact.values(), reverse=True)[:m]
        assert np.allclose(got_scores, best, atol=1e-4 * max(1.0, D ** 0.5))
    assert torch.allclose(s, ws, atol=1e-4 * max(1.0, D ** 0.5))


def test_float16_rerank_refuses_bad_input():
    q, vec = torch.randn(2, 8), torch.randn(10, 8).half()
    with pytest.raises(ValueError, match="cand rows"):
        float16_rerank(q, vec, torch.tensor([[0, 10], [1, 2]]), 1)
    with pytest.raises(TypeError, match="vectors"):
        float16_rerank(q, vec.float(), torch.tensor([[0, 1], [1, 2]]), 1)
    with pytest.raises(ValueError, match="dimensions"):
        float16_rerank(q, torch.randn(10, 9).half(), torch.tensor([[0, 1], [1, 2]]), 1)
