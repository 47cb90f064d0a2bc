"""A finished backfill output -> the near-line store in Redis (the layout of postembed_fast.nearline.store)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from postembed_fast.backfill.layout import (
    SETTINGS_FILE,
    SUCCESS_FILE,
    BackfillError,
    read_settings,
    snapshot_ms_of,
)
from postembed_fast.backfill.rows import from_embedding_column
from postembed_fast.cli_args import missing_extra
from postembed_fast.kernels.precision import precision_spec
from postembed_fast.nearline import store


@dataclass
class LoadReport:
    """What a load did, per input snapshot version: rows stored, and rows skipped with why."""
    written: int = 0
    skipped_newer: int = 0  # the store holds a version from the stream at or after the snapshot
    skipped_deleted: int = 0  # the post was deleted at or after the snapshot
    already_loaded: int = 0  # this snapshot version is already stored (a repeated load)
    announced: bool = False
    snapshots_ms: list = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return self.skipped_newer + self.skipped_deleted + self.already_loaded

    def summary(self) -> str:
        return (f"{self.written} stored, {self.skipped} skipped ({self.skipped_newer} newer in the store, "
                f"{self.skipped_deleted} deleted after the snapshot, {self.already_loaded} already loaded)")


def load_into(out_dir, redis_url: str, prefix: str = "emb:", batch: int = 1000, *, snapshot_ms: int | None = None,
              tombstone_ttl_s: int = store.DEFAULT_TOMBSTONE_TTL_S, force: bool = False,
              announce_stream: str | None = None, out_maxlen: int = 0, now_ms: int | None = None) -> LoadReport:
    """Write a finished output into Redis in the near-line layout (postembed_fast/nearline/store.py), never
    over newer data: a hash `{prefix}{id}` per post (vector = embed()'s bytes, little-endian; model, dim,
    precision, created_ms and embedded_ms = when its input finished, as the backfill does not know the
    post's creation time; source_id = backfill:<input key>; version = the snapshot as a stream id) and
    the ranges under `{prefix}__ranges__:{model}`. Each row is stored by store.BACKFILL_STORE_LUA: a post
    the near-line worker stored from a stream entry at or after the snapshot, or deleted at or after it,
    is skipped and counted. The snapshot time is `snapshot_ms` for every input, else each input file's
    mtime from its _SUCCESS.json. A snapshot older than `tombstone_ttl_s` is refused unless `force`:
    tombstones of deletes that old may have expired, so the load could resurrect deleted posts.
    `announce_stream`: also XADD each stored post to that stream (the worker's output stream), so the
    index updater sees it; meant for small loads. Only inputs with a _SUCCESS.json are loaded."""
    problem = missing_extra("nearline", "redis")
    if problem:
        raise BackfillError(problem)
    import pyarrow.parquet as pq
    import redis

    out_dir = Path(out_dir)
    settings = read_settings(out_dir)
    if settings is None:
        raise BackfillError(f"{out_dir}: not a backfill output ({SETTINGS_FILE} missing)")
    precision, dim, tag = settings["precision"], settings["dim"], settings["model"]
    precision_spec(precision)  # a known precision
    inputs = []  # (folder, its _SUCCESS.json, snapshot ms): checked before anything is written
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    for key_dir in sorted(p for p in out_dir.iterdir() if (p / SUCCESS_FILE).exists()):
        done = json.loads((key_dir / SUCCESS_FILE).read_text())
        snap = snapshot_ms if snapshot_ms is not None else snapshot_ms_of(done)
        if snap > now_ms:
            raise BackfillError(f"{key_dir.name}: snapshot time {snap} ms is in the future (now {now_ms})")
        age_s = (now_ms - snap) / 1000
        if age_s > tombstone_ttl_s and not force:
            raise BackfillError(
                f"{key_dir.name}: snapshot is {age_s / 3600:.1f} h old, more than --tombstone-ttl {tombstone_ttl_s} s: "
                "deletes older than that left no tombstone, so this load could bring deleted posts back. "
                "Re-run the backfill on a fresh snapshot, or pass --force")
        inputs.append((key_dir, done, snap))
    r = redis.Redis.from_url(redis_url, socket_timeout=30, socket_connect_timeout=5)
    if settings.get("ranges") is not None:
        rng = np.asarray(settings["ranges"], dtype="<f4")
        r.hset(store.ranges_key(prefix, tag), mapping=store.ranges_mapping(rng, dim, tag))
    script = r.register_script(store.BACKFILL_STORE_LUA)
    report = LoadReport(announced=announce_stream is not None)
    counts = {store.BACKFILL_STORED: "written", store.BACKFILL_NEWER: "skipped_newer",
              store.BACKFILL_DELETED: "skipped_deleted", store.BACKFILL_SAME: "already_loaded"}
    for key_dir, done, snap in inputs:
        report.snapshots_ms.append(snap)
        done_ms = done.get("finished_ms", now_ms)
        version = store.snapshot_version(snap)
        for part in sorted(key_dir.glob("part-*.parquet")):
            pf = pq.ParquetFile(part)
            for rb in pf.iter_batches(batch_size=batch):
                ids = rb.column(0).to_pylist()
                vecs = from_embedding_column(rb.column(1), precision, dim)
                pipe = r.pipeline(transaction=False)
                for pid, vec in zip(ids, vecs):
                    h = {"vector": store.encode_vector(vec, precision), "model": tag, "dim": str(dim),
                         "precision": precision, "created_ms": done_ms, "embedded_ms": done_ms,
                         "source_id": f"backfill:{key_dir.name}", "version": version}
                    items = [x for kv in h.items() for x in kv]
                    out_only = ["id", pid, "op", "upsert", "consumer", "backfill"]
                    script(keys=[store.hash_key(prefix, pid), store.tombstone_key(prefix, pid),
                                 announce_stream or ""],
                           args=[version, 0, 1 if announce_stream else 0, out_maxlen, len(items), *items, *out_only],
                           client=pipe)
                for code in pipe.execute():
                    name = counts[int(code)]
                    setattr(report, name, getattr(report, name) + 1)
    return report
