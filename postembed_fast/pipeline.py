"""The host side of embed(): keep the encoder fed.

    producer thread: take the next chunk of TokenizedTexts (the embedder tokenizes texts here,
                     a chunk at a time: flat ids + offsets, GIL released)
                     -> plan batches by length -> pack each (numpy gathers)
                     -> bounded queue of PackedBatch
    calling thread:  batch -> device (pinned staging reused, copies on a side stream)
                     -> encoder -> pooling head -> readback into the output rows

Small inputs (one chunk) skip the thread: no hop on the latency path. On CPU the same
producer overlaps tokenization with the encoder on the other cores.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterable

import numpy as np
import torch

from postembed_fast.packing import PackedBatch, packed_batches
from postembed_fast.tokenization import TokenizedTexts

# texts per chunk (one tokenizer call, one batch plan): big enough to use every core, small enough to overlap
TOKENIZE_CHUNK = 4096
QUEUE_BATCHES = 8  # packed batches the producer may run ahead


def batches(chunks: Iterable[TokenizedTexts], batch_tokens: int):
    """Yield PackedBatch for every text of the chunks, chunk by chunk; rows index the texts of all
    chunks together (chunk 2's first text follows chunk 1's last)."""
    start = 0
    for tokens in chunks:
        for b in packed_batches(tokens.ids, tokens.offsets, batch_tokens):
            if start:
                b.rows += start
            yield b
        start += len(tokens)


_DONE = object()


def run_ahead(gen, maxsize: int = QUEUE_BATCHES):
    """Iterate `gen` on a background thread, at most `maxsize` items ahead. Exceptions reach the
    consumer; a consumer that stops early (exception, break) stops the producer."""
    q: queue.Queue = queue.Queue(maxsize)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in gen:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(exc)

    thread = threading.Thread(target=produce, name="postembed-pipeline", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


class DeviceInputs:
    """Packed batches onto the device. On CPU: zero-copy views. On CUDA: through pinned staging
    buffers reused round-robin (a fresh pinned allocation per batch took 41% of the host thread
    on the H200), copied on a side stream that the compute stream then waits for; a slot is
    rewritten (or replaced by a bigger one) only once its previous copy has completed. One per
    thread and device (HostBuffers), reused call after call."""

    SLOTS = 3

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = None  # created at the first CUDA batch
        self.slots = [None] * self.SLOTS  # (pinned uint8 buffer, event of its last copy)
        self.next = 0

    def __call__(self, batch: PackedBatch):
        arrays = (batch.input_ids, batch.positions, batch.cu_seqlens)
        if not self.cuda:
            return [torch.from_numpy(a) for a in arrays]
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
        n = sum(_aligned(a.nbytes) for a in arrays)
        slot = self.slots[self.next]
        if slot is not None:
            slot[1].synchronize()  # its last copy has read it
        if slot is None or slot[0].numel() < n:
            slot = (torch.empty(max(n, 1 << 20), dtype=torch.uint8, pin_memory=True), None)
        pinned = slot[0]
        host = pinned.numpy()
        out, at = [], 0
        compute = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(compute)  # the buffers it allocates may reuse memory compute just freed
        with torch.cuda.stream(self.stream):
            for a in arrays:
                view = host[at : at + a.nbytes].view(a.dtype)
                view[:] = a
                t = torch.from_numpy(view).to(self.device, non_blocking=True)
                t.record_stream(compute)  # used on the compute stream: keep it alive until that work is done
                out.append(t)
                at += _aligned(a.nbytes)
        event = torch.cuda.Event()
        event.record(self.stream)
        compute.wait_event(event)
        self.slots[self.next] = (pinned, event)
        self.next = (self.next + 1) % self.SLOTS
        return out


class HostBuffers(threading.local):
    """Per calling thread: the staging (DeviceInputs) and readback slots of each device, kept
    across calls so no call pays for pinned allocations (an Embedder may run on many threads)."""

    def __init__(self):
        self.inputs: dict[torch.device, DeviceInputs] = {}
        self.readback_slots: list = [None, None]

    def device_inputs(self, device: torch.device) -> DeviceInputs:
        if device not in self.inputs:
            self.inputs[device] = DeviceInputs(device)
        return self.inputs[device]


def _aligned(nbytes: int) -> int:
    """Each array of a staging buffer starts 64-byte aligned."""
    return -(-nbytes // 64) * 64


class Readback:
    """Writes each batch's result rows at their input positions. On CUDA the copy to pinned host
    memory is asynchronous (two pinned slots reused) and a batch is collected only after the
    next one is launched, so the device never waits for Python; on CPU it writes at once."""

    def __init__(self, out: np.ndarray, device: torch.device, slots: list):
        """slots: two pinned buffers (or None) to reuse, e.g. HostBuffers.readback_slots."""
        self.out, self.cuda, self.pending = out, device.type == "cuda", None
        self.slots, self.next = slots, 0

    def put(self, rows: np.ndarray, result: torch.Tensor) -> None:
        if not self.cuda:
            self.out[rows] = result.numpy()
            return
        n = result.numel() * result.element_size()
        slot = self.slots[self.next]
        if slot is None or slot.numel() < n:
            slot = self.slots[self.next] = torch.empty(max(n, 1 << 20), dtype=torch.uint8, pin_memory=True)
        host = slot[:n].view(result.dtype).view(result.shape)
        host.copy_(result, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self.flush()  # the other slot's batch: its copy was enqueued one batch ago
        self.pending = (rows, host, done)
        self.next ^= 1

    def flush(self) -> None:
        if self.pending is not None:
            rows, host, done = self.pending
            done.synchronize()
            self.out[rows] = host.numpy()
            self.pending = None
