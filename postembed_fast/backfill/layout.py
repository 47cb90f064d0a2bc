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
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    settings = read_settings(out_dir)
    if settings is None:
        raise BackfillError(f"{out_dir}: not a backfill output ({SETTINGS_FILE} missing)")
    ids, blocks, inputs = [], [], []
    for key_dir in sorted(p for p in out_dir.iterdir() if (p / SUCCESS_FILE).exists()):
        for part in sorted(key_dir.glob("part-*.parquet")):
            t = pq.read_table(part)
            ids += t.column("id").to_pylist()
            blocks.append(from_embedding_column(t.column("embedding"), settings["precision"], settings["dim"]))
            inputs += [key_dir.name] * t.num_rows
    spec = precision_spec(settings["precision"])
    emb = np.concatenate(blocks) if blocks else np.empty((0, spec.columns(settings["dim"])), spec.numpy_dtype)
    return (ids, emb, inputs) if with_input else (ids, emb)


def read_settings(out_dir: Path) -> dict | None:
    try:
        return json.loads((Path(out_dir) / SETTINGS_FILE).read_text())
    except FileNotFoundError:
        return None
