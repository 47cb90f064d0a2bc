"""Near-line index updater: keep an EmbeddingIndex in step with the worker's output stream and search it.

    python -m postembed_fast.nearline index --redis redis://127.0.0.1:6379/0 --stream posts.embedded \\
        --snapshot /var/lib/postembed/index --port 8081 --device cpu
    curl '127.0.0.1:8081/search?q=hiring+ML+engineers&k=10'

Input: the output stream of `nearline embed` (default `posts.embedded`): `op=upsert` entries carry the
post's `vector` bytes with `model`, `dim` and `precision`; `op=delete` entries carry only the `id`.
Each upsert replaces the post's row (a redelivered or re-embedded post replaces itself); each delete
removes it (a delete of a post the index does not hold is a no-op).

Ids: a post id (a string) becomes the index's int64 id by a stable 63-bit hash (blake2b, 8 bytes,
shifted right by one: always >= 0, the same in every process and on every machine, unlike hash());
the map back to the string is kept in memory and in the snapshot. Two post ids with the same hash
(odds about n^2 / 2^64) cannot both be indexed: the second is skipped with an error log.

Vectors: the index stores what the stream carries (index precision: float32 <- float32, float16 <-
float16, int8 <- int8 / uint8 (uint8 - 128), binary <- binary / ubinary (ubinary - 128)); float
entries can also feed an int8 or binary index (quantized with the query model's ranges). With no
--precision the first upsert (or the snapshot) decides. An entry whose `model` is not the query
model's tag, whose precision cannot feed the index, or whose vector has the wrong length is skipped:
logged at ERROR and counted (`skipped` in GET /info), never mixed into the index.

Queries: GET /search?q=TEXT&k=10 embeds q with an Embedder of the same model (--model; its tag must
equal the snapshot's) and answers {"results": [{"id", "score"}], ...}, best first (scores as in
EmbeddingIndex: binary 8*bytes - Hamming, int8 integer dot, float dot product). GET /health: 200
once the start-up catch-up read reached the end of the stream, 503 before. GET /info: counts, the
last applied stream id, snapshot time, skipped entries. Errors: {"error": {"message", "type", "code"}}.

Snapshots: every --snapshot-every seconds (when something changed) and at SIGTERM/SIGINT, the index
(EmbeddingIndex.save), the post ids and the id of the last applied stream entry are written to a new
folder DIR/snap-*, then DIR/CURRENT (a one-line file naming it) is replaced atomically; older folders
are removed after. A crash at any point leaves CURRENT naming a complete snapshot. At start the
snapshot named by CURRENT is loaded and reading resumes right after its last stream id: the entries
it already holds are not read again, the later ones are applied (re-applying one would be harmless:
upserts and deletes are idempotent).

Heavy imports (redis, starlette, uvicorn, the model) happen inside the functions that need them.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from postembed_fast.cli_args import non_negative_float, positive_int
from postembed_fast.kernels.precision import TABLE
from postembed_fast.nearline import store
from postembed_fast.options import ModelOptions, add_model_args

log = logging.getLogger("postembed_fast.nearline.index")

SNAPSHOT_FORMAT = "postembed_fast.nearline.index/1"
BACKFILL_VERSIONS_FILE = "backfill_versions.npy"  # [2, n] int64: ids, backfill snapshot ms (optional)
# stream precision -> the index precision holding it as is (the precision table's)
INDEX_PRECISION = {name: spec.index_precision for name, spec in TABLE.items()}


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexConfig(ModelOptions):
    """The index updater's settings; model, device, dtype, batch_tokens (the query encoder's) are
    ModelOptions' (keyword-only)."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    stream: str = "posts.embedded"
    snapshot_dir: str = "postembed-index"
    host: str = "127.0.0.1"
    port: int = 8081
    snapshot_every_s: float = 30.0
    precision: str | None = None  # index precision; None: the snapshot's, else the first upsert's
    prefix: str = "emb:"  # the worker's key prefix (only its ranges hash is read, to check int8 codes)
    read_count: int = 1000  # entries per XREAD
    block_ms: int = 1000  # longest XREAD block (how fast a stop is noticed)
    max_k: int = 1000
    max_query_chars: int = 2000
    log_level: str = "info"
    from_backfill: str | None = None  # a backfill output folder seeding an index that has no snapshot yet

    @classmethod
    def from_args(cls, a) -> "IndexConfig":
        return super().from_args(a, redis_url=a.redis, stream=a.stream, snapshot_dir=a.snapshot, host=a.host,
                                 port=a.port, snapshot_every_s=a.snapshot_every, precision=a.precision,
                                 prefix=a.prefix, max_k=a.max_k, log_level=a.log_level,
                                 from_backfill=a.from_backfill)


def add_index_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `nearline index` (shared by `postembed-fast nearline index`)."""
    d = IndexConfig()
    g = p.add_argument_group("redis")
    g.add_argument("--redis", default=d.redis_url, metavar="URL", help=f"Redis URL (default {d.redis_url})")
    g.add_argument("--stream", default=d.stream, help="the embed worker's output stream (default %(default)s)")
    g.add_argument("--prefix", default=d.prefix,
                   help="the embed worker's key prefix, to read its int8 ranges (default %(default)s)")
    i = p.add_argument_group("index")
    i.add_argument("--snapshot", required=True, metavar="DIR",
                   help="snapshot folder: loaded at start (resume), written every --snapshot-every s and at exit")
    i.add_argument("--snapshot-every", type=non_negative_float, default=d.snapshot_every_s, metavar="S",
                   help="seconds between snapshots (default %(default)s; 0: only at exit)")
    i.add_argument("--precision", default=None, choices=tuple(dict.fromkeys(INDEX_PRECISION.values())),
                   help="index precision (default: the snapshot's, else what the first stream entry carries)")
    i.add_argument("--from-backfill", default=None, metavar="DIR",
                   help="build the index from this backfill output (`postembed-fast backfill -o DIR`) when "
                        "--snapshot holds none, then follow the stream; a stream entry older than a post's "
                        "backfill snapshot (its input's mtime) does not replace it. The path for a model switch")
    i.add_argument("--max-k", type=positive_int, default=d.max_k, metavar="N",
                   help="largest k a search may ask for (default %(default)s)")
    h = p.add_argument_group("http")
    h.add_argument("--host", default=d.host, help="bind address (default %(default)s: loopback only)")
    h.add_argument("--port", type=int, default=d.port, help="port of GET /search (default %(default)s)")
    h.add_argument("--log-level", default=d.log_level, choices=("critical", "error", "warning", "info", "debug"))
    add_model_args(p)


# ---------------------------------------------------------------------------------------------
# snapshots
# ---------------------------------------------------------------------------------------------
def save_snapshot(folder, index, post_ids: dict[int, str], last_id: str, meta: dict,
                  backfill_ms: dict[int, int] | None = None) -> Path:
    """Write a snapshot into a new folder under `folder` and point DIR/CURRENT at it (atomically).
    `backfill_ms`: {int id: snapshot ms} of posts seeded from a backfill (kept so that an older stream
    entry read after a restart still does not replace them). Returns the new snapshot's folder."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    name = f"snap-{last_id.replace('-', '_')}-{time.time_ns()}"
    tmp = root / f".tmp-{name}"
    tmp.mkdir()
    rows = [] if index is None else [post_ids[int(i)] for i in index.ids]  # row order, as the index holds them
    state = dict(meta, format=SNAPSHOT_FORMAT, last_id=last_id, saved_ms=int(time.time() * 1000),
                 count=len(rows), post_ids=rows, has_index=index is not None)
    if index is not None:
        index.save(tmp / "index")
    if backfill_ms:
        np.save(tmp / BACKFILL_VERSIONS_FILE, np.array([list(backfill_ms), list(backfill_ms.values())], np.int64))
    (tmp / "state.json").write_text(json.dumps(state) + "\n")
    _fsync_tree(tmp)
    final = root / name
    os.rename(tmp, final)  # a complete folder appears under its final name in one step
    cur = root / "CURRENT.tmp"
    cur.write_text(name + "\n")
    with open(cur, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(cur, root / "CURRENT")  # the switch: CURRENT names the old or the new snapshot, never neither
    _fsync_dir(root)
    for old in root.iterdir():  # the previous snapshots, and temp folders of interrupted saves
        if old.name != name and (old.name.startswith("snap-") or old.name.startswith(".tmp-")):
            shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename order still holds
    finally:
        os.close(fd)


def load_snapshot(folder, device=None):
    """-> (index or None, {int id: post id}, last stream id, state dict), or None when `folder` holds
    no snapshot. ValueError when CURRENT names a missing or inconsistent snapshot."""
    from postembed_fast.search import EmbeddingIndex

    root = Path(folder)
    cur = root / "CURRENT"
    if not cur.exists():
        return None
    snap = root / cur.read_text().strip()
    try:
        state = json.loads((snap / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        raise ValueError(f"{snap}: snapshot named by {cur} is unreadable ({exc})") from None
    if state.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"{snap}: unknown snapshot format {state.get('format')!r} (expected {SNAPSHOT_FORMAT!r})")
    index = EmbeddingIndex.load(snap / "index", device=device) if state["has_index"] else None
    ids = [] if index is None else [int(i) for i in index.ids]
    post_ids = state["post_ids"]
    if len(post_ids) != len(ids) or any(store.post_key(p) != i for p, i in zip(post_ids, ids)):
        raise ValueError(f"{snap}: the post ids do not match the index ids (a corrupt or hand-edited snapshot)")
    versions = snap / BACKFILL_VERSIONS_FILE
    if versions.exists():
        keys, ms = np.load(versions)
        state["backfill_ms"] = dict(zip(keys.tolist(), ms.tolist()))
    return index, dict(zip(ids, post_ids)), state["last_id"], state


# ---------------------------------------------------------------------------------------------
# the updater
# ---------------------------------------------------------------------------------------------
class IndexUpdater:
    """Reads the output stream from the last applied id, applies upserts/deletes to an EmbeddingIndex,
    snapshots it, and answers searches. One thread applies (run/poll_once); any thread may search."""

    def __init__(self, cfg: IndexConfig, embedder=None, client=None):
        import redis

        self.cfg = cfg
        self.redis_mod = redis
        if embedder is None:
            from postembed_fast import Embedder

            embedder = Embedder(cfg.model, device=cfg.device, dtype=cfg.dtype)
        self.embedder = embedder
        self.model_tag = embedder.model_tag
        self.r = client or redis.Redis.from_url(cfg.redis_url, socket_timeout=cfg.block_ms / 1000 + 10,
                                                socket_connect_timeout=2, socket_keepalive=True)
        # Mutations (the applier thread) and searches exclude each other: EmbeddingIndex.remove
        # compacts rows in place. Snapshots are written by the applier thread itself, so they need
        # no lock against mutations, and searches (readers) may run while one is being written.
        self.lock = threading.Lock()
        self.index = None
        self.post_ids: dict[int, str] = {}
        self.last_id = "0-0"
        self.applied = self.skipped = 0
        self.last_skip_reason: str | None = None
        self.dirty = False
        self.caught_up = False
        self.last_snapshot_ms: int | None = None
        self._ranges_checked: set[str] = set()
        self._trim_checked = False
        # Posts seeded from a backfill: {int id: its input's snapshot ms}. A stream entry made from an input
        # entry older than that (its source_id) is older than the backfilled vector and does not replace it.
        self.backfill_ms: dict[int, int] = {}
        self.skipped_older = 0
        loaded = load_snapshot(cfg.snapshot_dir)
        if loaded is not None:
            index, post_ids, last_id, state = loaded
            if state.get("model_tag") != self.model_tag:
                raise ValueError(f"the snapshot in {cfg.snapshot_dir} holds vectors of model "
                                 f"{state.get('model_tag')!r}, the query model is {self.model_tag!r}: pass the same "
                                 "--model, or a new --snapshot folder to rebuild")
            if state.get("stream") != cfg.stream:
                raise ValueError(f"the snapshot in {cfg.snapshot_dir} follows stream {state.get('stream')!r}, not "
                                 f"{cfg.stream!r}")
            if index is not None and cfg.precision and index.precision != cfg.precision:
                raise ValueError(f"the snapshot's index precision is {index.precision}, --precision is "
                                 f"{cfg.precision}: drop --precision, or use a new --snapshot folder")
            self.index, self.post_ids, self.last_id = index, post_ids, last_id
            self.backfill_ms = state.get("backfill_ms", {})
            self.last_snapshot_ms = state.get("saved_ms")
            log.info("loaded snapshot of %s: %d posts, resuming after stream id %s", cfg.snapshot_dir,
                     len(post_ids), last_id)
            if cfg.from_backfill:
                log.info("--from-backfill %s not read: the snapshot already holds the index", cfg.from_backfill)
        if self.index is None and cfg.precision:
            self.index = self._new_index(cfg.precision)
        if loaded is None and cfg.from_backfill:
            self.seed_from_backfill(cfg.from_backfill)

    def _new_index(self, precision: str):
        from postembed_fast.search import EmbeddingIndex

        if precision == "int8" and self.embedder.quantization_ranges is None:
            raise ValueError(f"an int8 index needs quantization ranges and model {self.model_tag} has none")
        return EmbeddingIndex.for_embedder(self.embedder, precision=precision)

    def seed_from_backfill(self, out_dir) -> int:
        """Add every post of a finished backfill output (postembed_fast.backfill.layout) to the index, each
        versioned by its input's snapshot time; the stream is then read from its start. Returns the count."""
        from postembed_fast.backfill import layout

        settings = layout.require_settings(out_dir)
        if settings["model"] != self.model_tag:
            raise ValueError(f"--from-backfill {out_dir} holds vectors of model {settings['model']!r}, the query "
                             f"model is {self.model_tag!r}: pass the backfill's --model")
        precision = settings["precision"]
        if precision not in INDEX_PRECISION:
            raise ValueError(f"--from-backfill {out_dir}: unknown precision {precision!r}")
        if self.index is None:
            self.index = self._new_index(INDEX_PRECISION[precision])
        ip = self.index.precision
        if not TABLE[precision].is_float and INDEX_PRECISION[precision] != ip:
            raise ValueError(f"--from-backfill {out_dir}: {precision} codes cannot go into a {ip} index")
        if TABLE[precision].needs_ranges and not np.array_equal(
                np.asarray(settings.get("ranges"), np.float32).reshape(self.index.ranges.shape), self.index.ranges):
            raise ValueError(f"--from-backfill {out_dir}: its int8 codes were made with other ranges than the "
                             "query model's")
        seeded = 0
        for _, done, ids, vecs in layout.iter_finished(out_dir):
            ms = layout.snapshot_ms_of(done)
            kept = self._upsert(ids, vecs, entry_id=f"backfill:{Path(out_dir).name}")
            self.backfill_ms.update((store.post_key(pid), ms) for pid in kept)
            seeded += len(kept)
        self.dirty = True
        log.info("seeded %d posts from backfill %s (index precision %s)", seeded, out_dir, ip)
        return seeded

    def _upsert(self, pids, vecs, entry_id: str) -> list[str]:
        """Upsert rows (post ids, vectors the index takes); a post whose 63-bit id another post holds is
        skipped. Returns the post ids added."""
        ups, ups_vecs, owner_of = [], [], {}
        for pid, vec in zip(pids, vecs):
            key = store.post_key(pid)
            owner = self.post_ids.get(key) or owner_of.setdefault(key, pid)
            if owner != pid:
                self._skip(entry_id, pid, f"its 63-bit id {key} is taken by post {owner!r} (hash collision)")
                continue
            ups.append((key, pid))
            ups_vecs.append(vec)
        if ups:
            with self.lock:
                self.index.add(np.stack(ups_vecs), ids=np.asarray([k for k, _ in ups], np.int64), upsert=True)
                self.post_ids.update(ups)
        return [pid for _, pid in ups]

    def _older_than_backfill(self, pid: str, f: dict) -> bool:
        """True when this entry was made from an input entry older than the post's backfilled vector."""
        if not self.backfill_ms:
            return False
        ms = self.backfill_ms.get(store.post_key(pid))
        source = store.as_str(f.get("source_id", b""))
        if ms is None or not source[:1].isdigit():
            return False
        if store.id_tuple(source) < store.id_tuple(store.snapshot_version(ms)):
            self.skipped_older += 1
            return True
        del self.backfill_ms[store.post_key(pid)]  # a newer entry replaced it: plain stream rules from now on
        return False

    # ---- reading -------------------------------------------------------------------------
    def poll_once(self, block_ms: int | None = None) -> int:
        """One XREAD after the last applied id, applied. Returns the number of entries read."""
        # XREAD from our own last id rather than a consumer group: every replica of the index must
        # see every entry (a group would split them among replicas), and the position must be saved
        # with the data it produced (in the snapshot), not acked in Redis ahead of a snapshot that a
        # crash could then lose.
        if not self._trim_checked:
            self._check_trimmed()
        resp = self.r.xread({self.cfg.stream: self.last_id}, count=self.cfg.read_count, block=block_ms)
        rows = []
        if resp:
            if isinstance(resp, dict):  # RESP3
                rows = next(iter(resp.values()))
                rows = rows[0] if rows and isinstance(rows[0], list) else rows
            else:
                rows = resp[0][1]
        if rows:
            self.apply([(store.as_str(i), f) for i, f in rows])
        if len(rows) < self.cfg.read_count and not self.caught_up:
            self.caught_up = True
            log.info("caught up with %s at %s: %d posts indexed", self.cfg.stream, self.last_id, len(self.post_ids))
        return len(rows)

    def _check_trimmed(self) -> None:
        """Warn when the stream lost entries we never read (trimmed with --out-maxlen, or deleted)."""
        try:
            info = self.r.xinfo_stream(self.cfg.stream)
        except self.redis_mod.ResponseError:
            self._trim_checked = True
            return  # no stream yet: nothing was lost
        self._trim_checked = True  # (not before: a connection error retries the check)
        # Redis 7: entries-added counts every entry ever added; fewer left means some were removed
        # (XTRIM / MAXLEN / XDEL). If the oldest one left is after our position, some of the removed
        # ones may be after it too: entries this index never applied.
        removed = int(info.get("entries-added") or 0) - int(info.get("length") or 0)
        first = info.get("first-entry")
        if removed > 0 and first and store.id_tuple(store.as_str(first[0])) > store.id_tuple(self.last_id):
            log.error("stream %s had %d entries removed and now starts at %s, after this index's position %s: "
                      "posts may be missing (rebuild the index from the stored hashes, or run the embed worker "
                      "without --out-maxlen)", self.cfg.stream, removed, store.as_str(first[0]), self.last_id)

    def _skip(self, entry_id: str, pid: str, reason: str) -> None:
        self.skipped += 1
        self.last_skip_reason = f"{entry_id} ({pid}): {reason}"
        if self.skipped <= 10 or self.skipped % 1000 == 0:
            log.error("skipped entry %s of post %r: %s (%d skipped so far)", entry_id, pid, reason, self.skipped)

    def _convert(self, entry_id: str, pid: str, f: dict):
        """An upsert's vector in a form the index takes, or None (skipped, with the reason logged)."""
        model = store.as_str(f.get("model", b""))
        if model != self.model_tag:
            self._skip(entry_id, pid, f"model {model!r} is not the query model {self.model_tag!r}")
            return None
        precision = store.as_str(f.get("precision", b""))
        if precision not in INDEX_PRECISION:
            self._skip(entry_id, pid, f"unknown precision {precision!r}")
            return None
        if self.index is None:  # no --precision and no snapshot: the first upsert decides
            self.index = self._new_index(INDEX_PRECISION[precision])
            log.info("index precision %s (from the first upsert, %s)", self.index.precision, entry_id)
        ip = self.index.precision
        if not TABLE[precision].is_float and INDEX_PRECISION[precision] != ip:
            self._skip(entry_id, pid, f"{precision} codes cannot go into a {ip} index")
            return None
        try:
            dim = int(f.get("dim", b"0"))
            vec = store.decode_vector(f.get("vector", b""), precision, dim)
        except ValueError as exc:
            self._skip(entry_id, pid, str(exc))
            return None
        if dim != self.index.dim:
            self._skip(entry_id, pid, f"dim {dim}, the index has {self.index.dim}")
            return None
        if TABLE[precision].needs_ranges and not self._ranges_match(model):
            self._skip(entry_id, pid, "its int8 codes were made with other ranges than the query model's")
            return None
        return vec

    def _ranges_match(self, model: str) -> bool:
        """int8 codes are only comparable under the same ranges: check the worker's once per model."""
        if model in self._ranges_checked:
            return True
        h = self.r.hgetall(store.ranges_key(self.cfg.prefix, model))
        if h and b"ranges" in h:
            theirs = np.frombuffer(h[b"ranges"], "<f4")
            if theirs.size != self.index.ranges.size or not np.array_equal(theirs.reshape(2, -1), self.index.ranges):
                return False
        self._ranges_checked.add(model)  # absent (another prefix, or expired): trust the model tag
        return True

    def apply(self, rows) -> None:
        """Apply (entry id, fields) rows in stream order: the last op of each post wins."""
        final: dict[str, tuple[str, dict]] = {}  # post id -> (op, fields) of its last entry here
        for entry_id, fields in rows:
            f = {store.as_str(k): v for k, v in fields.items()}
            pid = store.as_str(f.get("id", b""))
            op = store.as_str(f.get("op", b"upsert"))
            if not pid:
                self._skip(entry_id, pid, "no id")
                continue
            if op in ("upsert", "delete") and self._older_than_backfill(pid, f):
                continue
            if op == "delete":
                final[pid] = ("delete", entry_id, None)
            elif op == "upsert":
                vec = self._convert(entry_id, pid, f)
                if vec is not None:
                    final[pid] = ("upsert", entry_id, vec)
            else:
                self._skip(entry_id, pid, f"unknown op {op!r}")
        ups, ups_vecs, dels = [], [], []  # ups: (key, post id)
        batch_owner: dict[int, str] = {}
        for pid, (op, entry_id, vec) in final.items():
            key = store.post_key(pid)
            indexed = self.post_ids.get(key)
            owner = indexed or batch_owner.setdefault(key, pid)
            if owner != pid:
                self._skip(entry_id, pid, f"its 63-bit id {key} is taken by post {owner!r} (hash collision)")
                continue
            if op == "upsert":
                ups.append((key, pid))
                ups_vecs.append(vec)
            elif indexed is not None:  # deleting a post never indexed (or already deleted) is a no-op
                dels.append(key)
        with self.lock:
            if ups:
                self.index.add(np.stack(ups_vecs), ids=np.asarray([k for k, _ in ups], np.int64), upsert=True)
                self.post_ids.update(ups)
            if dels:
                self.index.remove(np.asarray(dels, np.int64))
                for key in dels:
                    del self.post_ids[key]
            self.last_id = store.as_str(rows[-1][0])
            self.applied += len(rows)
        self.dirty = True

    # ---- snapshots -----------------------------------------------------------------------
    def snapshot(self) -> Path | None:
        """Write a snapshot if anything changed since the last one (called by the applier thread)."""
        if not self.dirty and self.last_snapshot_ms is not None:
            return None
        meta = {"stream": self.cfg.stream, "model_tag": self.model_tag,
                "precision": None if self.index is None else self.index.precision}
        t0 = time.perf_counter()
        path = save_snapshot(self.cfg.snapshot_dir, self.index, dict(self.post_ids), self.last_id, meta,
                             {k: v for k, v in self.backfill_ms.items() if k in self.post_ids})
        self.dirty = False
        self.last_snapshot_ms = int(time.time() * 1000)
        log.info("snapshot %s: %d posts up to stream id %s (%.2f s)", path.name, len(self.post_ids), self.last_id,
                 time.perf_counter() - t0)
        return path

    def run(self, stop: threading.Event) -> None:
        """The applier loop: read and apply, snapshot every --snapshot-every s; Redis errors are
        retried with backoff. Returns when `stop` is set (the caller takes the final snapshot)."""
        redis = self.redis_mod
        every = self.cfg.snapshot_every_s
        next_snap = time.monotonic() + every
        delay = 0.1
        while not stop.is_set():
            try:
                self.poll_once(self.cfg.block_ms)
                delay = 0.1
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("redis unavailable (%s: %s); retry in %.1f s", type(exc).__name__, exc, delay)
                stop.wait(delay)
                delay = min(delay * 2, 5.0)
            if every and time.monotonic() >= next_snap:
                next_snap = time.monotonic() + every
                try:
                    self.snapshot()
                except OSError as exc:  # a full disk must not stop the index from serving
                    log.error("snapshot to %s failed: %s", self.cfg.snapshot_dir, exc)

    # ---- search --------------------------------------------------------------------------
    def search(self, q: str, k: int) -> dict:
        """Embed `q` with the query model and return the top k posts (fewer when the index holds fewer)."""
        query = self.embedder.embed([q], precision="float32", batch_tokens=self.cfg.batch_tokens)
        with self.lock:
            n = 0 if self.index is None else len(self.index)
            results = []
            if n:
                scores, ids = self.index.search(query, k=min(k, n), model_tag=self.model_tag)
                results = [{"id": self.post_ids[int(i)], "score": float(s)}
                           for s, i in zip(scores[0], ids[0]) if i >= 0]
            return {"results": results, "k": k, "count": n, "model": self.model_tag,
                    "precision": None if self.index is None else self.index.precision, "last_id": self.last_id}

    def info(self) -> dict:
        return {"stream": self.cfg.stream, "model": self.model_tag, "dim": self.embedder.dim,
                "precision": None if self.index is None else self.index.precision, "count": len(self.post_ids),
                "last_id": self.last_id, "applied": self.applied, "skipped": self.skipped,
                "skipped_older_than_backfill": self.skipped_older, "backfilled": len(self.backfill_ms),
                "last_skip_reason": self.last_skip_reason, "caught_up": self.caught_up,
                "snapshot_dir": str(self.cfg.snapshot_dir), "last_snapshot_ms": self.last_snapshot_ms}


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------
def create_app(updater: IndexUpdater):
    """GET /search, /health, /info over an IndexUpdater (whose applier runs elsewhere), on the package's
    HTTP shell (postembed_fast.serve.http): its error envelope (404/405 included) and request metrics
    on GET /metrics. No auth: it binds loopback by default."""
    from starlette.requests import Request
    from starlette.routing import Route

    from postembed_fast.serve import http
    from postembed_fast.serve.metrics import RequestMetrics

    cfg = updater.cfg
    # one thread embeds queries: the Embedder is not meant to run two calls at once, and the event
    # loop must stay free meanwhile
    pool = ThreadPoolExecutor(1, thread_name_prefix="query-embed")

    def invalid(message: str, code: str) -> http.ApiError:
        return http.ApiError(422, message, "invalid_request_error", code)

    @http.endpoint("/search")
    async def search(request: Request):
        q = request.query_params.get("q")
        if q is None or not q.strip():
            raise invalid("missing query: pass ?q=TEXT (non-empty)", "missing_q")
        if len(q) > cfg.max_query_chars:
            raise invalid(f"q has {len(q)} characters; at most {cfg.max_query_chars}", "q_too_long")
        k_raw = request.query_params.get("k", "10")
        try:
            k = int(k_raw)
        except ValueError:
            raise invalid(f"k must be an integer, got {k_raw!r}", "invalid_k") from None
        if not 1 <= k <= cfg.max_k:
            raise invalid(f"k must be in [1, {cfg.max_k}], got {k}", "invalid_k")
        try:
            out = await asyncio.get_running_loop().run_in_executor(pool, updater.search, q, k)
        except ValueError as exc:  # a text the tokenizer refuses (e.g. a lone surrogate)
            raise invalid(str(exc), "invalid_q") from None
        return http.json_response(out)

    @http.endpoint("/health", auth=False)
    async def health(request: Request):
        if not updater.caught_up:
            return http.json_response({"status": "catching_up", "last_id": updater.last_id}, 503,
                                      {"Retry-After": "1"})
        return http.json_response({"status": "ok"})

    @http.endpoint("/info")
    async def info(request: Request):
        return http.json_response(updater.info())

    app = http.create_app([Route("/search", search, methods=["GET"]), Route("/health", health, methods=["GET"]),
                           Route("/info", info, methods=["GET"])], metrics=RequestMetrics())
    app.state.pool = pool
    return app


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def missing_extra() -> str | None:
    from postembed_fast.cli_args import missing_extra as missing

    return missing("nearline,serve", "redis", "starlette", "uvicorn", "orjson", "prometheus_client")


def run_index(cfg: IndexConfig) -> int:
    """Load (or start) the index, apply the stream in a thread, serve HTTP until SIGTERM/SIGINT, then
    stop the applier and take a final snapshot. 0 on a clean stop, 1 if the server could not start."""
    from postembed_fast.serve.http import Server

    updater = IndexUpdater(cfg)
    updater.embedder.embed(["warm up the query encoder"])
    app = create_app(updater)
    server = Server(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, lifespan="off")
    stop, failed = threading.Event(), []

    def apply_loop():
        try:
            updater.run(stop)
        except Exception as exc:  # noqa: BLE001 -- an index that stopped following must not keep answering
            log.exception("the applier failed; stopping the server (the last snapshot stands)")
            failed.append(exc)
            server.should_exit = True

    applier = threading.Thread(target=apply_loop, name="index-applier", daemon=True)
    applier.start()
    started = server.run_until_signal()  # SIGTERM/SIGINT: drained, then the final snapshot below
    stop.set()
    applier.join(timeout=cfg.block_ms / 1000 + 30)
    app.state.pool.shutdown(wait=False)
    if failed or applier.is_alive():
        if applier.is_alive():
            log.error("the applier did not stop; no final snapshot (the last periodic one stands)")
        return 1
    updater.snapshot()
    log.info("stopped: %d posts, last stream id %s", len(updater.post_ids), updater.last_id)
    return 0 if started else 1


def run_from_args(args, prog: str) -> int:
    problem = missing_extra()
    if problem:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return 2
    cfg = IndexConfig.from_args(args)
    logging.basicConfig(level=os.environ.get("POSTEMBED_LOG_LEVEL", cfg.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_index(cfg)
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
