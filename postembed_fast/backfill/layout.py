"""The backfill's output folder: its file names, its settings file, and reading it back.

    DIR/_backfill.json              model tag, precision, dim, ranges of this output (checked on resume)
    DIR/<key>/part-NNNNNN.parquet    columns id (string), embedding; file metadata postembed.*
    DIR/<key>/rejects.jsonl          rows that could not be embedded: {"input", "id", "reason", "row"}
    DIR/<key>/_SUCCESS.json          written last: the input's path, size and mtime, rows, rejects
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from postembed_fast.backfill.rows import from_embedding_column
from postembed_fast.kernels.precision import precision_spec

SETTINGS_FILE = "_backfill.json"


SUCCESS_FILE = "_SUCCESS.json"


REJECTS_FILE = "rejects.jsonl"


class BackfillError(ValueError):
    """Bad input, settings or output folder: the message names the problem (exit code 2)."""


def read_output(out_dir, with_input: bool = False):
    """(ids list, [N, C] numpy) of every finished input of an output folder, in input order.
    For tests, checks and small outputs; large ones are read part by part (see load_into)."""
    settings = require_settings(out_dir)
    ids, blocks, inputs = [], [], []
    for key_dir, _, part_ids, emb in iter_finished(out_dir):
        ids += part_ids
        blocks.append(emb)
        inputs += [key_dir.name] * len(part_ids)
    spec = precision_spec(settings["precision"])
    emb = np.concatenate(blocks) if blocks else np.empty((0, spec.columns(settings["dim"])), spec.numpy_dtype)
    return (ids, emb, inputs) if with_input else (ids, emb)


def iter_finished(out_dir):
    """(input folder, its _SUCCESS.json, ids, [n, C] numpy) per part file of every finished input, in order."""
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    settings = require_settings(out_dir)
    for key_dir in sorted(p for p in out_dir.iterdir() if (p / SUCCESS_FILE).exists()):
        done = json.loads((key_dir / SUCCESS_FILE).read_text())
        for part in sorted(key_dir.glob("part-*.parquet")):
            t = pq.read_table(part)
            yield (key_dir, done, t.column("id").to_pylist(),
                   from_embedding_column(t.column("embedding"), settings["precision"], settings["dim"]))


def snapshot_ms_of(success: dict) -> int:
    """The snapshot time of an input (ms): its file's mtime as recorded in its _SUCCESS.json: the posts
    it holds are as of that time at the latest."""
    if "mtime_ns" not in success:
        raise BackfillError(f"{success.get('input', '?')}: its {SUCCESS_FILE} records no mtime_ns; "
                            "give --snapshot-ms")
    return int(success["mtime_ns"]) // 1_000_000


def require_settings(out_dir) -> dict:
    settings = read_settings(Path(out_dir))
    if settings is None:
        raise BackfillError(f"{out_dir}: not a backfill output ({SETTINGS_FILE} missing)")
    return settings


def read_settings(out_dir: Path) -> dict | None:
    try:
        return json.loads((Path(out_dir) / SETTINGS_FILE).read_text())
    except FileNotFoundError:
        return None
