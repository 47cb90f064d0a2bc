"""Near-line embedding: embed every new post from a Redis stream within seconds, at least once.

    python -m postembed_fast.nearline embed --redis redis://127.0.0.1:6379/0 --stream posts \\
        --group embedders --consumer w1 --precision int8 --batch-max 256 --batch-wait-ms 50
    python -m postembed_fast.nearline index --redis redis://127.0.0.1:6379/0 --stream posts.embedded \\
        --snapshot DIR --port 8081      # the searchable index of the output stream: index_updater.py

Input: a Redis stream (default `posts`) of entries with fields `id` (post id), `text`, `created_ms`
(the producer's clock, ms since the epoch; the entry id's time is used when it is missing or not an
int), optional `lang`; an entry with `op=delete` (and `id`) removes the post.

Output, per post: a hash at `{prefix}{id}` (default `emb:p42`) with `vector` (raw bytes, row-major:
float16/float32 little-endian, int8/uint8 codes, or binary/ubinary packed bytes, exactly what
`Embedder.embed(texts, precision=...)` returns), `model` (Embedder.model_tag), `dim`, `precision`,
`created_ms`, `embedded_ms`, `source_id` (the input entry id), `lang` if given; optional TTL. The model's
quantization ranges (float32 little-endian [2, dim], row 0 min, row 1 max) are stored once per model
under `{prefix}__ranges__:{model tag}` (hash: `ranges`, `dim`, `model`). Every stored or deleted post
is also announced on the output stream (default `posts.embedded`): the hash's fields plus `id`,
`consumer`, and `op` (`upsert` or `delete`).

The worker loop (one consumer of a consumer group; several workers share a group):
  1. XREADGROUP a micro-batch: up to --batch-max entries, or what arrived within --batch-wait-ms of
     the first one.
  2. Check each entry; poison entries (no id, no text, text not valid UTF-8, text over
     --max-text-chars, an id repeated with different text in one batch, delivered more than
     --max-deliveries times) go to the dead-letter stream (default `posts.dead`) with a `reason`.
  3. One Embedder.embed() call for the batch (per post only if that call raises, to find the culprit).
  4. One MULTI/EXEC transaction: the hashes, the output-stream entries, the dead letters, and the XACK
     of every entry of the batch. The ack is in the same transaction as the store, so an entry is
     acked exactly when its outputs are stored (at-least-once; hash writes are idempotent; a
     transaction retried after its reply was lost can repeat an output-stream / dead-letter entry:
     readers dedupe on `source_id`). Each post's store is conditional (a Lua script, see store.STORE_LUA):
     an entry older than the one the stored hash came from, or than the post's last delete (a
     tombstone `{prefix}__deleted__:{id}` kept --tombstone-ttl seconds), is stale: acked, but nothing
     is written or announced, so a slow or redelivered worker never overwrites a newer version.
Recovery: at start the consumer first re-reads its own pending entries (a restart under the same
name), and at start and every --claim-interval-s (0.5) it XAUTOCLAIMs entries pending longer than
--claim-min-idle-ms (2,000) on any consumer (dead workers) and processes them. A live worker never
loses its entries that way, however slow its batch: a heartbeat thread re-claims them to itself
every claim-min-idle/3 while they are in flight (only those still its own), which keeps them young.
So the deployment for availability is two or more workers in one group (--threads set so they share
the cores): when one dies, the others store its pending entries within ~claim-min-idle + a batch. Redis unavailable: every
call is retried with exponential backoff (0.1 s .. 5 s) and a log line; an embedded batch is kept
in memory until its transaction succeeds. SIGTERM/SIGINT: the current batch is finished and acked,
exit 0 (if Redis stays down, it gives up after --stop-timeout-s; those entries stay pending and
are claimed by another worker).

Trimming (--trim-maxlen N): every --trim-interval-s the worker trims the input stream to about N
entries with XTRIM MINID, never past the oldest entry still pending or not yet delivered in ANY
consumer group of the stream (XINFO GROUPS / XPENDING): an unacknowledged entry is never trimmed,
and the stream may stay longer than N while consumers lag.

Heavy imports (redis, prometheus_client, the model) happen inside the functions that need them.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

from postembed_fast.cli_args import non_negative_int, positive_int
from postembed_fast.nearline import store
from postembed_fast.options import ModelOptions, add_model_args

log = logging.getLogger("postembed_fast.nearline")

PROG = "python -m postembed_fast.nearline"
_DEAD_FIELD_MAX_BYTES = 16384  # longer values are truncated in the dead-letter copy (the reason says so)


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config(ModelOptions):
    """The worker's settings; model, device, dtype, batch_tokens are ModelOptions' (keyword-only)."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    stream: str = "posts"
    group: str = "embedders"
    consumer: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    group_start_id: str = "0"  # where a group created by this worker starts: "0" = the whole stream
    precision: str = "int8"
    batch_max: int = 256
    batch_wait_ms: int = 50
    idle_block_ms: int = 1000  # longest XREADGROUP block while idle (how fast SIGTERM is noticed)
    prefix: str = "emb:"
    out_stream: str = "posts.embedded"
    out_maxlen: int = 0  # 0: the output stream is not trimmed; else MAXLEN ~ N on each XADD
    dead_stream: str = "posts.dead"
    ttl: int = 0  # seconds; 0: no expiry
    tombstone_ttl: int = store.DEFAULT_TOMBSTONE_TTL_S  # seconds a delete's tombstone refuses older upserts
    max_text_chars: int = 20000
    max_deliveries: int = 5
    # Failover: entries pending on a consumer for this long are taken over by the others (XAUTOCLAIM).
    # Safe to keep short: a live worker's heartbeat keeps the entries it is working on younger than this.
    claim_min_idle_ms: int = 2000
    claim_interval_s: float = 0.5
    trim_maxlen: int = 0  # 0: no trimming
    trim_interval_s: float = 10.0
    trim_exact: bool = False
    metrics_port: int = 0
    threads: int = 0  # torch/kernel threads of this worker; 0: torch's default (all cores)
    stop_timeout_s: float = 30.0
    backoff_min_s: float = 0.1
    backoff_max_s: float = 5.0

    @classmethod
    def from_args(cls, a) -> "Config":
        consumer = {"consumer": a.consumer} if a.consumer else {}  # else the HOST-PID default
        return super().from_args(
            a, redis_url=a.redis, stream=a.stream, group=a.group, group_start_id=a.group_start_id, **consumer,
            precision=a.precision, batch_max=a.batch_max, batch_wait_ms=a.batch_wait_ms, prefix=a.prefix,
            out_stream=a.out_stream, out_maxlen=a.out_maxlen, dead_stream=a.dead_stream, ttl=a.ttl,
            tombstone_ttl=a.tombstone_ttl,
            max_text_chars=a.max_text_chars, max_deliveries=a.max_deliveries,
            claim_min_idle_ms=a.claim_min_idle_ms, claim_interval_s=a.claim_interval_s,
            trim_maxlen=a.trim_maxlen, trim_interval_s=a.trim_interval_s, trim_exact=a.trim_exact,
            metrics_port=a.metrics_port, threads=a.threads, stop_timeout_s=a.stop_timeout_s)


def add_embed_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `nearline embed` (shared by `postembed-fast nearline embed`)."""
    from postembed_fast.kernels.precision import PRECISIONS

    d = Config()
    g = p.add_argument_group("redis")
    g.add_argument("--redis", default=d.redis_url, metavar="URL", help=f"Redis URL (default {d.redis_url})")
    g.add_argument("--stream", default=d.stream, help="input stream (default %(default)s)")
    g.add_argument("--group", default=d.group, help="consumer group (default %(default)s)")
    g.add_argument("--consumer", default=None, metavar="NAME",
                   help="consumer name, unique per worker; reuse it on restart (default HOST-PID)")
    g.add_argument("--group-start-id", default=d.group_start_id, metavar="ID",
                   help="where a group this worker creates starts: 0 = whole stream (default), $ = new entries")
    g.add_argument("--prefix", default=d.prefix, help="key prefix of the stored hashes (default %(default)s)")
    g.add_argument("--out-stream", default=d.out_stream, help="output stream (default %(default)s)")
    g.add_argument("--out-maxlen", type=non_negative_int, default=d.out_maxlen, metavar="N",
                   help="trim the output stream to ~N entries on each write (default 0: never)")
    g.add_argument("--dead-stream", default=d.dead_stream, help="dead-letter stream (default %(default)s)")
    g.add_argument("--ttl", type=non_negative_int, default=d.ttl, metavar="SECONDS",
                   help="expiry of the stored hashes (default 0: none)")
    g.add_argument("--tombstone-ttl", type=positive_int, default=d.tombstone_ttl, metavar="SECONDS",
                   help="how long a deleted post refuses older upserts that arrive late (default %(default)s)")
    w = p.add_argument_group("worker")
    w.add_argument("--precision", default=d.precision, choices=PRECISIONS, help="default %(default)s")
    w.add_argument("--batch-max", type=positive_int, default=d.batch_max, metavar="N",
                   help="entries per micro-batch (default %(default)s)")
    w.add_argument("--batch-wait-ms", type=non_negative_int, default=d.batch_wait_ms, metavar="MS",
                   help="how long a batch waits for more entries after its first (default %(default)s)")
    w.add_argument("--max-text-chars", type=positive_int, default=d.max_text_chars, metavar="N",
                   help="longer texts are dead-lettered (default %(default)s)")
    w.add_argument("--max-deliveries", type=positive_int, default=d.max_deliveries, metavar="N",
                   help="an entry delivered more often is dead-lettered (default %(default)s)")
    w.add_argument("--claim-min-idle-ms", type=positive_int, default=d.claim_min_idle_ms, metavar="MS",
                   help="claim entries pending this long on other consumers (default %(default)s)")
    w.add_argument("--claim-interval-s", type=float, default=d.claim_interval_s, metavar="S",
                   help="how often to look for such entries (default %(default)s)")
    w.add_argument("--trim-maxlen", type=non_negative_int, default=d.trim_maxlen, metavar="N",
                   help="trim the input stream to ~N entries, never past unacknowledged ones (default 0: never)")
    w.add_argument("--trim-interval-s", type=float, default=d.trim_interval_s, metavar="S",
                   help="how often to trim (default %(default)s)")
    w.add_argument("--trim-exact", action="store_true", help="exact XTRIM instead of ~ (slower)")
    w.add_argument("--threads", type=non_negative_int, default=d.threads, metavar="N",
                   help="compute threads of this worker (default 0: all cores); with several workers on one "
                        "machine give each its share, e.g. 1 each for 2 workers on 2 cores")
    w.add_argument("--metrics-port", type=non_negative_int, default=0, metavar="PORT",
                   help="serve Prometheus metrics on this port (default 0: off)")
    w.add_argument("--stop-timeout-s", type=float, default=d.stop_timeout_s, metavar="S",
                   help="on SIGTERM, how long to keep retrying the last batch's store (default %(default)s)")
    add_model_args(p)


def missing_extra() -> str | None:
    from postembed_fast.cli_args import missing_extra as missing

    return missing("nearline", "redis")


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------
class _Null:
    def labels(self, *a, **k):
        return self

    def inc(self, *a):
        pass

    def observe(self, *a):
        pass

    def set(self, *a):
        pass


class Metrics:
    """Prometheus metrics in their own registry (served with --metrics-port); no-ops without it."""

    def __init__(self, port: int = 0):
        self.registry = None
        if not port:
            self.entries = self.redis_errors = self.batch_size = self.pending = self.lag = _Null()
            self.latency = self.embed_seconds = _Null()
            return
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            start_http_server,
        )

        r = self.registry = CollectorRegistry()
        self.entries = Counter("postembed_nearline_entries", "input entries handled, by outcome "
                               "(stored, deleted, dead, stale)", ["outcome"], registry=r)
        self.redis_errors = Counter("postembed_nearline_redis_errors", "failed Redis calls (retried)", registry=r)
        self.batch_size = Histogram("postembed_nearline_batch_entries", "entries per micro-batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=r)
        self.pending = Gauge("postembed_nearline_pending", "entries delivered to the group and not yet acked",
                             registry=r)
        self.lag = Gauge("postembed_nearline_lag", "entries in the stream not yet delivered to the group",
                         registry=r)
        self.latency = Histogram("postembed_nearline_latency_seconds", "created_ms to stored (embedded_ms)",
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600), registry=r)
        self.embed_seconds = Histogram("postembed_nearline_embed_seconds", "Embedder.embed time per batch",
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                       registry=r)
        start_http_server(port, registry=r)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def safe_trim_id(r, stream: str):
    """The oldest entry id any consumer group of `stream` still needs (pending, or not yet delivered),
    or None when the stream has no groups. Entries older than it are acknowledged by every group."""
    oldest = None
    for g in r.xinfo_groups(stream):
        name = g["name"]
        need = store.id_tuple(g["last-delivered-id"])
        need = (need[0], need[1] + 1)  # the first entry not yet delivered
        if g.get("pending"):
            summary = r.xpending(stream, name)
            if summary.get("min"):
                need = min(need, store.id_tuple(summary["min"]))
        oldest = need if oldest is None else min(oldest, need)
    return oldest


def trim_stream(r, stream: str, maxlen: int, approximate: bool = True, step: int = 10000) -> int:
    """Trim `stream` toward `maxlen` entries without removing any entry a consumer group has not acked:
    XTRIM MINID at the older of (the id MAXLEN would cut at, the oldest id any group still needs), so
    both hold (approximate MINID only ever removes less). Removes at most `step` entries per call.
    Returns the number of entries removed."""
    length = r.xlen(stream)
    excess = length - maxlen
    if excess <= 0:
        return 0
    excess = min(excess, step)
    rows = r.xrange(stream, "-", "+", count=excess + 1)  # rows[excess] is the first entry to keep
    if not rows:
        return 0
    if len(rows) > excess:
        cut = store.id_tuple(rows[excess][0])
    else:  # maxlen 0: everything may go
        last = store.id_tuple(rows[-1][0])
        cut = (last[0], last[1] + 1)
    need = safe_trim_id(r, stream)
    if need is not None:
        cut = min(cut, need)
    return r.xtrim(stream, minid=f"{cut[0]}-{cut[1]}", approximate=approximate)




class _Stop(Exception):
    """Raised out of a Redis retry loop when the worker is stopping and gave up on Redis."""


# ---------------------------------------------------------------------------------------------
# the worker
# ---------------------------------------------------------------------------------------------
# Refresh the idle time of entries this consumer still holds, and only those: XCLAIM to oneself
# resets an entry's idle time (JUSTID: without counting a delivery), and XPENDING ... consumer first
# checks it is still ours, so an entry another worker took over is never taken back. Atomic (a script).
# KEYS: stream. ARGV: group, consumer, entry ids. Returns how many were refreshed.
_HEARTBEAT_LUA = """
local n = 0
for i = 3, #ARGV do
  local mine = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #mine > 0 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    n = n + 1
  end
end
return n
"""


class _Heartbeat:
    """While a batch is in flight, a thread keeps its entries' idle time below --claim-min-idle-ms, so
    the XAUTOCLAIM of the other workers takes over only the entries of a worker that stopped (crashed,
    hung, lost its network), however long a live one takes over a batch."""

    def __init__(self, r, cfg: "Config"):
        self._script = r.register_script(_HEARTBEAT_LUA)
        self._cfg = cfg
        self._ids: list[str] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self.beats = 0
        self._thread = threading.Thread(target=self._main, name="postembed-heartbeat", daemon=True)
        self._thread.start()

    @property
    def interval_s(self) -> float:
        return max(0.05, self._cfg.claim_min_idle_ms / 3000)

    def hold(self, ids: list[str]) -> None:
        with self._lock:
            self._ids = list(ids)

    def release(self) -> None:
        with self._lock:
            self._ids = []

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    def _main(self) -> None:
        while not self._closed:
            self._wake.wait(self.interval_s)
            with self._lock:
                ids = list(self._ids)
            if not ids or self._closed:
                continue
            try:
                self._script(keys=[self._cfg.stream], args=[self._cfg.group, self._cfg.consumer, *ids])
                self.beats += 1
            except Exception as exc:  # noqa: BLE001 -- Redis away: the main loop retries and logs; next beat
                log.debug("heartbeat failed: %s", exc)


class Worker:
    def __init__(self, cfg: Config, embedder=None, client=None, metrics: Metrics | None = None):
        import redis

        from postembed_fast.kernels.precision import precision_spec

        self.cfg = cfg
        self.redis_mod = redis
        self.spec = precision_spec(cfg.precision)
        if embedder is None:
            from postembed_fast import Embedder

            embedder = Embedder(cfg.model, device=cfg.device, dtype=cfg.dtype)
        self.embedder = embedder
        self.model_tag = embedder.model_tag
        self.dim = embedder.dim
        self.ranges = embedder.quantization_ranges
        if self.spec.needs_ranges and self.ranges is None:
            raise ValueError(f"precision {cfg.precision} needs quantization ranges and model {self.model_tag} has "
                             "none: use float16/binary, or a model with shipped ranges")
        block_s = max(cfg.idle_block_ms, cfg.batch_wait_ms) / 1000
        self.r = client or redis.Redis.from_url(cfg.redis_url, socket_timeout=block_s + 10,
                                                socket_connect_timeout=2, socket_keepalive=True,
                                                health_check_interval=30)
        self.metrics = metrics or Metrics(0)
        self._store_script = self.r.register_script(store.STORE_LUA)  # EVALSHA; loaded before each MULTI
        self.heartbeat = _Heartbeat(self.r, cfg)
        self.stale = 0  # entries refused as older than the stored version (see store.STORE_LUA)
        self.stop_event = threading.Event()
        self._stop_deadline = None
        self._own_pending_cursor = "0"  # re-read our own pending entries first (a restart)
        self._claim_cursor = "0-0"
        self._next_claim = 0.0  # claim at start
        self._next_trim = time.monotonic() + cfg.trim_interval_s
        self._next_stats = 0.0
        self._ranges_written = False
        self._group_ready = False
        # TEST HOOK, for bench/nearline.py --crash only (unset in production: no effect): with
        # POSTEMBED_TEST_SIGKILL_BEFORE_EXEC=N (or ..._AFTER_EXEC=N) the worker SIGKILLs itself right before
        # (after) the MULTI/EXEC store+ack of the first batch that brings the entries it has read to >= N.
        self._test_kill = {w: int(os.environ[f"POSTEMBED_TEST_SIGKILL_{w}_EXEC"]) for w in ("BEFORE", "AFTER")
                           if os.environ.get(f"POSTEMBED_TEST_SIGKILL_{w}_EXEC")}
        self._test_entries_read = 0

    # ---- lifecycle ------------------------------------------------------------------------
    def stop(self) -> None:
        """Finish the current batch and return from run() (what SIGTERM does)."""
        if not self.stop_event.is_set():
            self._stop_deadline = time.monotonic() + self.cfg.stop_timeout_s
            self.stop_event.set()

    def run(self) -> int:
        log.info("worker %s: stream %s group %s, model %s on %s in %s, precision %s, batch <= %d / %d ms",
                 self.cfg.consumer, self.cfg.stream, self.cfg.group, self.model_tag, self.embedder.device,
                 str(self.embedder.dtype).removeprefix("torch."), self.cfg.precision,
                 self.cfg.batch_max, self.cfg.batch_wait_ms)
        try:
            while not self.stop_event.is_set():
                self.step()
        except _Stop:
            log.warning("stopping with Redis unavailable: entries read and not stored stay pending (another "
                        "worker, or this one restarted under the same name, processes them)")
        finally:
            self.heartbeat.close()
        log.info("worker %s stopped", self.cfg.consumer)
        return 0

    def step(self) -> int:
        """One round: housekeeping when due, then read, embed, store and ack one micro-batch.
        Returns the number of entries handled."""
        self._ensure_group()
        now = time.monotonic()
        if now >= self._next_stats:
            self._stats()
        if self.cfg.trim_maxlen and now >= self._next_trim:
            self._next_trim = now + self.cfg.trim_interval_s
            self._trim()
        if now >= self._next_claim:
            entries = self._claim()
            if entries:
                return self.process(entries, check_deliveries=True)
        if self._own_pending_cursor is not None:
            entries = self._read_own_pending()
            if entries:
                return self.process(entries, check_deliveries=True)
        entries = self._read_new()
        return self.process(entries) if entries else 0

    def run_until_idle(self, max_rounds: int = 1000) -> int:
        """Process until a read finds nothing (tests, backfills). Returns entries handled."""
        total = 0
        for _ in range(max_rounds):
            n = self.step()
            total += n
            if n == 0 and self._own_pending_cursor is None:
                break
        return total

    # ---- Redis with retries ------------------------------------------------------------
    def _call(self, what: str, fn, *, must_finish: bool = False):
        """fn() retried with exponential backoff while Redis is unreachable or loading. While stopping,
        gives up (raises _Stop) at once, or after --stop-timeout-s when must_finish (a batch to store)."""
        redis = self.redis_mod
        delay, failures = self.cfg.backoff_min_s, 0
        while True:
            try:
                out = fn()
                if failures:
                    log.info("redis is back (%s succeeded after %d failed attempts)", what, failures)
                return out
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                failures += 1
                self.metrics.redis_errors.inc()
                self._ranges_written = False  # a restarted Redis may have lost it
                if self.stop_event.is_set() and (not must_finish or time.monotonic() >= self._stop_deadline):
                    raise _Stop() from exc
                log.warning("redis unavailable during %s (%s: %s); retry %d in %.1f s", what,
                            type(exc).__name__, exc, failures, delay)
                if must_finish:  # a stored-but-unacked batch is not abandoned early
                    time.sleep(delay)
                else:
                    self.stop_event.wait(delay)
                delay = min(delay * 2, self.cfg.backoff_max_s)
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                log.warning("consumer group %s is gone (Redis lost its data?): recreating it", self.cfg.group)
                self._group_ready = False
                self._ensure_group()

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        cfg = self.cfg

        def create():
            try:
                self.r.xgroup_create(cfg.stream, cfg.group, id=cfg.group_start_id, mkstream=True)
                log.info("created consumer group %s on %s at %s", cfg.group, cfg.stream, cfg.group_start_id)
            except self.redis_mod.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

        self._call("XGROUP CREATE", create)
        self._group_ready = True

    # ---- reading -----------------------------------------------------------------------
    def _xreadgroup(self, start_id: str, count: int, block: int | None):
        cfg = self.cfg
        resp = self._call("XREADGROUP", lambda: self.r.xreadgroup(cfg.group, cfg.consumer, {cfg.stream: start_id},
                                                                  count=count, block=block))
        if not resp:
            return []
        # RESP2: [[stream, [(id, fields), ...]]]; RESP3: {stream: [[(id, fields), ...]]}
        if isinstance(resp, dict):
            rows = next(iter(resp.values()))
            rows = rows[0] if rows and isinstance(rows[0], list) else rows
        else:
            rows = resp[0][1]
        return [(store.as_str(i), f) for i, f in rows]

    def _read_own_pending(self):
        rows = self._xreadgroup(self._own_pending_cursor, self.cfg.batch_max, None)
        if not rows:
            self._own_pending_cursor = None
            return []
        log.info("re-reading %d entries pending on this consumer since before a restart", len(rows))
        self._own_pending_cursor = rows[-1][0]
        return rows

    def _read_new(self):
        cfg = self.cfg
        entries = self._xreadgroup(">", cfg.batch_max, cfg.idle_block_ms)
        if not entries:
            return []
        deadline = time.monotonic() + cfg.batch_wait_ms / 1000
        while len(entries) < cfg.batch_max and not self.stop_event.is_set():
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            more = self._xreadgroup(">", cfg.batch_max - len(entries), left_ms)
            if not more:
                break
            entries += more
        return entries

    def _claim(self):
        cfg = self.cfg
        resp = self._call("XAUTOCLAIM", lambda: self.r.xautoclaim(cfg.stream, cfg.group, cfg.consumer,
                                                                  cfg.claim_min_idle_ms, self._claim_cursor,
                                                                  count=cfg.batch_max))
        cursor, rows = store.as_str(resp[0]), resp[1]
        deleted = [store.as_str(i) for i in resp[2]] if len(resp) > 2 else []
        if deleted:  # Redis 7 drops these from the PEL itself; they can no longer be processed
            log.warning("%d pending entries were deleted from %s before being processed (trimmed by another "
                        "process?): %s", len(deleted), cfg.stream, ", ".join(deleted[:10]))
        if cursor == "0-0":
            self._next_claim = time.monotonic() + cfg.claim_interval_s
        self._claim_cursor = cursor
        if rows:
            log.info("claimed %d entries pending on other consumers for >= %d ms", len(rows), cfg.claim_min_idle_ms)
        return [(store.as_str(i), f) for i, f in rows]

    def _delivery_counts(self, ids: list[str]) -> dict[str, int]:
        cfg = self.cfg
        rows = self._call("XPENDING", lambda: self.r.xpending_range(cfg.stream, cfg.group, min=ids[0], max=ids[-1],
                                                                    count=len(ids) + 16,
                                                                    consumername=cfg.consumer))
        return {store.as_str(r["message_id"]): int(r["times_delivered"]) for r in rows}

    # ---- one batch ---------------------------------------------------------------------
    def _check(self, entry_id: str, fields) -> tuple[str | None, dict]:
        """(reason it is poison or None, parsed fields)."""
        if not fields:
            return "entry deleted from the stream before it was processed", {}
        f = {store.as_str(k): v for k, v in fields.items()}
        pid = f.get("id")
        try:
            pid = pid.decode("utf-8") if isinstance(pid, bytes) else pid
        except UnicodeDecodeError:
            return "id is not valid UTF-8", f
        if pid is None or not str(pid).strip():
            return "no id", f
        pid = str(pid)
        op = store.as_str(f.get("op", b"upsert")).strip().lower() or "upsert"
        out = {"id": pid, "op": op}
        if "lang" in f:
            out["lang"] = f["lang"]
        try:
            out["created_ms"] = int(f["created_ms"])
        except (KeyError, ValueError, TypeError):
            out["created_ms"] = store.id_tuple(entry_id)[0]
        if op == "delete":
            return None, out
        if op not in ("upsert", "create", "update"):
            return f"unknown op {op!r}", f
        raw = f.get("text")
        if raw is None or (isinstance(raw, bytes) and not raw.strip()):
            return "no text", f
        if isinstance(raw, bytes):
            if len(raw) > 4 * self.cfg.max_text_chars:
                return f"text over {self.cfg.max_text_chars} characters ({len(raw)} bytes)", f
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return f"text is not valid UTF-8 ({exc.reason} at byte {exc.start})", f
        else:
            text = str(raw)
        if not text.strip():
            return "no text", f
        if len(text) > self.cfg.max_text_chars:
            return f"text over {self.cfg.max_text_chars} characters ({len(text)})", f
        out["text"] = text
        return None, out

    def _embed(self, texts: list[str]):
        """One embed() call; if it raises, per text, so only the culprits fail. -> (rows, {index: error})."""
        import numpy as np

        p = self.cfg.precision
        t0 = time.perf_counter()
        try:
            out = self.embedder.embed(texts, precision=p, batch_tokens=self.cfg.batch_tokens)
            return out, {}
        except Exception as exc:  # noqa: BLE001 -- find which text, keep the rest
            log.warning("embed() of a batch of %d failed (%s: %s); retrying post by post", len(texts),
                        type(exc).__name__, exc)
        finally:
            self.metrics.embed_seconds.observe(time.perf_counter() - t0)
        rows, errors = [], {}
        for i, t in enumerate(texts):
            try:
                rows.append(self.embedder.embed([t], precision=p, batch_tokens=self.cfg.batch_tokens)[0])
            except Exception as exc:  # noqa: BLE001
                errors[i] = f"embed failed: {type(exc).__name__}: {exc}"
                rows.append(None)
        width = self.spec.columns(self.dim)
        out = np.zeros((len(texts), width), dtype=self.spec.numpy_dtype)
        for i, row in enumerate(rows):
            if row is not None:
                out[i] = row
        return out, errors

    def process(self, entries, check_deliveries: bool = False) -> int:
        """Embed, store and ack one batch of (entry id, fields). Returns len(entries)."""
        if not entries:
            return 0
        self.heartbeat.hold([e for e, _ in entries])  # not taken over while this worker is alive
        try:
            return self._process(entries, check_deliveries)
        finally:
            self.heartbeat.release()

    def _process(self, entries, check_deliveries: bool) -> int:
        cfg = self.cfg
        self._test_entries_read += len(entries)  # for the test hook only (see __init__)
        self.metrics.batch_size.observe(len(entries))
        dead: list[tuple[str, dict, str]] = []
        by_post: dict[str, list[tuple[str, dict]]] = {}
        counts = self._delivery_counts([e for e, _ in entries]) if check_deliveries else {}
        for entry_id, fields in entries:
            n = counts.get(entry_id, 0)
            if n > cfg.max_deliveries:
                dead.append((entry_id, fields or {}, f"delivered {n} times without being stored"))
                continue
            reason, parsed = self._check(entry_id, fields)
            if reason:
                dead.append((entry_id, fields or {}, reason))
            else:
                by_post.setdefault(parsed["id"], []).append((entry_id, parsed))
        upserts, deletes = [], []  # the last entry of each post decides what happens to it
        for pid, items in by_post.items():
            texts = {p["text"] for _, p in items if p["op"] != "delete"}
            if len(texts) > 1:
                for entry_id, p in items:
                    dead.append((entry_id, entries_fields(entries, entry_id),
                                 f"id {pid!r} repeated with different text in one batch"))
                continue
            last_id, last = items[-1]
            (deletes if last["op"] == "delete" else upserts).append((last_id, last))
        vectors, errors = (self._embed([p["text"] for _, p in upserts]) if upserts else (None, {}))
        for i in sorted(errors):
            entry_id, p = upserts[i]
            dead.append((entry_id, entries_fields(entries, entry_id), errors[i]))
        stored = [(e, p, vectors[i]) for i, (e, p) in enumerate(upserts) if i not in errors]
        ack_ids = [e for e, _ in entries]
        embedded_ms, stale = self._store(stored, deletes, dead, ack_ids)
        for _, p, _ in stored:
            self.metrics.latency.observe(max(0, embedded_ms - p["created_ms"]) / 1000)
        self.metrics.entries.labels("stored").inc(len(stored) - stale["upsert"])
        self.metrics.entries.labels("deleted").inc(len(deletes) - stale["delete"])
        self.metrics.entries.labels("dead").inc(len(dead))
        if dead:
            log.warning("%d poison entries sent to %s: %s", len(dead), cfg.dead_stream,
                        "; ".join(f"{e}: {r}" for e, _, r in dead[:5]))
        return len(entries)

    def _store(self, stored, deletes, dead, ack_ids) -> tuple[int, dict]:
        """One MULTI/EXEC: the conditional stores, dead letters and the XACK. -> (embedded_ms, stale
        entries per op: {"upsert": n, "delete": n})."""
        cfg, tag, dim = self.cfg, self.model_tag, str(self.dim)
        embedded_ms = int(time.time() * 1000)

        def transaction():
            pipe = self.r.pipeline(transaction=True)
            if self.ranges is not None and not self._ranges_written:
                pipe.hset(store.ranges_key(cfg.prefix, tag), mapping=store.ranges_mapping(self.ranges, dim, tag))
            script_at = []  # (op, position) of the conditional stores in the transaction's replies

            def put(op, entry_id, pid, h, out_only):
                script_at.append((op, len(pipe)))
                items = [x for kv in h.items() for x in kv]
                self._store_script(keys=[store.hash_key(cfg.prefix, pid), store.tombstone_key(cfg.prefix, pid), cfg.out_stream],
                                   args=[op, entry_id, cfg.ttl, cfg.tombstone_ttl, cfg.out_maxlen, len(items), *items,
                                         *[x for kv in out_only.items() for x in kv]],
                                   client=pipe)

            for entry_id, p, vec in stored:
                h = {"vector": store.encode_vector(vec, cfg.precision), "model": tag, "dim": dim,
                     "precision": cfg.precision, "created_ms": p["created_ms"], "embedded_ms": embedded_ms,
                     "source_id": entry_id}
                if "lang" in p:
                    h["lang"] = p["lang"]
                put("upsert", entry_id, p["id"], h, {"id": p["id"], "op": "upsert", "consumer": cfg.consumer})
            for entry_id, p in deletes:
                put("delete", entry_id, p["id"], {}, {"id": p["id"], "op": "delete", "source_id": entry_id,
                                                        "created_ms": p["created_ms"], "embedded_ms": embedded_ms,
                                                        "consumer": cfg.consumer})
            for entry_id, fields, reason in dead:
                pipe.xadd(cfg.dead_stream, _dead_letter(entry_id, fields, reason, cfg))
            pipe.xack(cfg.stream, cfg.group, *ack_ids)
            replies = pipe.execute()
            return {op: sum(1 for o, i in script_at if o == op and not replies[i]) for op in ("upsert", "delete")}

        self._test_hook("BEFORE")
        stale = self._call("MULTI/EXEC store+ack", transaction, must_finish=True)
        self._test_hook("AFTER")
        self._ranges_written = self.ranges is not None
        n = stale["upsert"] + stale["delete"]
        if n:
            self.stale += n
            self.metrics.entries.labels("stale").inc(n)
            log.info("%d entries older than the stored version of their post were not applied", n)
        return embedded_ms, stale

    def _test_hook(self, when: str) -> None:
        """TEST HOOK (bench/nearline.py --crash): SIGKILL this process at the configured point; see __init__."""
        n = self._test_kill.get(when)
        if n is not None and self._test_entries_read >= n:
            log.warning("test hook: SIGKILL %s EXEC after %d entries read", when.lower(), self._test_entries_read)
            for h in logging.getLogger().handlers:
                h.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    # ---- housekeeping ------------------------------------------------------------------
    def _stats(self) -> None:
        self._next_stats = time.monotonic() + 5.0
        if self.metrics.registry is None:
            return
        try:
            for g in self.r.xinfo_groups(self.cfg.stream):
                if store.as_str(g["name"]) == self.cfg.group:
                    self.metrics.pending.set(g.get("pending") or 0)
                    if g.get("lag") is not None:
                        self.metrics.lag.set(g["lag"])
        except self.redis_mod.RedisError:
            pass  # the next real call reports and retries

    def _trim(self) -> None:
        try:
            n = trim_stream(self.r, self.cfg.stream, self.cfg.trim_maxlen, approximate=not self.cfg.trim_exact)
            if n:
                log.debug("trimmed %d entries from %s", n, self.cfg.stream)
        except self.redis_mod.RedisError as exc:
            log.warning("trim of %s skipped: %s", self.cfg.stream, exc)


def entries_fields(entries, entry_id):
    for e, f in entries:
        if e == entry_id:
            return f or {}
    return {}


def _dead_letter(entry_id: str, fields: dict, reason: str, cfg: Config) -> dict:
    out = {"reason": reason, "source_id": entry_id, "source_stream": cfg.stream, "group": cfg.group,
           "consumer": cfg.consumer, "dead_ms": int(time.time() * 1000)}
    truncated = []
    for k, v in (fields or {}).items():
        k = store.as_str(k)
        if k in out:
            k = "field_" + k
        if isinstance(v, bytes) and len(v) > _DEAD_FIELD_MAX_BYTES:
            v = v[:_DEAD_FIELD_MAX_BYTES]
            truncated.append(k)
        out[k] = v
    if truncated:
        out["truncated"] = ",".join(truncated)
    return out


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def run_embed(cfg: Config) -> int:
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)  # the C++ kernels take torch's thread count too
    worker = Worker(cfg, metrics=Metrics(cfg.metrics_port))

    def on_signal(signum, _frame):
        log.info("%s: finishing the current batch, then exiting", signal.Signals(signum).name)
        worker.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    return worker.run()


def run_from_args(args, prog: str = PROG) -> int:
    """`embed` from parsed add_embed_arguments() flags (this module's main and `postembed-fast nearline embed`).
    Exit codes: 0 stopped by SIGTERM/SIGINT; 2 missing extra or a bad setting (e.g. int8 for a model
    without ranges)."""
    problem = missing_extra()
    if problem:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=os.environ.get("POSTEMBED_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_embed(Config.from_args(args))
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
