"""The Parquet datasink: each Ray task writes its rows into the folder of their input file."""
from __future__ import annotations

import json
import os
from pathlib import Path

from postembed_fast.backfill.inputs import input_key
from postembed_fast.backfill.rows import embedding_type


def parquet_metadata(settings: dict, path: str) -> dict:
    meta = {"postembed.model": settings["model"], "postembed.precision": settings["precision"],
            "postembed.dim": str(settings["dim"]), "postembed.input": path}
    if settings.get("ranges") is not None:
        meta["postembed.ranges"] = json.dumps(settings["ranges"])
    return meta


def make_sink(out_dir: str, settings: dict):
    from ray.data import Datasink

    class PerInputParquetSink(Datasink):
        """Writes each task's rows into the folder of their input file: part-<task>.parquet (embeddings,
        keyed by id) and rejects-<task>.jsonl. File names depend only on the task index, and a file
        is renamed into place when complete, so a retried task overwrites instead of duplicating."""

        def __init__(self):
            self.stats: dict[str, dict] = {}  # filled on the driver by on_write_complete

        def on_write_complete(self, write_result):
            for part in write_result.write_returns:
                for path, s in (part or {}).items():
                    t = self.stats.setdefault(path, {"rows": 0, "rejects": 0})
                    t["rows"] += s["rows"]
                    t["rejects"] += s["rejects"]

        def write(self, blocks, ctx):
            import pyarrow as pa
            import pyarrow.compute as pc
            import pyarrow.parquet as pq

            tables = [b for b in blocks if b.num_rows]
            stats: dict[str, dict] = {}
            if not tables:
                return stats
            t = pa.concat_tables(tables)
            for path in pc.unique(t.column("path")).to_pylist():
                part = t.filter(pc.equal(t.column("path"), path))
                d = Path(out_dir) / input_key(path)
                d.mkdir(parents=True, exist_ok=True)
                ok_mask = pc.is_null(part.column("reason"))
                ok = part.filter(ok_mask).select(["id", "embedding"])
                bad = part.filter(pc.invert(ok_mask))
                name = f"{ctx.task_idx:06d}"
                if ok.num_rows:
                    schema = pa.schema([("id", pa.string()),
                                        ("embedding", embedding_type(settings["precision"], settings["dim"]))],
                                       metadata=parquet_metadata(settings, path))
                    tmp = d / f".part-{name}.parquet.tmp"
                    pq.write_table(ok.cast(schema), tmp)
                    os.replace(tmp, d / f"part-{name}.parquet")
                if bad.num_rows:
                    tmp = d / f".rejects-{name}.jsonl.tmp"
                    with open(tmp, "w", encoding="utf-8") as f:
                        for pid, reason, row in zip(bad.column("id").to_pylist(), bad.column("reason").to_pylist(),
                                                    bad.column("row").to_pylist()):
                            f.write(json.dumps({"input": path, "id": pid, "reason": reason, "row": row},
                                               ensure_ascii=False) + "\n")
                    os.replace(tmp, d / f"rejects-{name}.jsonl")
                s = stats.setdefault(path, {"rows": 0, "rejects": 0})
                s["rows"] += ok.num_rows
                s["rejects"] += bad.num_rows
            return stats

    return PerInputParquetSink()
