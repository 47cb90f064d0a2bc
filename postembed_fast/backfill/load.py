"""A finished backfill output -> the near-line store in Redis (the layout of postembed_fast.nearline.store)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from postembed_fast.backfill.layout import (
    SETTINGS_FILE,
    SUCCESS_FILE,
    BackfillError,
    read_settings,
)
from postembed_fast.backfill.rows import from_embedding_column
from postembed_fast.kernels.precision import precision_spec
from postembed_fast.nearline import store


def load_into(out_dir, redis_url: str, prefix: str = "emb:", batch: int = 1000) -> int:
    """Write a finished output into Redis in the near-line layout (postembed_fast/nearline/store.py): a hash
    `{prefix}{id}` per post (vector = embed()'s bytes, little-endian; model, dim, precision, created_ms
    and embedded_ms = when its input finished, as the backfill does not know the post's creation time;
    source_id = backfill:<input key>) and the ranges under `{prefix}__ranges__:{model}`. Only inputs
    with a _SUCCESS.json are loaded. Returns the number of hashes written."""
    from postembed_fast.nearline.worker import missing_extra

    problem = missing_extra()
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
    r = redis.Redis.from_url(redis_url, socket_timeout=30, socket_connect_timeout=5)
    if settings.get("ranges") is not None:
        rng = np.asarray(settings["ranges"], dtype="<f4")
        r.hset(store.ranges_key(prefix, tag), mapping=store.ranges_mapping(rng, dim, tag))
    n = 0
    for key_dir in sorted(p for p in out_dir.iterdir() if (p / SUCCESS_FILE).exists()):
        done_ms = json.loads((key_dir / SUCCESS_FILE).read_text()).get("finished_ms", int(time.time() * 1000))
        for part in sorted(key_dir.glob("part-*.parquet")):
            pf = pq.ParquetFile(part)
            for rb in pf.iter_batches(batch_size=batch):
                ids = rb.column(0).to_pylist()
                vecs = from_embedding_column(rb.column(1), precision, dim)
                pipe = r.pipeline(transaction=False)
                for pid, vec in zip(ids, vecs):
                    key = store.hash_key(prefix, pid)
                    pipe.delete(key)  # no field of an older version survives (as the near-line worker does)
                    pipe.hset(key, mapping={"vector": store.encode_vector(vec, precision), "model": tag,
                                            "dim": str(dim), "precision": precision, "created_ms": done_ms,
                                            "embedded_ms": done_ms, "source_id": f"backfill:{key_dir.name}"})
                pipe.execute()
                n += len(ids)
    return n
