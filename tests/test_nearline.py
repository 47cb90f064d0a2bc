"""The near-line worker (postembed_fast.nearline) against a real redis-server on a free loopback port.

Workers run in this process (one shared CPU Embedder) where the test is about what gets stored, and as
`python -m postembed_fast.nearline embed` subprocesses where the test kills, restarts or signals them."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest


redis = pytest.importorskip("redis", reason="redis-py is not installed (pip install 'postembed_fast[nearline]')")
REDIS_SERVER = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS_SERVER is None,
                                reason="redis-server is not installed (apt-get install redis-server)")

from postembed_fast.kernels.precision import TABLE  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "data", "posts.jsonl.gz")
with gzip.open(DATA, "rt", encoding="utf-8") as _f:
    POSTS = [json.loads(line) for line, _ in zip(_f, range(200))]
for _p in POSTS:  # real posts, cut short to keep the CPU time of these tests low
    _p["text"] = _p["text"][:300]


def make_worker(redis_server, embedder, stream_names, **kw):
    from postembed_fast.nearline.worker import Config, Worker

    cfg = Config(redis_url=redis_server.url, device="cpu", consumer=kw.pop("consumer", "t1"), batch_wait_ms=10,
                 idle_block_ms=50, **stream_names, **kw)
    return Worker(cfg, embedder=embedder)


def produce(r, stream, posts, start=0):
    for i, p in enumerate(posts):
        r.xadd(stream, {"id": f"p{start + i}", "text": p["text"], "created_ms": int(time.time() * 1000)})


def decode(h, precision):
    dt = TABLE[precision].numpy_dtype
    return np.frombuffer(h[b"vector"], dtype=dt.newbyteorder("<") if dt.itemsize > 1 else dt)


def expected(embedder, texts, precision):
    return embedder.embed(texts, precision=precision)


def assert_rows_match(got, want, precision):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    if precision == "float16":  # batch composition may move the last bit of a float
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=2e-3)
    elif precision in ("int8", "uint8"):
        assert np.abs(got.astype(np.int32) - want.astype(np.int32)).max() <= 1
        assert (got == want).mean() > 0.99
    else:
        assert (np.unpackbits(got.view(np.uint8), axis=-1) != np.unpackbits(want.view(np.uint8), axis=-1)).mean() < 0.01


def stored_rows(r, prefix, n, precision):
    return np.stack([decode(r.hgetall(f"{prefix}p{i}"), precision) for i in range(n)])


def wait_for(cond, timeout=60.0, what="condition", proc=None, poll=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"worker exited with {proc.returncode} while waiting for {what}")
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def spawn_worker(redis_server, stream_names, consumer, *extra, log_path=None):
    env = dict(os.environ, POSTEMBED_LOG_LEVEL="INFO")
    cmd = [sys.executable, "-m", "postembed_fast.nearline", "embed", "--redis", redis_server.url, "--device", "cpu",
           "--consumer", consumer, "--stream", stream_names["stream"], "--group", stream_names["group"], "--prefix",
           stream_names["prefix"], "--out-stream", stream_names["out_stream"], "--dead-stream",
           stream_names["dead_stream"], *extra]
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    # not the repo root as cwd: the tests use the installed package
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.path.dirname(__file__))


def group_consumers(r, stream_names):
    try:
        return {c["name"].decode() for c in r.xinfo_consumers(stream_names["stream"], stream_names["group"])}
    except redis.ResponseError:
        return set()


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["float16", "int8", "binary"])
def test_happy_path(redis_server, embedder, stream_names, precision):
    r = redis_server.client()
    posts = POSTS[:24]
    produce(r, stream_names["stream"], posts)
    w = make_worker(redis_server, embedder, stream_names, precision=precision, batch_max=10)
    assert w.run_until_idle() == 24
    want = expected(embedder, [p["text"] for p in posts], precision)
    assert_rows_match(stored_rows(r, stream_names["prefix"], 24, precision), want, precision)
    h = r.hgetall(f"{stream_names['prefix']}p3")
    assert h[b"model"].decode() == embedder.model_tag and int(h[b"dim"]) == embedder.dim
    assert h[b"precision"].decode() == precision and int(h[b"embedded_ms"]) >= int(h[b"created_ms"])
    assert len(h[b"vector"]) == TABLE[precision].row_bytes(embedder.dim)
    ranges = r.hgetall(f"{stream_names['prefix']}__ranges__:{embedder.model_tag}")
    np.testing.assert_array_equal(np.frombuffer(ranges[b"ranges"], "<f4").reshape(2, -1),
                                  embedder.quantization_ranges)
    out = r.xrange(stream_names["out_stream"])
    assert [f[b"id"].decode() for _, f in out] == [f"p{i}" for i in range(24)]
    assert out[3][1][b"vector"] == h[b"vector"]
    assert r.xpending(stream_names["stream"], stream_names["group"])["pending"] == 0


def test_poison_and_delete(redis_server, embedder, stream_names):
    r = redis_server.client()
    s = stream_names["stream"]
    produce(r, s, POSTS[:3])  # p0 p1 p2
    w = make_worker(redis_server, embedder, stream_names, precision="int8", max_text_chars=2000)
    w.run_until_idle()
    assert r.exists(f"{stream_names['prefix']}p1")
    r.xadd(s, {"id": "p1", "op": "delete"})
    r.xadd(s, {"id": "nt", "created_ms": 1})  # no text
    r.xadd(s, {"id": "bad", "text": b"caf\xc3\x28 \xff"})  # not UTF-8
    r.xadd(s, {"id": "big", "text": "x" * 2001})
    r.xadd(s, {"id": "dup", "text": "one text"})
    r.xadd(s, {"id": "dup", "text": "another text"})
    r.xadd(s, {"id": "same", "text": "same text"})
    r.xadd(s, {"id": "same", "text": "same text"})  # same id, same text: stored once, not poison
    r.xadd(s, {"text": "no id"})
    w.run_until_idle()
    assert not r.exists(f"{stream_names['prefix']}p1") and r.exists(f"{stream_names['prefix']}p0")
    dead = [(f.get(b"id", b"").decode(), f[b"reason"].decode()) for _, f in r.xrange(stream_names["dead_stream"])]
    reasons = {i: rs for i, rs in dead}
    assert reasons["nt"] == "no text"
    assert "not valid UTF-8" in reasons["bad"]
    assert "over 2000 characters" in reasons["big"]
    assert "repeated with different text" in reasons["dup"] and len([d for d in dead if d[0] == "dup"]) == 2
    assert reasons[""] == "no id"
    assert len(dead) == 6
    assert r.exists(f"{stream_names['prefix']}same") and not r.exists(f"{stream_names['prefix']}dup")
    ops = [(f[b"id"].decode(), f[b"op"].decode()) for _, f in r.xrange(stream_names["out_stream"])]
    assert ("p1", "delete") in ops and ops.count(("same", "upsert")) == 1
    assert r.xpending(s, stream_names["group"])["pending"] == 0  # everything acked, nothing retried forever


def test_redelivered_too_often_is_dead_lettered_and_metrics(redis_server, embedder, stream_names, free_port):
    from urllib.request import urlopen

    from postembed_fast.nearline.worker import Metrics

    r = redis_server.client()
    s, g = stream_names["stream"], stream_names["group"]
    r.xgroup_create(s, g, id="0", mkstream=True)
    eid = r.xadd(s, {"id": "crash", "text": "a post that kills its worker", "created_ms": 1})
    r.xadd(s, {"id": "fine", "text": "a post", "created_ms": int(time.time() * 1000)})
    r.xreadgroup(g, "ghost", {s: ">"}, count=1)
    for _ in range(5):  # five workers died on it
        r.xclaim(s, g, "ghost", 0, [eid])
    port = free_port()
    w = make_worker(redis_server, embedder, stream_names, precision="int8", claim_min_idle_ms=1)
    w.metrics = Metrics(port)
    w.run_until_idle()
    dead = r.xrange(stream_names["dead_stream"])
    assert len(dead) == 1 and dead[0][1][b"id"] == b"crash" and b"delivered 7 times" in dead[0][1][b"reason"]
    assert r.exists(f"{stream_names['prefix']}fine") and r.xpending(s, g)["pending"] == 0
    text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'postembed_nearline_entries_total{outcome="stored"} 1.0' in text
    assert 'postembed_nearline_entries_total{outcome="dead"} 1.0' in text
    assert "postembed_nearline_latency_seconds_count 1.0" in text


def test_trim_keeps_unacknowledged(redis_server, embedder, stream_names):
    from postembed_fast.nearline.worker import trim_stream

    r = redis_server.client()
    s, g = stream_names["stream"], stream_names["group"]
    ids = [r.xadd(s, {"id": f"p{i}", "text": "t"}) for i in range(50)]
    r.xgroup_create(s, g, id="0")
    read = r.xreadgroup(g, "dead", {s: ">"}, count=20)[0][1]  # 20 delivered, 30 not yet
    r.xack(s, g, *[i for i, _ in read[:10]])  # 10 acked, 10 pending
    assert trim_stream(r, s, maxlen=5, approximate=False) == 10
    assert [i for i, _ in r.xrange(s)] == ids[10:]  # every pending and undelivered entry kept
    r.xack(s, g, *[i for i, _ in read[10:]])
    rest = r.xreadgroup(g, "dead", {s: ">"})[0][1]  # entries 20..49 delivered: pending
    assert trim_stream(r, s, maxlen=5, approximate=False) == 10  # only the acked 10..19 may go
    r.xack(s, g, *[i for i, _ in rest])
    assert trim_stream(r, s, maxlen=5, approximate=False) == 25  # all acked: down to maxlen
    r.xadd(s, {"id": "new", "text": "t"})  # not delivered yet
    assert trim_stream(r, s, maxlen=0, approximate=False) == 5
    assert r.xlen(s) == 1
    # the worker's own trimming (approximate by default) never removes pending entries either
    w = make_worker(redis_server, embedder, stream_names, precision="binary", trim_maxlen=1, trim_interval_s=0,
                    trim_exact=True)
    w._trim()
    assert r.xlen(s) == 1


def test_killed_worker_then_restart(redis_server, embedder, stream_names, tmp_path):
    r = redis_server.client()
    n = 80
    produce(r, stream_names["stream"], POSTS[:n])
    # --dtype float32: the codes are compared with the float32 `embedder`'s
    a = spawn_worker(redis_server, stream_names, "wa", "--batch-max", "4", "--precision", "int8", "--dtype", "float32",
                     log_path=tmp_path / "a.log")
    wait_for(lambda: r.xlen(stream_names["out_stream"]) >= 8, what="some posts stored", proc=a, poll=0.005)
    a.kill()  # SIGKILL mid-run
    a.wait()
    done = r.xlen(stream_names["out_stream"])
    assert done < n, "the worker finished before it was killed"
    # another consumer takes over the dead one's pending entries (XAUTOCLAIM) and the rest
    b = spawn_worker(redis_server, stream_names, "wb", "--batch-max", "32", "--precision", "int8", "--dtype", "float32",
                     "--claim-min-idle-ms", "200",
                     "--claim-interval-s", "0.5", log_path=tmp_path / "b.log")
    try:
        wait_for(lambda: all(r.exists(f"{stream_names['prefix']}p{i}") for i in range(n)) and
                 r.xpending(stream_names["stream"], stream_names["group"])["pending"] == 0, what="all posts stored",
                 proc=b)
    finally:
        b.send_signal(signal.SIGTERM)
        assert b.wait(30) == 0
    want = expected(embedder, [p["text"] for p in POSTS[:n]], "int8")
    assert_rows_match(stored_rows(r, stream_names["prefix"], n, "int8"), want, "int8")
    assert r.xpending(stream_names["stream"], stream_names["group"])["pending"] == 0


def test_two_workers_share_a_group(redis_server, stream_names, tmp_path):
    r = redis_server.client()
    args = ("--batch-max", "4", "--batch-wait-ms", "5", "--precision", "binary")
    ws = [spawn_worker(redis_server, stream_names, c, *args, log_path=tmp_path / f"{c}.log") for c in ("w1", "w2")]
    try:
        r.xgroup_create(stream_names["stream"], stream_names["group"], id="0", mkstream=True)
    except redis.ResponseError:
        pass
    wait_for(lambda: group_consumers(r, stream_names) == {"w1", "w2"}, what="both workers reading")
    n = 40
    for i in range(n):
        produce(r, stream_names["stream"], [POSTS[i]], start=i)
        time.sleep(0.01)
    wait_for(lambda: r.xlen(stream_names["out_stream"]) >= n and
             r.xpending(stream_names["stream"], stream_names["group"])["pending"] == 0, what="all posts stored")
    for w in ws:
        w.send_signal(signal.SIGTERM)
    assert [w.wait(30) for w in ws] == [0, 0]
    out = [(f[b"id"].decode(), f[b"consumer"].decode()) for _, f in r.xrange(stream_names["out_stream"])]
    ids = [i for i, _ in out]
    assert sorted(ids) == sorted(f"p{i}" for i in range(n)), "a post embedded twice or missing"
    assert {c for _, c in out} == {"w1", "w2"}


class SlowEmbedder:
    """The real embedder, slower than --claim-min-idle-ms per batch (a worker on a loaded machine)."""

    def __init__(self, embedder, delay_s):
        self._embedder, self.delay_s = embedder, delay_s

    def __getattr__(self, name):
        return getattr(self._embedder, name)

    def embed(self, *a, **k):
        time.sleep(self.delay_s)
        return self._embedder.embed(*a, **k)


def test_a_slow_live_worker_keeps_its_entries(redis_server, embedder, stream_names):
    """A batch that takes 5x --claim-min-idle-ms is not taken over: the worker's heartbeat keeps its
    entries young, so the other worker's XAUTOCLAIM finds nothing and no post is embedded twice."""
    import threading

    r = redis_server.client()
    produce(r, stream_names["stream"], POSTS[:6])
    slow = make_worker(redis_server, SlowEmbedder(embedder, 2.5), stream_names, precision="int8", consumer="slow",
                       claim_min_idle_ms=500)
    fast = make_worker(redis_server, embedder, stream_names, precision="int8", consumer="fast",
                       claim_min_idle_ms=500, claim_interval_s=0.05)
    r.xgroup_create(stream_names["stream"], stream_names["group"], id="0")
    t = threading.Thread(target=slow.step, daemon=True)
    t.start()
    wait_for(lambda: r.xpending(stream_names["stream"], stream_names["group"])["pending"] == 6, 30, "the slow read")
    took = 0
    while t.is_alive():
        took += fast.step()
    t.join()
    assert took == 0 and slow.heartbeat.beats >= 3
    out = [(f[b"id"].decode(), f[b"consumer"].decode()) for _, f in r.xrange(stream_names["out_stream"])]
    assert out == [(f"p{i}", "slow") for i in range(6)]
    assert r.xpending(stream_names["stream"], stream_names["group"])["pending"] == 0


def test_killed_one_of_two_workers_the_other_takes_over(redis_server, embedder, stream_names, tmp_path):
    """The deployment for availability: two workers in one group with the default claim settings; one is
    SIGKILLed mid-run and not restarted; the other stores its pending entries and the rest, each once."""
    r = redis_server.client()
    args = ("--batch-max", "8", "--precision", "int8", "--dtype", "float32", "--threads", "1")  # as `embedder`
    a, b = (spawn_worker(redis_server, stream_names, c, *args, log_path=tmp_path / f"{c}.log") for c in ("wa", "wb"))
    try:
        wait_for(lambda: group_consumers(r, stream_names) == {"wa", "wb"}, what="both workers reading", proc=a)
        n = 80
        for i in range(n):
            produce(r, stream_names["stream"], [POSTS[i]], start=i)
            time.sleep(0.01)
            if i == 40:
                wait_for(lambda: any(f[b"consumer"] == b"wa" for _, f in r.xrange(stream_names["out_stream"])),
                         what="the first worker storing", proc=a, poll=0.005)
                a.kill()
                a.wait()
        wait_for(lambda: all(r.exists(f"{stream_names['prefix']}p{i}") for i in range(n)) and
                 r.xpending(stream_names["stream"], stream_names["group"])["pending"] == 0,
                 what="all posts stored", proc=b)
    finally:
        for w in (a, b):
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
                w.wait(30)
    want = expected(embedder, [p["text"] for p in POSTS[:n]], "int8")
    assert_rows_match(stored_rows(r, stream_names["prefix"], n, "int8"), want, "int8")
    out = [(f[b"id"].decode(), f[b"consumer"].decode()) for _, f in r.xrange(stream_names["out_stream"])]
    assert sorted({i for i, _ in out}) == sorted(f"p{i}" for i in range(n))
    assert {c for _, c in out} == {"wa", "wb"}


def test_redis_restart_and_sigterm(tmp_path, stream_names, start_redis):
    srv = start_redis(tmp_path, persistent=True)
    try:
        r = srv.client()
        n = 60
        produce(r, stream_names["stream"], POSTS[:30])
        w = spawn_worker(srv, stream_names, "wr", "--batch-max", "8", "--precision", "float16",
                         log_path=tmp_path / "w.log")
        wait_for(lambda: r.xlen(stream_names["out_stream"]) >= 30, what="first half stored", proc=w)
        srv.stop()
        time.sleep(1.0)  # the worker is retrying with backoff meanwhile
        assert w.poll() is None
        srv.start()
        r = srv.client()
        produce(r, stream_names["stream"], POSTS[30:n], start=30)
        wait_for(lambda: all(r.exists(f"{stream_names['prefix']}p{i}") for i in range(n)),
                 what="all stored after restart",
                 proc=w)
        log = (tmp_path / "w.log").read_text()
        assert "redis unavailable" in log and "redis is back" in log
        # SIGTERM while a batch is in flight: it is finished and acked, exit 0
        produce(r, stream_names["stream"], POSTS[n:n + 40], start=n)
        wait_for(lambda: r.xlen(stream_names["out_stream"]) > n, what="a new batch", proc=w)
        w.send_signal(signal.SIGTERM)
        assert w.wait(30) == 0
        assert r.xpending(stream_names["stream"], stream_names["group"])["pending"] == 0
        stored = {f[b"id"].decode() for _, f in r.xrange(stream_names["out_stream"])}
        assert {f"p{i}" for i in range(n)} <= stored
        # whatever was read was stored and acked; the rest is still in the stream for the next worker
        info = {g["name"].decode(): g for g in r.xinfo_groups(stream_names["stream"])}[stream_names["group"]]
        assert info["lag"] == n + 40 - len(stored)
    finally:
        srv.stop()


def test_older_entry_never_overwrites_a_newer_one(redis_server, embedder, stream_names):
    """Two versions of a post handled out of order (an edit racing its previous version on another
    worker, or a redelivery after a model switch): the older one is acked but changes nothing."""
    r = redis_server.client()
    s, prefix, key = stream_names["stream"], stream_names["prefix"], f"{stream_names['prefix']}p"
    v1, v2, v4 = (POSTS[i]["text"] for i in (0, 1, 2))
    e1 = r.xadd(s, {"id": "p", "text": v1, "created_ms": 1})
    e2 = r.xadd(s, {"id": "p", "text": v2, "created_ms": 2})
    e3 = r.xadd(s, {"id": "p", "op": "delete"})
    e4 = r.xadd(s, {"id": "p", "text": v4, "created_ms": 4})
    entry = {i.decode(): f for i, f in r.xrange(s)}
    w = make_worker(redis_server, embedder, stream_names, precision="int8")
    w._ensure_group()

    def handle(eid):
        w.process([(eid.decode(), entry[eid.decode()])])

    def out_ops():
        return [(f[b"op"].decode(), f[b"source_id"]) for _, f in r.xrange(stream_names["out_stream"])]

    handle(e2)  # the newer version is stored first ...
    handle(e1)  # ... then the older one arrives: refused
    h = r.hgetall(key)
    assert h[b"source_id"] == e2 and w.stale == 1
    assert_rows_match(decode(h, "int8")[None], expected(embedder, [v2], "int8"), "int8")
    assert out_ops() == [("upsert", e2)], "the stale version was announced to readers"
    handle(e2)  # the same entry again (a redelivery) is applied again: idempotent
    assert r.hget(key, "source_id") == e2 and w.stale == 1 and len(out_ops()) == 2
    handle(e3)  # delete
    assert not r.exists(key)
    handle(e2)  # an upsert older than the delete, arriving late, does not bring the post back
    assert not r.exists(key) and w.stale == 2
    handle(e4)  # a newer upsert re-creates it
    assert r.hget(key, "source_id") == e4
    handle(e3)  # a late delete older than that does not remove it
    assert r.hget(key, "source_id") == e4 and w.stale == 3
    assert [op for op, _ in out_ops()] == ["upsert", "upsert", "delete", "upsert"]
    assert r.ttl(f"{prefix}__deleted__:p") > 0  # tombstones expire (--tombstone-ttl)
    assert r.xpending(s, stream_names["group"])["pending"] == 0
