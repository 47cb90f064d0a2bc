"""CUDA graphs for small requests (1 to GRAPH_MAX_POSTS posts).

A small request is all launch overhead: the encoder is ~60 kernel launches, each a few
microseconds of Python and driver time, against microseconds of GPU work. Replaying a
captured graph costs one launch.

A graph needs fixed shapes, so a request's packed tokens are padded to a bucket:
T_bucket = the next power of two above T (at least 64 tokens), the spare tokens forming
one extra filler sequence (token id 0 at position 0) whose output is never read. A graph
is captured per (T_bucket, number of posts), lazily, the first time that shape is seen;
all graphs share one set of static input buffers and one activation Workspace, so replays
are serialized by a lock. The pooling epilogue runs eagerly after the replay, inside the
lock (it reads the shared hidden states), so every precision/normalize option shares the
same graphs.

Off with POSTEMBED_CUDA_GRAPHS=0. The padding itself is packing.padded, tested on CPU
(tests/test_packing.py); capture and replay are tested by the GPU tests.
"""
from __future__ import annotations

import os
import threading

import torch

from postembed_fast.model import Workspace
from postembed_fast.packing import PackedBatch, padded

GRAPH_MAX_POSTS = 8
GRAPH_MAX_TOKENS = 4096  # largest bucket: 8 posts x 512 tokens
GRAPH_MIN_TOKENS = 64


def graphs_enabled(device: torch.device) -> bool:
    """On CUDA with Triton: the torch reference attention sizes a tensor from cu_seqlens'
    contents (a host sync), which a capturing stream does not allow."""
    from postembed_fast.kernels.dispatch import TRITON_IMPORT_ERROR

    return (device.type == "cuda" and TRITON_IMPORT_ERROR is None
            and os.environ.get("POSTEMBED_CUDA_GRAPHS", "1") != "0")


def token_bucket(total_tokens: int) -> int:
    """Smallest power of two >= max(total_tokens + 1, GRAPH_MIN_TOKENS): room for >= 1 filler token."""
    return max(GRAPH_MIN_TOKENS, 1 << int(total_tokens).bit_length())


class GraphCaptureError(RuntimeError):
    """Capturing failed; the caller falls back to eager execution."""


class GraphRunner:
    """Captured encoder forwards for small requests on one CUDA device."""

    def __init__(self, encoder, device: torch.device, max_seq_length: int):
        self.encoder, self.device = encoder, device
        self.max_tokens = min(GRAPH_MAX_TOKENS, token_bucket(GRAPH_MAX_POSTS * max_seq_length))
        self._lock = threading.Lock()
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._static = None  # (ids, positions, cu, pinned host staging), allocated at first use
        self._workspace = Workspace()
        self._side = None  # the capture warm-up stream

    def takes(self, batch: PackedBatch) -> bool:
        return batch.size <= GRAPH_MAX_POSTS and token_bucket(batch.tokens) <= self.max_tokens

    def run(self, batch: PackedBatch, finish):
        """finish(hidden [T, hidden], cu_seqlens [B+1] on the device) -> result, called under the lock."""
        T, B = batch.tokens, batch.size
        bucket = token_bucket(T)
        p = padded(batch, bucket)
        host = (p.input_ids, p.positions, p.cu_seqlens)
        with self._lock, torch.cuda.device(self.device):
            if self._static is None:
                self._allocate()
            ids, positions, cu, staging = self._static
            graph, hidden = self._graphs.get((bucket, B)) or self._capture(bucket, B)
            # through pinned staging: the copies are asynchronous and ordered before the replay
            for dst, src, pin in zip((ids, positions, cu), host, staging):
                pin[: len(src)].copy_(torch.from_numpy(src))
                dst[: len(src)].copy_(pin[: len(src)], non_blocking=True)
            graph.replay()
            out = finish(hidden[:T], cu[: B + 1])
            # the staging buffers are rewritten by the next call: wait until this copy has read them
            torch.cuda.current_stream(self.device).synchronize()
            return out

    def _workspace_ptrs(self, rows: int = 1) -> list[int]:
        # the encoder's own device and dtype, as forward() asks for them (torch.device("cuda")
        # != torch.device("cuda:0"): another spelling would reallocate the buffers)
        w = self.encoder.word
        return [b.data_ptr() for b in self._workspace.buffers(rows, self.encoder.config, w.device, w.dtype)]

    def _allocate(self):
        n, slots = self.max_tokens, GRAPH_MAX_POSTS + 2
        # sized for the largest bucket now: a workspace that grew later would move the
        # buffers that earlier graphs write to
        self._workspace_ptrs(n)
        dev = dict(device=self.device)
        self._static = (torch.zeros(n, dtype=torch.int64, **dev), torch.zeros(n, dtype=torch.int64, **dev),
                        torch.zeros(slots, dtype=torch.int32, **dev),
                        [torch.empty(n, dtype=torch.int64, pin_memory=True),
                         torch.empty(n, dtype=torch.int64, pin_memory=True),
                         torch.empty(slots, dtype=torch.int32, pin_memory=True)])

    def _capture(self, bucket: int, B: int):
        ids, positions, cu, _ = self._static
        ids, positions, cu = ids[:bucket], positions[:bucket], cu[: B + 2]
        # valid placeholder contents: B one-token sequences and a filler
        cu.copy_(torch.tensor([*range(B + 1), bucket], dtype=torch.int32))
        ids.zero_()
        positions.zero_()
        # max_seqlen = bucket bounds every sequence in any request of this shape
        run = lambda: self.encoder.forward(ids, positions, cu, bucket, workspace=self._workspace)  # noqa: E731
        buffers = self._workspace_ptrs()
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        self._side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._side):  # warm-up outside the graph: Triton compiles, cuBLAS picks its kernels
            for _ in range(2):
                run()
        torch.cuda.current_stream(self.device).wait_stream(self._side)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: other threads' eager work (allocations, syncs) may go on during a capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                hidden = run()
        except Exception as exc:  # e.g. a kernel path that syncs with the host
            raise GraphCaptureError(f"CUDA graph capture failed for {bucket} tokens, {B} posts: {exc}") from exc
        if self._workspace_ptrs() != buffers:  # every graph must write into the same, never-freed buffers
            raise GraphCaptureError("the graph workspace moved during capture")
        self._graphs[(bucket, B)] = (graph, hidden)
        return graph, hidden
