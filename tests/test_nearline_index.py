"""The near-line index updater (postembed_fast.nearline.index_updater) against a real redis-server on a free loopback
port, fed by the real embed worker, searched over real HTTP on loopback.

In-process (one shared CPU Embedder) where the test is about what the index holds; as
`python -m postembed_fast.nearline embed|index` subprocesses for the end-to-end test (XADD -> /search,
SIGTERM -> snapshot -> restart)."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from urllib.error import HTTPError
from urllib.parse import urlencode
from urllib.request import Request, urlopen

import numpy as np
import pytest

redis = pytest.importorskip("redis", reason="redis-py is not installed (pip install 'postembed_fast[nearline]')")
pytest.importorskip("starlette", reason="starlette is not installed (pip install 'postembed_fast[serve]')")
uvicorn = pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install 'postembed_fast[serve]')")
REDIS_SERVER = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS_SERVER is None,
                                reason="redis-server is not installed (apt-get install redis-server)")

from postembed_fast.nearline.index_updater import IndexConfig, IndexUpdater, create_app  # noqa: E402
from postembed_fast.nearline.store import decode_vector, post_key  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "data", "posts.jsonl.gz")
with gzip.open(DATA, "rt", encoding="utf-8") as _f:
    POSTS = [json.loads(line) for line, _ in zip(_f, range(60))]
for _p in POSTS:  # real posts, cut short to keep the CPU time low; searched by their own titles
    _p["text"] = _p["text"][:300]


def produce(r, stream, idx):
    for i in idx:
        r.xadd(stream, {"id": f"p{i}", "text": POSTS[i]["text"], "created_ms": int(time.time() * 1000)})


def embed_all(redis_server, embedder, stream_names, precision="int8"):
    """Run the real embed worker (in-process) until the input stream is drained."""
    from postembed_fast.nearline.worker import Config, Worker

    cfg = Config(redis_url=redis_server.url, device="cpu", consumer="t1", batch_wait_ms=10, idle_block_ms=50,
                 precision=precision, **stream_names)
    return Worker(cfg, embedder=embedder).run_until_idle()


def make_updater(redis_server, embedder, stream_names, snap, **kw):
    cfg = IndexConfig(redis_url=redis_server.url, stream=stream_names["out_stream"], prefix=stream_names["prefix"],
                      snapshot_dir=str(snap), device="cpu", block_ms=50, **kw)
    return IndexUpdater(cfg, embedder=embedder)


def catch_up(u):
    while u.poll_once() == u.cfg.read_count:
        pass


class Http:
    """The app on uvicorn in a thread, on a free loopback port (real HTTP)."""

    def __init__(self, updater, port):
        self.port = port
        self.server = uvicorn.Server(uvicorn.Config(create_app(updater), host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        end = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < end, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)

    def get(self, path, **params):
        return http_get(self.port, path, **params)


def http_get(port, path, **params):
    url = f"http://127.0.0.1:{port}{path}" + (f"?{urlencode(params)}" if params else "")
    try:
        with urlopen(url, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except HTTPError as err:
        return err.code, json.loads(err.read())


def ranked(body):
    return [x["id"] for x in body["results"]]


# ---------------------------------------------------------------------------------------------
def test_post_key_is_stable_63_bit():
    # a fixed value: the map in every snapshot depends on this never changing
    assert post_key("p42") == 2554187147970288149
    keys = {post_key(f"post-{i}") for i in range(20000)}
    assert len(keys) == 20000 and all(0 <= k < 2**63 for k in keys)
    with pytest.raises(TypeError):
        post_key(42)


def test_decode_vector_matches_the_precision_table(embedder):
    texts = [POSTS[0]["text"], POSTS[1]["text"]]
    i8 = embedder.embed(texts, precision="int8")
    u8 = embedder.embed(texts, precision="uint8")
    b, ub = embedder.embed(texts, precision="binary"), embedder.embed(texts, precision="ubinary")
    dim = embedder.dim
    np.testing.assert_array_equal(decode_vector(u8[0].tobytes(), "uint8", dim), i8[0])
    np.testing.assert_array_equal(decode_vector(ub[1].tobytes(), "ubinary", dim), b[1])
    f16 = embedder.embed(texts, precision="float16")
    got = decode_vector(f16[0].astype("<f2").tobytes(), "float16", dim)
    assert got.dtype == np.float32 and np.array_equal(got, f16[0].astype(np.float32))
    with pytest.raises(ValueError, match="bytes"):
        decode_vector(i8[0].tobytes()[:-1], "int8", dim)


def test_new_post_searchable_delete_and_resume(redis_server, embedder, stream_names, tmp_path, free_port):
    r = redis_server.client()
    snap = tmp_path / "snap"
    produce(r, stream_names["stream"], range(40))
    assert embed_all(redis_server, embedder, stream_names) == 40
    u = make_updater(redis_server, embedder, stream_names, snap)
    catch_up(u)
    assert u.index.precision == "int8" and len(u.index) == 40 and u.applied == 40
    with Http(u, free_port()) as h:
        status, body = h.get("/health")
        assert status == 200
        status, body = h.get("/search", q=POSTS[3]["title"], k=10)
        assert status == 200 and body["count"] == 40 and body["model"] == embedder.model_tag
        assert ranked(body)[0] == "p3" and len(body["results"]) == 10
        scores = [x["score"] for x in body["results"]]
        assert scores == sorted(scores, reverse=True)
        # bad input: 4xx JSON naming the problem
        status, body = h.get("/search", k=3)
        assert status == 422 and body["error"]["code"] == "missing_q"
        for k, code in (("0", "invalid_k"), ("abc", "invalid_k"), ("100000", "invalid_k")):
            status, body = h.get("/search", q="x", k=k)
            assert status == 422 and body["error"]["code"] == code and "k must" in body["error"]["message"]
        status, body = h.get("/nope")
        assert status == 404 and body["error"]["code"] == "not_found"
        # more entries than posts: k larger than the index gives what there is
        status, body = h.get("/search", q=POSTS[5]["title"], k=50)
        assert status == 200 and len(body["results"]) == 40 and ranked(body)[0] == "p5"
    first = u.snapshot()
    assert first is not None and (snap / "CURRENT").read_text().strip() == first.name
    snap_id = u.last_id

    # after the snapshot: a new post, an edit of p7 (re-embedded, replaces itself), a delete of p3,
    # and a delete of a post never indexed (a no-op)
    produce(r, stream_names["stream"], [40])
    r.xadd(stream_names["stream"], {"id": "p7", "text": POSTS[41]["text"]})
    r.xadd(stream_names["stream"], {"id": "p3", "op": "delete"})
    r.xadd(stream_names["stream"], {"id": "never-seen", "op": "delete"})
    embed_all(redis_server, embedder, stream_names)
    assert r.xlen(stream_names["out_stream"]) == 44

    u2 = make_updater(redis_server, embedder, stream_names, snap)  # a restart: resumes after the snapshot's stream id
    assert u2.last_id == snap_id and len(u2.index) == 40 and u2.applied == 0
    catch_up(u2)
    assert u2.applied == 4, "entries before the snapshot were read again"
    assert len(u2.index) == 40 and "p3" not in u2.post_ids.values() and post_key("p40") in u2.index
    with Http(u2, free_port()) as h:
        assert ranked(h.get("/search", q=POSTS[40]["title"], k=10)[1])[0] == "p40"
        assert "p3" not in ranked(h.get("/search", q=POSTS[3]["title"], k=40)[1])
        # p7 now holds post 41's text: found by that title, not by its old one
        assert ranked(h.get("/search", q=POSTS[41]["title"], k=10)[1])[0] == "p7"
        assert ranked(h.get("/search", q=POSTS[7]["title"], k=10)[1])[0] != "p7"
        status, info = h.get("/info")
        assert info["count"] == 40 and info["skipped"] == 0 and info["last_id"] == u2.last_id
    # a redelivered entry (the same post again) replaces itself: no duplicate row
    last = r.xrange(stream_names["out_stream"], "-", "+")[-4]
    u2.apply([last])
    assert len(u2.index) == 40 and len(u2.post_ids) == 40

    # only one snapshot folder is kept; a snapshot of another model is refused with a clear error
    u2.snapshot()
    assert len([p for p in snap.iterdir() if p.name.startswith("snap-")]) == 1
    state_path = snap / (snap / "CURRENT").read_text().strip() / "state.json"
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps(dict(state, model_tag="some-other-model")))
    with pytest.raises(ValueError, match="holds vectors of model 'some-other-model'"):
        make_updater(redis_server, embedder, stream_names, snap)


def test_mismatched_entries_are_skipped_not_indexed(redis_server, embedder, stream_names, tmp_path):
    r = redis_server.client()
    produce(r, stream_names["stream"], range(3))
    embed_all(redis_server, embedder, stream_names, precision="binary")
    out = stream_names["out_stream"]
    good = r.xrange(out)[0][1]
    r.xadd(out, dict(good, id=b"other-model", model=b"some-other-model"))
    r.xadd(out, dict(good, id=b"short", vector=good[b"vector"][:-1]))
    r.xadd(out, dict(good, id=b"int8-into-binary", precision=b"int8", vector=b"\x00" * embedder.dim))
    u = make_updater(redis_server, embedder, stream_names, tmp_path / "snap")
    catch_up(u)
    assert u.index.precision == "binary" and sorted(u.post_ids.values()) == ["p0", "p1", "p2"]
    assert u.skipped == 3 and "cannot go into a binary index" in u.last_skip_reason
    # an explicit --precision: entries that cannot feed it are refused, not mixed in (only the one
    # int8 entry of the right length goes in)
    u8 = make_updater(redis_server, embedder, stream_names, tmp_path / "snap8", precision="int8")
    catch_up(u8)
    assert list(u8.post_ids.values()) == ["int8-into-binary"] and u8.skipped == 5


def test_trimmed_stream_is_reported(redis_server, embedder, stream_names, tmp_path, caplog):
    r = redis_server.client()
    out = stream_names["out_stream"]
    for i in range(5):
        r.xadd(out, {"id": f"x{i}", "op": "delete"})
    r.xtrim(out, maxlen=2, approximate=False)  # entries this (fresh) index never saw are gone
    u = make_updater(redis_server, embedder, stream_names, tmp_path / "snap")
    with caplog.at_level("ERROR", logger="postembed_fast.nearline.index"):
        catch_up(u)
    assert "had 3 entries removed" in caplog.text and "posts may be missing" in caplog.text
    caplog.clear()
    u2 = make_updater(redis_server, embedder, stream_names, tmp_path / "snap2")
    u2.last_id = r.xrange(out)[0][0].decode()  # a position inside what is left: nothing lost
    with caplog.at_level("ERROR", logger="postembed_fast.nearline.index"):
        catch_up(u2)
    assert "posts may be missing" not in caplog.text


def test_cli_wiring():
    from postembed_fast.cli import build_parser
    from postembed_fast.nearline import build_parser as nearline_parser

    args = build_parser().parse_args(["nearline", "index", "--snapshot", "d", "--port", "9", "--snapshot-every", "5"])
    assert args.func.__name__ == "cmd_nearline_index"
    cfg = IndexConfig.from_args(args)
    assert (cfg.snapshot_dir, cfg.port, cfg.snapshot_every_s, cfg.host, cfg.stream) == ("d", 9, 5.0, "127.0.0.1",
                                                                                        "posts.embedded")
    args = nearline_parser().parse_args(["index", "--snapshot", "d", "--precision", "binary"])
    assert args.command == "index" and IndexConfig.from_args(args).precision == "binary"
    assert IndexConfig.from_args(args).from_backfill is None
    args = nearline_parser().parse_args(["index", "--snapshot", "d", "--from-backfill", "out/bf"])
    assert IndexConfig.from_args(args).from_backfill == "out/bf"
    with pytest.raises(SystemExit):
        nearline_parser().parse_args(["index", "--port", "9"])  # --snapshot is required


def _spawn(args, log_path):
    env = dict(os.environ, POSTEMBED_LOG_LEVEL="INFO")
    # not the repo root as cwd: the tests use the installed package
    return subprocess.Popen([sys.executable, "-m", "postembed_fast.nearline", *args], stdout=open(log_path, "wb"),
                            stderr=subprocess.STDOUT, env=env, cwd=os.path.dirname(__file__))


def _wait(cond, timeout, what, procs=()):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"a process exited with {p.returncode} while waiting for {what}")
        try:
            if cond():
                return
        except OSError:  # not listening yet
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_search_app_runs_on_the_http_shell(redis_server, embedder, stream_names, tmp_path, free_port):
    """The index updater's routes share the embedding server's shell: the error envelope for a wrong
    method, and request metrics on GET /metrics."""
    u = make_updater(redis_server, embedder, stream_names, tmp_path / "snap", precision="float32")
    catch_up(u)
    with Http(u, free_port()) as h:
        status, body = h.get("/search", q="anything", k=3)
        assert status == 200 and body["results"] == [] and body["count"] == 0
        req = Request(f"http://127.0.0.1:{h.port}/search", data=b"{}", method="POST")
        with pytest.raises(HTTPError) as err:
            urlopen(req, timeout=30)
        assert err.value.code == 405 and json.loads(err.value.read())["error"]["code"] == "method_not_allowed"
        with urlopen(f"http://127.0.0.1:{h.port}/metrics", timeout=30) as resp:
            text = resp.read().decode()
        assert 'postembed_requests_total{endpoint="/search",status="200"} 1.0' in text


def test_end_to_end_xadd_to_search_and_restart(redis_server, stream_names, tmp_path, free_port):
    r = redis_server.client()
    snap, port = tmp_path / "snap", free_port()
    worker = _spawn(["embed", "--redis", redis_server.url, "--device", "cpu", "--consumer", "e2e", "--stream",
                     stream_names["stream"], "--prefix", stream_names["prefix"], "--out-stream",
                     stream_names["out_stream"], "--dead-stream", stream_names["dead_stream"], "--precision", "int8",
                     "--batch-wait-ms", "5"],
                    tmp_path / "worker.log")
    index_args = ["index", "--redis", redis_server.url, "--device", "cpu", "--stream", stream_names["out_stream"],
                  "--prefix", stream_names["prefix"], "--snapshot", str(snap), "--snapshot-every", "1",
                  "--port", str(port)]
    index = _spawn(index_args, tmp_path / "index.log")
    procs = (worker, index)
    try:
        _wait(lambda: http_get(port, "/health")[0] == 200, 60, "the index updater", procs)
        produce(r, stream_names["stream"], range(12))
        t0 = time.monotonic()
        produce(r, stream_names["stream"], [12])  # a post created now ...
        _wait(lambda: ranked(http_get(port, "/search", q=POSTS[12]["title"], k=10)[1])[:1] == ["p12"], 60,
              "the new post to be found by its title", procs)
        took = time.monotonic() - t0
        assert took < 30, f"searchable after {took:.1f} s"  # ... is searchable seconds later
        r.xadd(stream_names["stream"], {"id": "p12", "op": "delete"})
        _wait(lambda: "p12" not in ranked(http_get(port, "/search", q=POSTS[12]["title"], k=12)[1]), 30,
              "the deleted post to leave the index", procs)
        _, info = http_get(port, "/info")
        assert info["count"] == 12
        index.send_signal(signal.SIGTERM)
        assert index.wait(60) == 0, (tmp_path / "index.log").read_text()[-3000:]
        assert (snap / "CURRENT").exists()
        # restarted: everything from the snapshot, nothing read again
        index = _spawn(index_args, tmp_path / "index2.log")
        procs = (worker, index)
        _wait(lambda: http_get(port, "/health")[0] == 200, 60, "the restarted index updater", procs)
        _, info2 = http_get(port, "/info")
        assert info2["count"] == 12 and info2["last_id"] == info["last_id"] and info2["applied"] == 0
        assert ranked(http_get(port, "/search", q=POSTS[4]["title"], k=10)[1])[0] == "p4"
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
    assert index.returncode == 0 and worker.returncode == 0
