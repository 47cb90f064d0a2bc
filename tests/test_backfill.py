"""The Ray Data backfill (postembed_fast/backfill/) on a local Ray bound to loopback, with a few hundred
real posts cut short: output equals Embedder.embed in-process, resume skips finished files and redoes
changed ones, bad rows go to rejects.jsonl, JSONL and Parquet inputs, and --load-into writes the
near-line Redis layout (against a real redis-server on a free loopback port)."""
from __future__ import annotations

import gzip
import json
import os
import sys
import warnings

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'postembed_fast[backfill]')")
pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from postembed_fast.backfill import job, layout  # noqa: E402
from postembed_fast.backfill.inputs import expand_inputs  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "data", "posts.jsonl.gz")
with gzip.open(DATA, "rt", encoding="utf-8") as _f:
    POSTS = [json.loads(line) for line, _ in zip(_f, range(240))]
for _p in POSTS:  # real posts, cut short to keep the CPU time of these tests low
    _p["text"] = _p["text"][:300]

POSTS[3]["text"] += " \u2028 (a line separator inside the text) \u2029 \x85 end"
A, B, C = POSTS[:100], POSTS[100:160], POSTS[160:240]  # a.jsonl.gz, b.jsonl, c.parquet
BAD_LINES = [  # (line, expected reason fragment, expected id)
    ("{not json", "invalid JSON", None),
    (json.dumps({"id": "bad-1"}), "missing text", "bad-1"),
    (json.dumps({"id": "bad-2", "text": 17}), "text ('text') is int", "bad-2"),
    (json.dumps({"text": "a post without an id"}), "missing id", None),
    (json.dumps({"id": "bad-3", "text": "\ud800"}), "not valid Unicode", "bad-3"),
    (json.dumps(["a", "list"]), "not a JSON object", None),
    (b'{"id": "bad-4", "text": "caf\xe9 latin-1"}', "not valid UTF-8", None),
]


@pytest.fixture(scope="module")
def ray_local(loopback_network):
    """Local Ray, no dashboard, in a private network namespace holding only loopback (Ray's own servers
    bind every interface: here there is no other). This module's runs reuse it (backfill does not init
    or shut down Ray when it is already initialized)."""
    with loopback_network() as not_isolated:
        if not_isolated:
            warnings.warn(f"Ray runs in the host's network namespace: {not_isolated}", stacklevel=1)
        ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            yield not_isolated
        finally:
            ray.shutdown()


def test_ray_listens_on_loopback_only(ray_local, listening_sockets):
    listening_addresses, is_loopback = listening_sockets
    if ray_local:
        pytest.skip(ray_local)
    addrs = listening_addresses()
    assert addrs, "Ray's servers should be listening"
    assert all(is_loopback(a) for a in addrs), addrs


def write_jsonl(path, posts, bad=(), gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        for i, p in enumerate(posts):
            # ensure_ascii=False: raw UTF-8, so an unescaped U+2028 inside a string must not split the line
            f.write(json.dumps({"id": p["id"], "text": p["text"], "title": p.get("title")},
                               ensure_ascii=False).encode() + b"\n")
            if i == 10:  # bad rows in the middle: the rows after them must still come out in order
                for line, _, _ in bad:
                    f.write((line if isinstance(line, bytes) else line.encode()) + b"\n")
                f.write(b"\n")  # a blank line is not a post (skipped, not rejected)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    write_jsonl(d / "a.jsonl.gz", A, BAD_LINES, gz=True)
    write_jsonl(d / "b.jsonl", B)
    # Parquet with an integer id column cast to string, and one null text and one null id
    ids = [p["id"] for p in C] + [None, "c-null-text"]
    texts = [p["text"] for p in C] + ["no id here", None]
    pq.write_table(pa.table({"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string()),
                             "extra": pa.array(range(len(ids)))}), d / "c.parquet", row_group_size=32)
    return d


def expected(embedder, posts, precision):
    return embedder.embed([p["text"] for p in posts], precision=precision, ranges=embedder.quantization_ranges
                          if precision in ("int8", "uint8") else None)


def by_input(out_dir):
    ids, emb, keys = layout.read_output(out_dir, with_input=True)
    got: dict[str, tuple[list, list]] = {}
    for i, (pid, key) in enumerate(zip(ids, keys)):
        name = key.rsplit("-", 1)[0]
        got.setdefault(name, ([], []))
        got[name][0].append(pid)
        got[name][1].append(emb[i])
    return {k: (v[0], np.stack(v[1])) for k, v in got.items()}


def assert_matches(got, want, precision):
    assert got.shape == want.shape and got.dtype == want.dtype
    if precision == "float32":
        cos = (got.astype(np.float64) * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        assert cos.min() >= 0.99999, cos.min()
    elif precision == "float16":
        g, w = got.astype(np.float64), want.astype(np.float64)
        cos = (g * w).sum(1) / np.linalg.norm(g, axis=1) / np.linalg.norm(w, axis=1)
        assert cos.min() >= 0.999, cos.min()
    else:  # codes: identical
        np.testing.assert_array_equal(got, want)


def test_float32_both_formats_rejects_and_resume(ray_local, embedder, inputs, tmp_path):
    out = tmp_path / "out"
    cfg = job.Config(output=str(out), inputs=[str(inputs / "*.jsonl*"), str(inputs / "c.parquet")],
                     progress=False, batch_size=64, dtype="float32")  # float32: equals the float32 `embedder`
    s = job.run_backfill(cfg, log=lambda m: None)
    assert (s["files"], s["skipped"], s["rows"]) == (3, 0, len(A) + len(B) + len(C))
    assert s["rejects"] == len(BAD_LINES) + 2

    got = by_input(out)
    assert set(got) == {"a", "b", "c"}
    for name, posts in (("a", A), ("b", B), ("c", C)):
        ids, emb = got[name]
        assert ids == [p["id"] for p in posts]  # every good row, in input order, with its id
        assert_matches(emb, expected(embedder, posts, "float32"), "float32")

    part = sorted(out.glob("a-*/part-*.parquet"))[0]
    schema = pq.read_schema(part)
    assert schema.field("id").type == pa.string()
    assert schema.field("embedding").type == pa.list_(pa.float32(), 384)
    meta = {k.decode(): v.decode() for k, v in schema.metadata.items() if k.startswith(b"postembed.")}
    assert meta["postembed.model"] == embedder.model_tag
    assert (meta["postembed.precision"], meta["postembed.dim"]) == ("float32", "384")
    assert "postembed.ranges" not in meta

    rejects = [json.loads(x) for x in (next(out.glob("a-*")) / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == len(BAD_LINES)
    for r, (line, reason, pid) in zip(rejects, BAD_LINES):
        row = line.decode("utf-8", "backslashreplace") if isinstance(line, bytes) else line
        assert reason in r["reason"] and r["id"] == pid and r["row"] == row and r["input"].endswith("a.jsonl.gz")
    crej = [json.loads(x) for x in (next(out.glob("c-*")) / "rejects.jsonl").read_text().splitlines()]
    assert [("missing id" in r["reason"], r["id"]) for r in crej] == [(True, None), (False, "c-null-text")]
    assert not list(out.glob("b-*/rejects.jsonl"))

    # resume: nothing to do, nothing rewritten
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    s2 = job.run_backfill(cfg, log=lambda m: None)
    assert (s2["files"], s2["skipped"], s2["rows"]) == (0, 3, 0)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == stamps

    # an input that changed is redone (and only that one); a folder left by an interrupted run is wiped
    b_dir = next(out.glob("b-*"))
    (b_dir / "_SUCCESS.json").unlink()
    (b_dir / "part-999999.parquet").write_bytes(b"half-written garbage")
    s3 = job.run_backfill(cfg, log=lambda m: None)
    assert (s3["files"], s3["skipped"], s3["rows"], s3["rejects"]) == (1, 2, len(B), 0)
    assert not (b_dir / "part-999999.parquet").exists()
    ids, emb = by_input(out)["b"]
    assert ids == [p["id"] for p in B]
    for p, t in stamps.items():
        if b_dir not in p.parents:
            assert p.stat().st_mtime_ns == t


@pytest.fixture(scope="module")
def int8_output(ray_local, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "out"
    rc = job.main(["--input", str(inputs / "a.jsonl.gz"), "--output", str(out), "--precision", "int8",
                   "--dtype", "float32", "--no-progress", "--batch-size", "32"])  # as the float32 `embedder`
    assert rc == 0
    return out


@pytest.mark.parametrize("precision", ["int8", "binary", "float16"])
def test_precisions(precision, ray_local, embedder, inputs, int8_output, tmp_path):
    if precision == "int8":
        out = int8_output  # made through main(): the command line path
    else:
        out = tmp_path / "out"
        job.run_backfill(job.Config(output=str(out), inputs=[str(inputs / "a.jsonl.gz")],
                                    precision=precision, dtype="float32", progress=False), log=lambda m: None)
    ids, emb = by_input(out)["a"]
    assert ids == [p["id"] for p in A]
    assert_matches(emb, expected(embedder, A, precision), precision)
    schema = pq.read_schema(sorted(out.glob("a-*/part-*.parquet"))[0])
    if precision == "float16":
        assert schema.field("embedding").type == pa.list_(pa.float16(), 384)
    else:
        width = 384 if precision == "int8" else 48
        assert schema.field("embedding").type == pa.binary(width)
    meta = schema.metadata
    if precision == "int8":
        ranges = np.asarray(json.loads(meta[b"postembed.ranges"]), dtype=np.float32)
        np.testing.assert_array_equal(ranges, embedder.quantization_ranges)
    else:
        assert b"postembed.ranges" not in meta


def test_refuses_other_precision_in_same_output(ray_local, inputs, int8_output):
    with pytest.raises(layout.BackfillError, match="precision='int8'.*new --output"):
        job.run_backfill(job.Config(output=str(int8_output), inputs=[str(inputs / "a.jsonl.gz")],
                                              precision="binary", progress=False), log=lambda m: None)


def test_bad_setup_is_a_clear_error(tmp_path, capsys):
    assert job.main(["--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o")]) == 2
    assert "nope.jsonl: no such input file" in capsys.readouterr().err
    (tmp_path / "x.csv").write_text("id,text\n")
    with pytest.raises(layout.BackfillError, match="unknown input format"):
        expand_inputs([str(tmp_path / "x.csv")])
    assert job.main(["--output", str(tmp_path / "o")]) == 2
    # never an actor waiting forever for a GPU that is not there
    cpu_only = {"CPU": 2.0}
    nodes = [{"Alive": True, "Resources": {"CPU": 2.0}}]
    with pytest.raises(layout.BackfillError, match="no GPU"):
        job.plan_workers(job.Config(output="o", gpus_per_worker=1), cpu_only, nodes)
    with pytest.raises(layout.BackfillError, match="no GPU"):
        job.plan_workers(job.Config(output="o", device="cuda"), cpu_only, nodes)
    with pytest.raises(layout.BackfillError, match="no CPU"):  # Ray Data's own tasks need one
        job.plan_workers(job.Config(output="o", workers=2, cpus_per_worker=1), cpu_only, nodes)
    two = job.plan_workers(job.Config(output="o", workers=2), cpu_only, nodes)
    assert (two["workers"], two["threads"], two["cpus"]) == (2, 1, 0.5)
    plan = job.plan_workers(job.Config(output="o"), cpu_only, nodes)
    assert (plan["device"], plan["workers"], plan["threads"], plan["gpus"]) == ("cpu", 1, 2, 0.0)
    gpu = job.plan_workers(job.Config(output="o"), {"CPU": 32.0, "GPU": 4.0}, nodes)
    assert (gpu["device"], gpu["workers"], gpu["gpus"]) == ("cuda", 4, 1.0)


def test_parquet_missing_column(ray_local, tmp_path):
    pq.write_table(pa.table({"id": ["1"], "body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(layout.BackfillError, match="no column 'text'.*--text-field"):
        job.run_backfill(job.Config(output=str(tmp_path / "o"), inputs=[str(tmp_path / "p.parquet")],
                                              progress=False), log=lambda m: None)


def test_without_ray_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    msg = job.missing_extra()
    assert msg and "pip install 'postembed_fast[backfill]'" in msg


# ---- --load-into: the near-line Redis layout ----------------------------------------------------
@pytest.fixture
def redis_url(tmp_path, start_redis):
    srv = start_redis(tmp_path)
    return srv.url, srv.client()


def test_load_into_redis(int8_output, embedder, redis_url):
    from postembed_fast.nearline import store

    url, r = redis_url
    r.hset("emb:" + A[0]["id"], mapping={"lang": "xx", "vector": b"old"})  # fields of an older version go
    rc = job.main(["--output", str(int8_output), "--load-into", url, "--prefix", "emb:"])
    assert rc == 0
    want = expected(embedder, A, "int8")
    for p, row in zip(A, want):
        h = r.hgetall("emb:" + p["id"])
        assert np.array_equal(np.frombuffer(h[b"vector"], dtype=np.int8), row)
        assert h[b"model"].decode() == embedder.model_tag
        assert (h[b"dim"], h[b"precision"]) == (b"384", b"int8")
        assert int(h[b"created_ms"]) > 0 and int(h[b"embedded_ms"]) > 0
        assert b"lang" not in h
    assert r.dbsize() == len(A) + 1  # the posts and the ranges, nothing for rejected rows
    rng = r.hgetall(store.ranges_key("emb:", embedder.model_tag))
    np.testing.assert_array_equal(np.frombuffer(rng[b"ranges"], dtype="<f4").reshape(2, 384),
                                  embedder.quantization_ranges)
