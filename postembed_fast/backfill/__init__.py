"""Backfill: embed a whole corpus (millions of posts, a new model version) on Ray Data.

    python -m postembed_fast.backfill --input 'posts/*.jsonl.gz' --output emb/ --precision int8
    python -m postembed_fast.backfill --output emb/ --load-into redis://127.0.0.1:6379/0   # load a finished output

Ray Data does the distributed part: its readers stream the input (JSONL read as lines, Parquet by
column), `map_batches` runs a pool of actors that each hold one `Embedder` (loaded once per actor;
GPU actors where the cluster has GPUs, else CPU actors sized to the node's cores), and a datasink
writes Parquet from the workers, so no embedding passes through the driver. Failed tasks are
retried by Ray.

Output layout (DIR = --output), one folder per input file:

    DIR/_backfill.json              model tag, precision, dim, ranges of this output (checked on resume)
    DIR/<key>/part-NNNNNN.parquet    columns id (string), embedding; file metadata postembed.*
    DIR/<key>/rejects.jsonl          rows that could not be embedded: {"input", "id", "reason", "row"}
    DIR/<key>/_SUCCESS.json          written last: the input's path, size and mtime, rows, rejects

`<key>` is the input file's name plus 10 hex digits of a hash of its absolute path. `embedding` is
a fixed-size list of float32/float16 for the float precisions, and fixed-size binary of the codes
(`Embedder.embed(..., precision=p)` bytes) for int8/uint8/binary/ubinary. Rows keep the input order
(Ray Data preserve_order is set) and every row carries its id, so nothing depends on that order.

Resume: an input file is done when its `_SUCCESS.json` exists and records the same size and mtime;
a re-run skips it, and wipes and redoes any other input's folder. Inputs are processed in rounds of
--files-per-round files (one Ray Dataset each, so one actor-pool start per round); a round's
`_SUCCESS.json` files are written when its write completes, so an interrupted job redoes at most
the round in flight. An output folder made with another model or precision is refused.

Modules: inputs.py (files, formats, resume keys), rows.py (a record -> id/text or a reject reason; the
Arrow embedding column; the map_batches callable), sink.py (the Parquet datasink), job.py (settings,
the actor plan, rounds, the command), load.py (into the near-line store), layout.py (the output folder).
A system part: it uses the engine's public API only. Ray and pyarrow are imported inside functions only (`pip install "postembed_fast[backfill]"`).
"""
from __future__ import annotations

import sys

from postembed_fast.backfill.job import main


def __getattr__(name):
    """The names of the former flat module postembed_fast.backfill, now in its submodules."""
    import importlib

    from postembed_fast import _deprecated

    for sub in ("job", "layout", "inputs", "rows", "sink", "load"):
        module = importlib.import_module(f"postembed_fast.backfill.{sub}")
        for cand in (name, name.lstrip("_")):
            if not cand.startswith("__") and cand in vars(module):
                _deprecated.moved(f"postembed_fast.backfill.{name}", f"postembed_fast.backfill.{sub}.{cand}")
                return getattr(module, cand)
    raise AttributeError(f"module 'postembed_fast.backfill' has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
