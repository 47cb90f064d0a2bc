"""The near-line store (postembed_fast/nearline/store.py) and its two writers against a real redis-server:
the worker (a consumer of the posts stream) and `backfill --load-into` (a finished backfill output).

A backfill row carries its snapshot time as a version; a post stored from a stream entry at or after the
snapshot, or deleted at or after it, is never overwritten by the load, and the load counts what it skipped.
Whatever either writer stores is read back the same way by every reader (decode_vector, the index updater).
The backfill outputs here are written with the backfill's own layout helpers (no Ray: the loader is what
is tested; tests/test_backfill.py runs the Ray job and loads its output)."""
from __future__ import annotations

import gzip
import json
import os
import time

import numpy as np
import pytest

redis = pytest.importorskip("redis", reason="redis-py is not installed (pip install 'postembed_fast[nearline]')")
pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install 'postembed_fast[backfill]')")
import pyarrow.parquet as pq  # noqa: E402

from postembed_fast.backfill import job  # noqa: E402
from postembed_fast.backfill.layout import SETTINGS_FILE, SUCCESS_FILE, BackfillError  # noqa: E402
from postembed_fast.backfill.load import load_into  # noqa: E402
from postembed_fast.backfill.rows import embedding_array, embedding_type  # noqa: E402
from postembed_fast.nearline import store  # noqa: E402
from postembed_fast.nearline.worker import Config, Worker  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "data", "posts.jsonl.gz")
with gzip.open(DATA, "rt", encoding="utf-8") as _f:
    TEXTS = [json.loads(line)["text"][:300] for line, _ in zip(_f, range(12))]
OLD = [f"an older version of the post: {t[:80]}" for t in TEXTS]  # what a stale snapshot holds
HOUR_MS = 3600 * 1000


def write_backfill_output(out_dir, embedder, ids, texts, precision, snapshot_ms):
    """A finished backfill output in the backfill's layout: _backfill.json, one input folder with a part
    file, and its _SUCCESS.json recording an input mtime of `snapshot_ms`."""
    out_dir.mkdir(parents=True)
    ranges = embedder.quantization_ranges
    settings = {"model": embedder.model_tag, "precision": precision, "dim": embedder.dim, "format": 1,
                "ranges": None if ranges is None or precision not in ("int8", "uint8") else ranges.tolist()}
    (out_dir / SETTINGS_FILE).write_text(json.dumps(settings))
    key = out_dir / "snapshot-0123456789"
    key.mkdir()
    rows = embedder.embed(texts, precision=precision)
    table = pa.table({"id": pa.array(ids, pa.string()), "embedding": embedding_array(rows, precision, embedder.dim)},
                     schema=pa.schema([("id", pa.string()), ("embedding", embedding_type(precision, embedder.dim))]))
    pq.write_table(table, key / "part-000000.parquet")
    (key / SUCCESS_FILE).write_text(json.dumps({"input": "/data/snapshot.jsonl", "size": 1,
                                                "mtime_ns": snapshot_ms * 1_000_000, "rows": len(ids), "rejects": 0,
                                                "finished_ms": snapshot_ms + 1000}))
    return rows


def make_worker(redis_server, embedder, stream_names, precision, **kw):
    cfg = Config(redis_url=redis_server.url, device="cpu", consumer="w1", batch_wait_ms=10, idle_block_ms=50,
                 precision=precision, **stream_names, **kw)
    return Worker(cfg, embedder=embedder)


def stored(r, prefix, pid, precision, dim):
    h = r.hgetall(store.hash_key(prefix, pid))
    return None if not h else store.decode_vector(h[b"vector"], precision, dim)


def as_index_codes(rows, precision):
    """embed()'s rows as decode_vector returns them (float32 for floats, signed codes otherwise)."""
    rows = np.asarray(rows)
    if precision in ("float32", "float16"):
        return rows.astype(np.float32)
    return (rows.astype(np.int16) - 128).astype(np.int8) if rows.dtype == np.uint8 else rows


@pytest.mark.parametrize("precision", ["int8", "float16"])
def test_backfill_never_overwrites_a_newer_edit_or_undoes_a_delete(redis_server, embedder, stream_names, tmp_path,
                                                                   precision):
    r = redis_server.client()
    prefix, dim = stream_names["prefix"], embedder.dim
    # the stream: p0..p3 created and embedded now; then p2 deleted
    for i in range(4):
        r.xadd(stream_names["stream"], {"id": f"p{i}", "text": TEXTS[i]})
    w = make_worker(redis_server, embedder, stream_names, precision)
    assert w.run_until_idle() == 4
    r.xadd(stream_names["stream"], {"id": "p2", "op": "delete"})
    w.run_until_idle()
    assert not r.exists(store.hash_key(prefix, "p2"))
    now_ms = int(time.time() * 1000)
    # a snapshot file an hour old: older texts of p0..p2, and p4..p5 which the stream never saw
    ids = ["p0", "p1", "p2", "p4", "p5"]
    old_rows = write_backfill_output(tmp_path / "old", embedder, ids, [OLD[0], OLD[1], OLD[2], OLD[4], OLD[5]],
                                     precision, now_ms - HOUR_MS)
    fresh = embedder.embed(TEXTS[:4], precision=precision)
    report = load_into(tmp_path / "old", redis_server.url, prefix=prefix)
    assert (report.written, report.skipped_newer, report.skipped_deleted, report.already_loaded) == (2, 2, 1, 0)
    np.testing.assert_array_equal(stored(r, prefix, "p0", precision, dim), as_index_codes(fresh[0], precision))
    np.testing.assert_array_equal(stored(r, prefix, "p1", precision, dim), as_index_codes(fresh[1], precision))
    assert not r.exists(store.hash_key(prefix, "p2"))  # deleted after the snapshot: stays deleted
    np.testing.assert_array_equal(stored(r, prefix, "p4", precision, dim), as_index_codes(old_rows[3], precision))
    h4 = r.hgetall(store.hash_key(prefix, "p4"))
    assert h4[b"version"].decode() == store.snapshot_version(now_ms - HOUR_MS)
    assert h4[b"source_id"].decode().startswith("backfill:") and h4[b"model"].decode() == embedder.model_tag

    # the same load again writes nothing
    again = load_into(tmp_path / "old", redis_server.url, prefix=prefix)
    assert (again.written, again.skipped_newer, again.skipped_deleted, again.already_loaded) == (0, 2, 1, 2)

    # an edit of p4 on the stream after the load replaces the backfilled row
    r.xadd(stream_names["stream"], {"id": "p4", "text": TEXTS[4]})
    assert w.run_until_idle() == 1
    np.testing.assert_array_equal(stored(r, prefix, "p4", precision, dim),
                                  as_index_codes(embedder.embed([TEXTS[4]], precision=precision)[0], precision))
    # an entry older than the snapshot (a redelivery of a very late edit) does not replace the backfilled p5
    late = dict(stream_names, stream=stream_names["stream"] + ".late")
    r.xadd(late["stream"], {"id": "p5", "text": TEXTS[5]}, id=f"{now_ms - 2 * HOUR_MS}-0")
    w2 = make_worker(redis_server, embedder, late, precision)
    w2.run_until_idle()
    assert w2.stale == 1
    np.testing.assert_array_equal(stored(r, prefix, "p5", precision, dim), as_index_codes(old_rows[4], precision))


def test_a_snapshot_newer_than_the_stream_wins(redis_server, embedder, stream_names, tmp_path):
    r = redis_server.client()
    prefix, dim = stream_names["prefix"], embedder.dim
    r.xadd(stream_names["stream"], {"id": "p0", "text": TEXTS[0]})
    make_worker(redis_server, embedder, stream_names, "int8").run_until_idle()
    time.sleep(0.01)
    snap = int(time.time() * 1000)  # a snapshot taken after the stream entry: the backfill is newer
    rows = write_backfill_output(tmp_path / "o", embedder, ["p0"], [OLD[0]], "int8", snap)
    report = load_into(tmp_path / "o", redis_server.url, prefix=prefix)
    assert report.written == 1 and report.skipped == 0
    np.testing.assert_array_equal(stored(r, prefix, "p0", "int8", dim), rows[0])


def test_snapshot_older_than_the_tombstone_ttl_is_refused_without_force(redis_server, embedder, stream_names,
                                                                      tmp_path):
    r = redis_server.client()
    prefix = stream_names["prefix"]
    now = int(time.time() * 1000)
    write_backfill_output(tmp_path / "o", embedder, ["p0"], [OLD[0]], "int8", now - 2 * 86400 * 1000)
    with pytest.raises(BackfillError, match="--tombstone-ttl.*--force"):
        load_into(tmp_path / "o", redis_server.url, prefix=prefix)
    assert not r.exists(store.hash_key(prefix, "p0"))  # refused before anything is written
    assert load_into(tmp_path / "o", redis_server.url, prefix=prefix, force=True).written == 1
    with pytest.raises(BackfillError, match="in the future"):
        load_into(tmp_path / "o", redis_server.url, prefix=prefix, snapshot_ms=now + HOUR_MS)
    # an explicit snapshot time replaces the file's
    report = load_into(tmp_path / "o", redis_server.url, prefix=prefix, snapshot_ms=now - 1000)
    assert report.written == 1 and report.snapshots_ms == [now - 1000]


def test_both_writers_layouts_read_back_by_every_reader(redis_server, embedder, stream_names, tmp_path):
    """The worker's hash and a backfilled hash decode the same way; posts a load announces reach the
    index updater like the worker's."""
    from postembed_fast.nearline.index_updater import IndexConfig, IndexUpdater

    r = redis_server.client()
    prefix, dim = stream_names["prefix"], embedder.dim
    r.xadd(stream_names["stream"], {"id": "s0", "text": TEXTS[0]})
    make_worker(redis_server, embedder, stream_names, "int8").run_until_idle()
    rows = write_backfill_output(tmp_path / "o", embedder, ["b1", "b2"], TEXTS[1:3], "int8",
                                 int(time.time() * 1000) - 1000)
    report = load_into(tmp_path / "o", redis_server.url, prefix=prefix, announce_stream=stream_names["out_stream"])
    assert report.written == 2 and report.announced
    want = embedder.embed(TEXTS[:3], precision="int8")
    for pid, row in zip(["s0", "b1", "b2"], want):
        h = r.hgetall(store.hash_key(prefix, pid))
        assert h[b"model"].decode() == embedder.model_tag and int(h[b"dim"]) == dim
        assert h[b"precision"] == b"int8"
        np.testing.assert_array_equal(store.decode_vector(h[b"vector"], "int8", dim), row)
    np.testing.assert_array_equal(rows, want[1:])
    rng = r.hgetall(store.ranges_key(prefix, embedder.model_tag))
    np.testing.assert_array_equal(np.frombuffer(rng[b"ranges"], "<f4").reshape(2, dim), embedder.quantization_ranges)
    out = r.xrange(stream_names["out_stream"])
    assert [f[b"id"].decode() for _, f in out] == ["s0", "b1", "b2"]
    assert out[1][1][b"consumer"] == b"backfill" and out[1][1][b"op"] == b"upsert"

    cfg = IndexConfig(redis_url=redis_server.url, stream=stream_names["out_stream"], prefix=prefix,
                      snapshot_dir=str(tmp_path / "snap"), device="cpu", block_ms=50)
    u = IndexUpdater(cfg, embedder=embedder)
    while u.poll_once() == u.cfg.read_count:
        pass
    assert sorted(u.post_ids.values()) == ["b1", "b2", "s0"] and u.skipped == 0
    scores, ids = u.index.search(embedder.embed([TEXTS[2]], precision="float32"), k=1)
    assert u.post_ids[int(ids[0, 0])] == "b2"


def test_load_flags_through_the_command(redis_server, embedder, stream_names, tmp_path, capsys):
    r = redis_server.client()
    prefix = stream_names["prefix"]
    now = int(time.time() * 1000)
    write_backfill_output(tmp_path / "o", embedder, ["p0", "p1"], OLD[:2], "int8", now - 3 * 86400 * 1000)
    args = ["--output", str(tmp_path / "o"), "--load-into", redis_server.url, "--prefix", prefix]
    assert job.main(args) == 2
    assert "--force" in capsys.readouterr().err and not r.exists(store.hash_key(prefix, "p0"))
    assert job.main([*args, "--tombstone-ttl", str(4 * 86400)]) == 0
    assert "2 stored, 0 skipped" in capsys.readouterr().err
    assert job.main([*args, "--snapshot-ms", str(now - 5000), "--announce", stream_names["out_stream"]]) == 0
    assert "2 stored" in capsys.readouterr().err
    assert [f[b"id"] for _, f in r.xrange(stream_names["out_stream"])] == [b"p0", b"p1"]


def test_index_from_backfill_then_the_stream_newer_entries_win(redis_server, embedder, stream_names, tmp_path):
    """`nearline index --from-backfill DIR`: the index starts from a backfill output and follows the stream;
    a stream entry made from an input entry older than a post's backfill snapshot does not replace it, also
    after a restart from the index's own snapshot."""
    from postembed_fast.nearline.index_updater import IndexConfig, IndexUpdater

    r = redis_server.client()
    precision = "float16"
    for i in range(4):  # p0..p3 created and embedded now, then p2 deleted
        r.xadd(stream_names["stream"], {"id": f"p{i}", "text": TEXTS[i]})
    w = make_worker(redis_server, embedder, stream_names, precision)
    assert w.run_until_idle() == 4
    r.xadd(stream_names["stream"], {"id": "p2", "op": "delete"})
    w.run_until_idle()
    now_ms = int(time.time() * 1000)
    # a very late edit of p5 made two hours ago (older than the snapshot): the worker stores it (Redis has no
    # p5: the backfill is not loaded there) and puts it on the output stream
    late = dict(stream_names, stream=stream_names["stream"] + ".late")
    r.xadd(late["stream"], {"id": "p5", "text": TEXTS[5]}, id=f"{now_ms - 2 * HOUR_MS}-0")
    assert make_worker(redis_server, embedder, late, precision).run_until_idle() == 1
    ids = ["p0", "p1", "p2", "p4", "p5"]
    old_rows = write_backfill_output(tmp_path / "bf", embedder, ids, [OLD[0], OLD[1], OLD[2], OLD[4], OLD[5]],
                                     precision, now_ms - HOUR_MS)
    fresh = embedder.embed(TEXTS[:4], precision="float32")

    def updater():
        cfg = IndexConfig(redis_url=redis_server.url, stream=stream_names["out_stream"], prefix=stream_names["prefix"],
                          snapshot_dir=str(tmp_path / "snap"), device="cpu", block_ms=50,
                          from_backfill=str(tmp_path / "bf"))
        u = IndexUpdater(cfg, embedder=embedder)
        while u.poll_once() == u.cfg.read_count:
            pass
        return u

    def best(u, row):
        scores, got = u.index.search(np.asarray(row, np.float32)[None], k=1)
        return u.post_ids[int(got[0, 0])], float(scores[0, 0])

    u = updater()
    assert sorted(u.post_ids.values()) == ["p0", "p1", "p3", "p4", "p5"]  # p2: deleted after the snapshot
    assert u.skipped_older == 1 and u.skipped == 0  # the late p5 entry
    for pid, row in [("p0", fresh[0]), ("p1", fresh[1]), ("p3", fresh[3]),
                     ("p4", old_rows[3]), ("p5", old_rows[4])]:
        got, score = best(u, row)
        assert got == pid and score > 0.999, (pid, got, score)
    assert u.info()["backfilled"] == 2  # p4, p5 still guarded by their snapshot time
    u.snapshot()

    # a restart resumes from the index's snapshot (the backfill is not read again) and keeps the guard
    r.xadd(late["stream"], {"id": "p4", "text": TEXTS[4]}, id=f"{now_ms - 2 * HOUR_MS}-1")
    assert make_worker(redis_server, embedder, late, precision).run_until_idle() == 1
    u2 = updater()
    assert len(u2.post_ids) == 5 and u2.skipped_older == 1
    got, score = best(u2, old_rows[3])
    assert got == "p4" and score > 0.999
    # a new edit of p4 replaces it
    r.xadd(stream_names["stream"], {"id": "p4", "text": TEXTS[4]})
    assert w.run_until_idle() == 1
    while u2.poll_once() == u2.cfg.read_count:
        pass
    got, score = best(u2, embedder.embed([TEXTS[4]], precision="float32")[0])
    assert got == "p4" and score > 0.999 and u2.info()["backfilled"] == 1


def test_index_from_backfill_of_another_model_is_refused(redis_server, embedder, stream_names, tmp_path):
    from postembed_fast.nearline.index_updater import IndexConfig, IndexUpdater

    write_backfill_output(tmp_path / "bf", embedder, ["p0"], [OLD[0]], "float16", int(time.time() * 1000))
    settings = json.loads((tmp_path / "bf" / SETTINGS_FILE).read_text())
    (tmp_path / "bf" / SETTINGS_FILE).write_text(json.dumps(dict(settings, model="other-model@0000")))
    cfg = IndexConfig(redis_url=redis_server.url, stream=stream_names["out_stream"], snapshot_dir=str(tmp_path / "s"),
                      device="cpu", from_backfill=str(tmp_path / "bf"))
    with pytest.raises(ValueError, match="other-model@0000"):
        IndexUpdater(cfg, embedder=embedder)
