"""From flat token ids to the encoder's packed inputs: the one module that does that arithmetic
(in the spirit of flash-attention's bert_padding).

Tokenized texts arrive as two arrays, `ids` (every text's token ids, concatenated) and
`offsets` ([N+1]: text i is ids[offsets[i]:offsets[i+1]]). A batch is a set of rows packed
back to back: input_ids and positions [T], cu_seqlens [B+1] (sequence b is tokens
cu[b]:cu[b+1]). Everything is numpy gathers and cumulative sums: no Python loop per text
or per token.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PackedBatch:
    rows: np.ndarray  # int64 [B]: which texts (indices into the tokenized input), in packed order
    input_ids: np.ndarray  # int64 [T]
    positions: np.ndarray  # int64 [T]
    cu_seqlens: np.ndarray  # int32 [B+1] (+1 more entry when padded: the filler sequence)
    max_seqlen: int
    tokens: int  # real tokens (a padded batch has len(input_ids) > tokens)

    @property
    def size(self) -> int:
        return len(self.rows)


def lengths_of(offsets: np.ndarray) -> np.ndarray:
    return np.diff(offsets)


def plan_batches(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Indices sorted by token count (longest first), cut into batches of <= batch_tokens
    tokens (a longer single sequence gets a batch of its own). One cut per batch, not per text."""
    order = np.argsort(-lengths, kind="stable")
    csum = np.cumsum(lengths[order])
    batches, start, done = [], 0, 0
    while start < len(order):
        end = int(np.searchsorted(csum, done + batch_tokens, side="right"))
        end = max(end, start + 1)
        batches.append(order[start:end])
        done = int(csum[end - 1])
        start = end
    return batches


def pack(ids: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> PackedBatch:
    """Gather texts `rows` of the flat (ids, offsets) into one packed batch."""
    rows = np.asarray(rows, dtype=np.int64)
    starts = offsets[rows]
    lens = offsets[rows + 1] - starts
    B, T = len(rows), int(lens.sum())
    cu = np.zeros(B + 1, dtype=np.int32)
    np.cumsum(lens, out=cu[1:])
    positions = np.arange(T, dtype=np.int64) - np.repeat(cu[:-1].astype(np.int64), lens)
    input_ids = ids[np.repeat(starts, lens) + positions].astype(np.int64, copy=False)
    return PackedBatch(rows, input_ids, positions, cu, int(lens.max()) if B else 0, T)


def padded(batch: PackedBatch, total: int) -> PackedBatch:
    """The batch padded to `total` tokens (CUDA graph buckets): the spare tokens form one extra
    filler sequence (token id 0 at position 0) whose output is never read. It needs at
    least one token, so total must exceed the batch's tokens."""
    T = batch.tokens
    if total <= T:
        raise ValueError(f"{T} tokens do not fit a padded batch of {total} with a filler token")
    ids = np.zeros(total, dtype=np.int64)
    ids[:T] = batch.input_ids
    positions = np.zeros(total, dtype=np.int64)
    positions[:T] = batch.positions
    cu = np.append(batch.cu_seqlens, np.int32(total))
    return PackedBatch(batch.rows, ids, positions, cu, max(batch.max_seqlen, total - T), T)


def packed_batches(ids: np.ndarray, offsets: np.ndarray, batch_tokens: int):
    """Yield the PackedBatch of every planned batch of the tokenized texts."""
    for rows in plan_batches(lengths_of(offsets), batch_tokens):
        yield pack(ids, offsets, rows)


def flatten(seqs) -> tuple[np.ndarray, np.ndarray]:
    """Token id lists -> (ids int64, offsets int64 [N+1]), the tokenizer's flat form."""
    lens = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    ids = np.fromiter((t for s in seqs for t in s), dtype=np.int64, count=int(offsets[-1]))
    return ids, offsets
