"""Rows of the backfill: a record -> (id, text) or the reason it is rejected; embed()'s rows <-> the Arrow
`embedding` column; the map_batches callable that embeds a batch (one Embedder per actor)."""
from __future__ import annotations

import json

import numpy as np

from postembed_fast import inputs
from postembed_fast.kernels.precision import precision_spec


_REJECT_ROW_MAX = 2000  # characters of a rejected row kept in rejects.jsonl


def parse_jsonl_line(raw: bytes):
    """-> (record, None, the line as text) or (None, reason, the line as text for the rejects file).
    The parse and its reasons are inputs.parse_jsonl_line's, as for every command that reads JSONL."""
    rec, reason = inputs.parse_jsonl_line(raw)
    return rec, reason, raw.decode("utf-8", "backslashreplace")


def check_row(rec, text_field: str, id_field: str) -> tuple[str | None, str | None, str | None]:
    """One record -> (id as a string, text, reason it is rejected or None): inputs.check_post (its reasons),
    plus the backfill's own rule that an id is a non-blank key."""
    if not isinstance(rec, dict):  # a caller's record that did not come from parse_jsonl_line
        return None, None, f"not a JSON object ({inputs.type_name(rec)})"
    text, pid, reason = inputs.check_post(rec, text_field, id_field)
    if pid is None:
        return None, None, reason
    pid = str(pid)
    if not pid.strip():
        return None, None, f"empty id ({id_field!r})"
    return pid, text, reason


def embedding_type(precision: str, dim: int):
    """The Arrow type of the `embedding` column: a fixed-size list of floats for the float precisions
    (readable as numbers), else fixed-size binary of the codes, exactly the bytes embed() returns per row."""
    import pyarrow as pa

    spec = precision_spec(precision)
    if spec.is_float:
        return pa.list_(pa.from_numpy_dtype(spec.numpy_dtype), dim)
    return pa.binary(spec.row_bytes(dim))


def embedding_array(rows, precision: str, dim: int):
    """[N, C] numpy from embed() -> a pyarrow array of embedding_type (zero-copy for the float types)."""
    import pyarrow as pa

    spec = precision_spec(precision)
    typ = embedding_type(precision, dim)
    rows = np.ascontiguousarray(rows)
    if spec.is_float:
        flat = pa.array(rows.reshape(-1), type=typ.value_type)
        return pa.FixedSizeListArray.from_arrays(flat, dim)
    buf = pa.py_buffer(rows.astype(spec.wire_dtype, copy=False).view(np.uint8).reshape(-1).tobytes())
    return pa.Array.from_buffers(typ, len(rows), [None, buf])


def from_embedding_column(col, precision: str, dim: int):
    """The inverse of embedding_array: a pyarrow column -> [N, C] numpy of embed()'s dtype."""
    spec = precision_spec(precision)
    col = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    n = len(col)
    if spec.is_float:
        return col.flatten().to_numpy(zero_copy_only=False).reshape(n, dim)
    width = spec.columns(dim)
    raw = col.buffers()[1]
    start = col.offset * spec.row_bytes(dim)
    return np.frombuffer(raw, dtype=spec.wire_dtype, count=n * width,
                         offset=start).reshape(n, width).astype(spec.numpy_dtype)


class EmbedBatch:
    """The map_batches callable: one Embedder per actor, loaded once. A batch of raw rows (JSONL lines
    or Parquet id/text columns, plus `path`) -> a pyarrow table of (path, id, embedding, reason, row):
    good rows have reason null, rejected rows a reason and no embedding; every input row gives one
    output row, so nothing is lost."""

    def __init__(self, *, fmt, model, device, dtype, precision, batch_tokens, text_field, id_field,
                 ranges, threads):
        import torch

        from postembed_fast import Embedder

        if threads:
            torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS from num_cpus; torch's pool too
        self.embedder = Embedder(model, device=device, dtype=dtype)
        self.fmt, self.precision, self.batch_tokens = fmt, precision, batch_tokens
        self.text_field, self.id_field = text_field, id_field
        self.ranges = None if ranges is None else __import__("numpy").asarray(ranges, dtype="float32")
        self.dim = self.embedder.dim

    def _records(self, batch):
        """-> list of (path, id, text, reason, raw row for rejects)."""
        paths = batch.column("path").to_pylist()
        out = []
        if self.fmt == "jsonl":
            for path, raw in zip(paths, batch.column("text").to_pylist()):
                rec, reason, line = parse_jsonl_line(raw)
                if reason is None:
                    pid, text, reason = check_row(rec, self.text_field, self.id_field)
                else:
                    pid, text = None, None
                out.append((path, pid, text, reason, line))
        else:
            names = batch.column_names
            ids = batch.column(self.id_field).to_pylist() if self.id_field in names else [None] * len(paths)
            texts = batch.column(self.text_field).to_pylist() if self.text_field in names else [None] * len(paths)
            for path, pid, text in zip(paths, ids, texts):
                pid2, text2, reason = check_row({self.id_field: pid, self.text_field: text},
                                                self.text_field, self.id_field)
                raw = None if reason is None else json.dumps({"id": pid, "text": text}, default=repr)
                out.append((path, pid2, text2, reason, raw))
        return out

    def _embed(self, texts):
        """One embed() call for the batch; if it raises, post by post, so only the culprits are rejected."""
        kw = dict(precision=self.precision, batch_tokens=self.batch_tokens, ranges=self.ranges)
        try:
            return list(self.embedder.embed(texts, **kw)), {}
        except Exception:  # noqa: BLE001 -- find which post, keep the rest
            pass
        rows, errors = [], {}
        for i, t in enumerate(texts):
            try:
                rows.append(self.embedder.embed([t], **kw)[0])
            except Exception as exc:  # noqa: BLE001
                errors[i] = f"embed failed: {type(exc).__name__}: {exc}"
                rows.append(None)
        return rows, errors

    def __call__(self, batch):
        import pyarrow as pa

        recs = self._records(batch)
        good = [i for i, r in enumerate(recs) if r[3] is None]
        rows, errors = self._embed([recs[i][2] for i in good]) if good else ([], {})
        reasons = [r[3] for r in recs]
        for j, msg in errors.items():
            reasons[good[j]] = msg
        spec = precision_spec(self.precision)
        full = np.zeros((len(recs), spec.columns(self.dim)), dtype=spec.numpy_dtype)
        for j, i in enumerate(good):
            if j not in errors:
                full[i] = rows[j]
        emb = embedding_array(full, self.precision, self.dim)  # rejected rows: zeros, dropped by the sink
        raw = [None if reasons[i] is None else (recs[i][4] or "")[:_REJECT_ROW_MAX] for i in range(len(recs))]
        return pa.table({"path": pa.array([r[0] for r in recs], pa.string()),
                         "id": pa.array([r[1] for r in recs], pa.string()),
                         "embedding": emb,
                         "reason": pa.array(reasons, pa.string()),
                         "row": pa.array(raw, pa.string())})
