"""Prometheus metrics of one server (its own registry, so several apps in one process never clash):
RequestMetrics for every app on the HTTP shell (serve/http.py), Metrics adds the embedding server's."""
from __future__ import annotations

import threading
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144)
_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class RequestMetrics:
    """What the HTTP shell records of every route: requests by status, latency."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("postembed_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("postembed_request_duration_seconds", "HTTP request latency by endpoint",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Metrics(RequestMetrics):
    """The embedding server's: the shell's request metrics, the batcher's queue and batches, tokens/s."""

    def __init__(self):
        super().__init__()
        r = self.registry
        self.queue_depth = Gauge("postembed_queue_depth", "requests waiting for tokenization or the model",
                                 registry=r)
        self.in_flight = Gauge("postembed_requests_in_flight", "requests admitted and not yet answered",
                               registry=r)
        self.batch_tokens = Histogram("postembed_batch_tokens", "tokens per model batch",
                                      buckets=_TOKEN_BUCKETS, registry=r)
        self.batch_requests = Histogram("postembed_batch_requests", "requests merged into one model batch",
                                        buckets=_COUNT_BUCKETS, registry=r)
        self.batch_inputs = Histogram("postembed_batch_inputs", "texts per model batch",
                                      buckets=_COUNT_BUCKETS, registry=r)
        self.tokens = Counter("postembed_tokens", "tokens embedded (rate() gives tokens/s)", registry=r)
        self.tokens_per_second = Gauge("postembed_tokens_per_second",
                                       "tokens embedded per second over the last 10 s window", registry=r)
        self.tokenize_seconds = Counter("postembed_tokenization_seconds",
                                        "time spent tokenizing requests (the tokenizer thread)", registry=r)
        self.model_seconds = Counter("postembed_model_seconds",
                                     "time spent in Embedder.embed (the model thread)", registry=r)
        self.dropped = Counter("postembed_dropped_requests",
                               "requests whose client disconnected before the answer", registry=r)
        self.ready = Gauge("postembed_ready", "1 once the model is loaded and warmed, 0 otherwise", registry=r)
        self._lock = threading.Lock()
        self._window_start, self._window_tokens = time.monotonic(), 0

    def observe_batch(self, tokens: int, requests: int, inputs: int, seconds: float) -> None:
        self.batch_tokens.observe(tokens)
        self.batch_requests.observe(requests)
        self.batch_inputs.observe(inputs)
        self.tokens.inc(tokens)
        self.model_seconds.inc(seconds)
        with self._lock:
            self._window_tokens += tokens
            now = time.monotonic()
            if now - self._window_start >= 10.0:
                self.tokens_per_second.set(self._window_tokens / (now - self._window_start))
                self._window_start, self._window_tokens = now, 0
