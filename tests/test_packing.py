"""Packing flat token ids into the encoder's inputs (postembed_fast/packing.py), against a
per-sequence Python reference."""
from __future__ import annotations

import numpy as np
import pytest

from postembed_fast.packing import flatten, pack, packed_batches, padded, plan_batches


def random_seqs(n, seed, max_len=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 30522, size=int(rng.integers(1, max_len))).tolist() for _ in range(n)]


def reference_pack(seqs, rows):
    ids, positions, cu = [], [], [0]
    for r in rows:
        ids += seqs[r]
        positions += list(range(len(seqs[r])))
        cu.append(cu[-1] + len(seqs[r]))
    return ids, positions, cu


@pytest.mark.parametrize("n, seed", [(1, 0), (7, 1), (300, 2)])
@pytest.mark.parametrize("ids_dtype", [np.int64, np.uint32, np.int32])
def test_pack_matches_per_sequence_reference(n, seed, ids_dtype):
    seqs = random_seqs(n, seed)
    ids, offsets = flatten(seqs)
    ids = ids.astype(ids_dtype)
    rows = np.random.default_rng(seed).permutation(n)[: max(1, n // 2)]
    b = pack(ids, offsets, rows)
    want_ids, want_pos, want_cu = reference_pack(seqs, rows)
    assert b.input_ids.dtype == np.int64 and b.positions.dtype == np.int64 and b.cu_seqlens.dtype == np.int32
    np.testing.assert_array_equal(b.input_ids, want_ids)
    np.testing.assert_array_equal(b.positions, want_pos)
    np.testing.assert_array_equal(b.cu_seqlens, want_cu)
    np.testing.assert_array_equal(b.rows, rows)
    assert b.tokens == len(want_ids) and b.max_seqlen == max(len(seqs[r]) for r in rows)


def test_flatten_offsets():
    ids, offsets = flatten([[5, 6], [], [7]])
    np.testing.assert_array_equal(ids, [5, 6, 7])
    np.testing.assert_array_equal(offsets, [0, 2, 2, 3])


@pytest.mark.parametrize("budget", [1, 50, 128, 10_000])
def test_plan_batches_covers_every_row_once_within_budget(budget):
    lengths = np.array([len(s) for s in random_seqs(200, 3)])
    batches = plan_batches(lengths, budget)
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(200))  # nothing lost or repeated
    for b in batches:
        assert lengths[b].sum() <= budget or len(b) == 1  # a longer single sequence gets its own batch
    order = np.concatenate(batches)
    assert np.all(np.diff(lengths[order]) <= 0)  # longest first


def test_packed_batches_reassemble_every_text():
    seqs = random_seqs(100, 4)
    ids, offsets = flatten(seqs)
    got = {}
    for b in packed_batches(ids, offsets, 97):
        for i, r in enumerate(b.rows):
            got[int(r)] = b.input_ids[b.cu_seqlens[i]: b.cu_seqlens[i + 1]].tolist()
    assert got == dict(enumerate(seqs))


def test_padded_adds_one_filler_sequence():
    seqs = [[101, 7, 102], [101, 102]]
    ids, offsets = flatten(seqs)
    b = padded(pack(ids, offsets, [0, 1]), 64)
    np.testing.assert_array_equal(b.cu_seqlens, [0, 3, 5, 64])
    np.testing.assert_array_equal(b.input_ids[:5], [101, 7, 102, 101, 102])
    assert not b.input_ids[5:].any() and not b.positions[5:].any()  # filler: token 0 at position 0
    np.testing.assert_array_equal(b.positions[:5], [0, 1, 2, 0, 1])
    assert b.tokens == 5 and len(b.input_ids) == 64
    with pytest.raises(ValueError, match="filler"):
        padded(pack(ids, offsets, [0, 1]), 5)
