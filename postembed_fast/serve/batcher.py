"""Dynamic batching: requests from the event loop are tokenized on one thread and merged into
token-budget batches on one model thread (per device); each answer goes back to its request's
asyncio future through loop.call_soon_threadsafe, so the event loop never waits on either.

    event loop --submit(job)--> [tokenizer thread] --ready deque--> [model thread] --future--> event loop

Each text is tokenized once: the tokenizer thread turns a request's texts into its TokenizedTexts
(Embedder.tokenize_flat), whose offsets give the request's tokens (usage, the merge budget), and
turns a text the tokenizer refuses into that request's own error, so one bad request never fails a
merged batch. The model thread takes the oldest ready request, adds later ones with the same output
options while the batch stays within max_batch_tokens (the merge budget; and max_batch_requests),
waits up to max_wait for more when the batch is not full, and runs ONE Embedder.embed over the
requests' encodings joined (TokenizedTexts.concat), in forward batches of the engine's default size;
rows are sliced back per request in order. A request whose client went away (job.cancelled) is skipped.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from postembed_fast.tokenization import TokenizedTexts

log = logging.getLogger("postembed_fast.serve")

EMBED, TOKENIZE = "embed", "tokenize"


class Overloaded(Exception):
    """The admission bound (max_concurrent_requests) is reached."""


class NotReady(Exception):
    """The model is not loaded (yet), failed to load, or the server is draining."""


@dataclass
class Job:
    kind: str  # EMBED or TOKENIZE
    texts: list[str]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    options: tuple = ()  # EMBED: (precision, normalize, dimensions)
    encoding: TokenizedTexts | None = None  # EMBED: set by the tokenizer thread, embedded by the model thread
    tokens: int = 0  # set by the tokenizer thread
    cancelled: bool = False  # set by the event loop when the client is gone
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class EmbedResult:
    embeddings: np.ndarray  # rows of this request, in order
    tokens: int


def _resolve(fut: asyncio.Future, value: Any, exc: BaseException | None) -> None:
    if fut.done():  # cancelled by the event loop meanwhile
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)


def _answer(job: Job, value: Any = None, exc: BaseException | None = None) -> None:
    try:
        job.loop.call_soon_threadsafe(_resolve, job.future, value, exc)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass


class Batcher:
    def __init__(self, load: Callable[[], Any], *, max_batch_tokens: int | None, max_wait_s: float,
                 max_queue: int, max_batch_requests: int | None = None, metrics=None,
                 on_fatal: Callable[[BaseException], None] | None = None):
        """max_batch_tokens: the merge budget (tokens of the requests merged into one embed call);
        None: the loaded Embedder's default_batch_tokens."""
        self._load = load
        self._max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.max_batch_requests = max_batch_requests or 0
        self.metrics = metrics
        self.on_fatal = on_fatal
        self.embedder = None
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.admitted = 0  # touched by the event loop only
        self._inbox: queue.Queue = queue.Queue()
        self._ready: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []

    @property
    def max_batch_tokens(self) -> int:
        """The merge budget (known once the model is loaded, when it defaults to the engine's)."""
        if self._max_batch_tokens is not None:
            return self._max_batch_tokens
        return self.embedder.default_batch_tokens

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Starts the model thread, which loads and warms the model, then the tokenizer thread."""
        t = threading.Thread(target=self._model_main, name="postembed-model", daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self, timeout: float | None = 30.0) -> None:
        self._stopping = True
        self._inbox.put(None)
        with self._cond:
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)
        for job in list(self._ready):
            _answer(job, exc=NotReady("server shutting down"))
        self._ready.clear()

    # ---- event loop side -----------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Admit a job or raise (never blocks). Every admitted job must be release()d."""
        if not self.ready.is_set() or self._stopping:
            raise NotReady("model is loading" if self.load_error is None else "model failed to load")
        if self.admitted >= self.max_queue:
            raise Overloaded(f"{self.admitted} requests in flight (--max-concurrent-requests {self.max_queue})")
        self.admitted += 1
        if self.metrics is not None:
            self.metrics.in_flight.inc()
            self.metrics.queue_depth.inc()
        self._inbox.put(job)

    def release(self, job: Job) -> None:
        self.admitted -= 1
        if self.metrics is not None:
            self.metrics.in_flight.dec()

    # ---- tokenizer thread ----------------------------------------------------------------
    def _tokenizer_main(self) -> None:
        emb = self.embedder
        while True:
            job = self._inbox.get()
            if job is None:
                return
            if job.cancelled:
                self._dequeued(job)
                continue
            t0 = time.perf_counter()
            try:
                if job.kind == TOKENIZE:
                    value = emb.tokenize(job.texts)
                else:
                    job.encoding = emb.tokenize_flat(job.texts)
                    job.tokens = job.encoding.tokens
            except (ValueError, TypeError) as exc:
                self._dequeued(job)
                _answer(job, exc=exc)
                continue
            except Exception as exc:  # noqa: BLE001 (answered, logged, the thread keeps serving)
                log.exception("tokenization failed")
                self._dequeued(job)
                _answer(job, exc=exc)
                continue
            finally:
                if self.metrics is not None:
                    self.metrics.tokenize_seconds.inc(time.perf_counter() - t0)
            if job.kind == TOKENIZE:
                self._dequeued(job)
                _answer(job, value)
                continue
            with self._cond:
                self._ready.append(job)
                self._cond.notify()

    def _dequeued(self, job: Job) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.dec()

    # ---- model thread --------------------------------------------------------------------
    def _model_main(self) -> None:
        try:
            self.embedder = self._load()
        except BaseException as exc:  # noqa: BLE001
            self.load_error = exc
            log.error("model failed to load: %s", exc)
            if self.on_fatal is not None:
                self.on_fatal(exc)
            return
        t = threading.Thread(target=self._tokenizer_main, name="postembed-tokenizer", daemon=True)
        t.start()
        self._threads.append(t)
        self.ready.set()
        if self.metrics is not None:
            self.metrics.ready.set(1)
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[Job] | None:
        budget, max_requests = self.max_batch_tokens, self.max_batch_requests
        with self._cond:
            while True:
                while not self._ready and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._ready:
                    return None
                first = self._ready.popleft()
                if not first.cancelled:
                    break
                self._dequeued(first)
            batch, tokens = [first], first.tokens
            deadline = time.perf_counter() + self.max_wait_s
            while tokens < budget and (not max_requests or len(batch) < max_requests):
                taken = self._take_matching(first.options, budget - tokens,
                                            max_requests - len(batch) if max_requests else 0)
                for job in taken:
                    batch.append(job)
                    tokens += job.tokens
                if taken:
                    continue
                left = deadline - time.perf_counter()
                if left <= 0 or self._stopping or self._blocked(first.options, budget - tokens):
                    break
                self._cond.wait(left)
        for job in batch:
            self._dequeued(job)
        return batch

    def _take_matching(self, options: tuple, room: int, max_n: int) -> list[Job]:
        """Ready jobs with these options that fit in `room` tokens, oldest first (called under the lock)."""
        taken, keep = [], deque()
        while self._ready:
            job = self._ready.popleft()
            if job.cancelled:
                self._dequeued(job)
            elif job.options == options and job.tokens <= room and (not max_n or len(taken) < max_n):
                taken.append(job)
                room -= job.tokens
            else:
                keep.append(job)
        self._ready = keep
        return taken

    def _blocked(self, options: tuple, room: int) -> bool:
        """A job is waiting that this batch cannot take: run now rather than make it wait."""
        return any(not j.cancelled and (j.options != options or j.tokens > room) for j in self._ready)

    def _run(self, batch: list[Job]) -> None:
        batch = [j for j in batch if not j.cancelled]
        if not batch:
            return
        precision, normalize, dimensions = batch[0].options
        encoding = TokenizedTexts.concat([j.encoding for j in batch])
        tokens = encoding.tokens
        t0 = time.perf_counter()
        try:
            out = self.embedder.embed(encoding, precision=precision, normalize=normalize, dimensions=dimensions)
        except Exception as exc:  # noqa: BLE001 (every request of the batch gets the error; serving goes on)
            log.exception("embedding a batch of %d requests failed", len(batch))
            for job in batch:
                _answer(job, exc=exc)
            return
        secs = time.perf_counter() - t0
        if self.metrics is not None:
            self.metrics.observe_batch(tokens, len(batch), len(encoding), secs)
        start = 0
        for job in batch:
            n = len(job.texts)
            _answer(job, EmbedResult(out[start:start + n], job.tokens))
            start += n
