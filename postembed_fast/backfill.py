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

Ray and pyarrow are imported inside functions only (`pip install "postembed_fast[backfill]"`).
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from postembed_fast.cli_args import add_model_args, positive_int

PROG = "python -m postembed_fast.backfill"
SETTINGS_FILE = "_backfill.json"
SUCCESS_FILE = "_SUCCESS.json"
REJECTS_FILE = "rejects.jsonl"
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz", ".json", ".json.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
FLOAT_PRECISIONS = ("float32", "float16")
_REJECT_ROW_MAX = 2000  # characters of a rejected row kept in rejects.jsonl


class BackfillError(ValueError):
    """Bad input, settings or output folder: the message names the problem (exit code 2)."""


def missing_extra() -> str | None:
    from postembed_fast.cli_args import missing_extra as missing

    return missing("backfill", "pyarrow", "ray", "ray.data")


# ---------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------
@dataclass
class Config:
    output: str
    inputs: list[str] = field(default_factory=list)  # paths, globs or folders
    model: str | None = None
    device: str | None = None  # None: GPU actors if the cluster has GPUs; "cpu"; "cuda"
    dtype: str | None = None
    batch_tokens: int | None = None
    precision: str = "float32"
    text_field: str = "text"
    id_field: str = "id"
    ray_address: str | None = None  # None: a running cluster if there is one, else a local one
    gpus_per_worker: float | None = None
    cpus_per_worker: float | None = None
    workers: int | None = None
    batch_size: int = 1024
    files_per_round: int = 8
    load_into: str | None = None
    prefix: str = "emb:"
    progress: bool = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    from postembed_fast.kernels.precision import PRECISIONS

    g = p.add_argument_group("input / output")
    g.add_argument("--input", action="append", default=[], metavar="PATH_OR_GLOB", dest="inputs",
                   help="JSONL(.gz) or Parquet files: a path, a glob or a folder (repeatable)")
    g.add_argument("--output", required=True, metavar="DIR", help="output folder (one sub-folder per input file)")
    g.add_argument("--text-field", default="text", help="field/column holding the post (default %(default)s)")
    g.add_argument("--id-field", default="id", help="field/column holding the post id (default %(default)s)")
    g.add_argument("--precision", default="float32", choices=PRECISIONS, help="default %(default)s")
    g.add_argument("--files-per-round", type=positive_int, default=8, metavar="N",
                   help="input files per Ray Dataset; the resume granularity (default %(default)s)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no Ray Data progress bars")
    r = p.add_argument_group("ray")
    r.add_argument("--ray-address", default=None, metavar="auto|local|ADDR",
                   help="auto: a running cluster; local: start one on this machine (loopback only); "
                        "default: a running cluster if there is one, else local")
    r.add_argument("--gpus-per-worker", type=float, default=None, metavar="N",
                   help="GPUs per embedding actor (default 1 where the cluster has GPUs; 0: CPU actors)")
    r.add_argument("--cpus-per-worker", type=float, default=None, metavar="N",
                   help="CPUs per actor = its torch threads (default: GPU actors 2; CPU actors the node's cores)")
    r.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="embedding actors (default: one per GPU, or one per node for CPU actors)")
    r.add_argument("--batch-size", type=positive_int, default=1024, metavar="N",
                   help="posts per map_batches batch = per embed() call (default %(default)s)")
    k = p.add_argument_group("near-line store")
    k.add_argument("--load-into", default=None, metavar="redis://...",
                   help="after the backfill (or alone, without --input), write the output into Redis in "
                        "the near-line layout (needs the nearline extra)")
    k.add_argument("--prefix", default="emb:", help="key prefix of the hashes (default %(default)s); "
                   "a new model version can go under a new prefix and readers switch to it")
    add_model_args(p)


def config_from_args(a) -> Config:
    return Config(output=a.output, inputs=a.inputs, model=a.model, device=a.device, dtype=a.dtype,
                  batch_tokens=a.batch_tokens, precision=a.precision, text_field=a.text_field,
                  id_field=a.id_field, ray_address=a.ray_address, gpus_per_worker=a.gpus_per_worker,
                  cpus_per_worker=a.cpus_per_worker, workers=a.workers, batch_size=a.batch_size,
                  files_per_round=a.files_per_round, load_into=a.load_into, prefix=a.prefix,
                  progress=a.progress)


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def input_format(path: str) -> str:
    name = path.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    raise BackfillError(f"{path}: unknown input format (JSONL: {', '.join(JSONL_SUFFIXES)}; "
                        f"Parquet: {', '.join(PARQUET_SUFFIXES)})")


def expand_inputs(specs: list[str]) -> list[str]:
    """Paths, globs and folders -> sorted absolute file paths (each once). Nothing matching is an error."""
    files: list[str] = []
    for spec in specs:
        if os.path.isdir(spec):
            found = [os.path.join(dp, f) for dp, _, fs in os.walk(spec) for f in fs
                     if f.lower().endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES)]
        elif glob.has_magic(spec):
            found = [f for f in glob.glob(spec, recursive=True) if os.path.isfile(f)]
        else:
            if not os.path.isfile(spec):
                raise BackfillError(f"{spec}: no such input file")
            found = [spec]
        if not found:
            raise BackfillError(f"{spec}: matches no input file")
        files += found
    out = sorted({os.path.abspath(f) for f in files})
    for f in out:
        input_format(f)
    return out


def input_key(path: str) -> str:
    """The output folder of an input: its name (readable) + a hash of its absolute path (unique)."""
    name = os.path.basename(path)
    for suf in sorted(JSONL_SUFFIXES + PARQUET_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suf):
            name = name[: -len(suf)]
            break
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80] or "input"
    return f"{safe}-{hashlib.sha256(path.encode()).hexdigest()[:10]}"


def fingerprint(path: str) -> dict:
    st = os.stat(path)
    return {"input": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def is_done(out_dir: Path, path: str) -> bool:
    """An input is done when its _SUCCESS.json records the same path, size and mtime."""
    marker = out_dir / input_key(path) / SUCCESS_FILE
    try:
        done = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    fp = fingerprint(path)
    return all(done.get(k) == v for k, v in fp.items())


# ---------------------------------------------------------------------------------------------
# rows -> (id, text) or a reason
# ---------------------------------------------------------------------------------------------
def check_row(rec, text_field: str, id_field: str) -> tuple[str | None, str | None, str | None]:
    """One parsed record -> (id, text, reason it is rejected or None)."""
    if not isinstance(rec, dict):
        return None, None, f"not a JSON object ({type(rec).__name__})"
    pid = rec.get(id_field)
    if isinstance(pid, bool) or pid is None or not isinstance(pid, (str, int)):
        reason = f"missing id ({id_field!r})" if pid is None else \
            f"id ({id_field!r}) is {type(pid).__name__}, not a string or integer"
        return None, None, reason
    pid = str(pid)
    if not pid.strip():
        return None, None, f"empty id ({id_field!r})"
    text = rec.get(text_field)
    if text is None:
        return pid, None, f"missing text ({text_field!r})"
    if not isinstance(text, str):
        return pid, None, f"text ({text_field!r}) is {type(text).__name__}, not a string"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate from a JSON "\ud800" escape
        return pid, None, f"text is not valid Unicode ({exc.reason} at character {exc.start})"
    return pid, text, None


def _parse_jsonl_line(raw: bytes):
    """-> (record, None, the line as text) or (None, reason, the line as text for the rejects file)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not valid UTF-8 ({exc.reason} at byte {exc.start})", raw.decode("utf-8", "backslashreplace")
    try:
        return json.loads(line), None, line
    except ValueError as exc:
        return None, f"invalid JSON: {exc}", line


def _jsonl_lines(files: list[str]):
    """A Ray Data datasource: the non-blank lines of JSONL(.gz) files as raw bytes (column `text`, plus
    `path`). Not read_text: it decodes a whole file strictly, so one invalid UTF-8 byte fails the job,
    and it splits on str.splitlines(), i.e. also inside a JSON string holding an unescaped U+2028.
    Here each line is decoded on its own (a bad one becomes a reject) and split on newlines only."""
    import pyarrow as pa
    from ray.data.datasource import FileBasedDatasource

    class JsonlLines(FileBasedDatasource):
        def _read_stream(self, f, path):
            lines = [ln for ln in f.readall().split(b"\n") if ln.strip()]
            yield pa.table({"text": pa.array([ln.rstrip(b"\r") for ln in lines], pa.binary())})

    return JsonlLines(files, include_paths=True)


# ---------------------------------------------------------------------------------------------
# the Ray side: one Embedder per actor, a Parquet datasink
# ---------------------------------------------------------------------------------------------
def embedding_type(precision: str, dim: int):
    import pyarrow as pa

    from postembed_fast.kernels.precision import precision_spec

    spec = precision_spec(precision)
    if precision == "float32":
        return pa.list_(pa.float32(), dim)
    if precision == "float16":
        return pa.list_(pa.float16(), dim)
    return pa.binary(spec.row_bytes(dim))  # the codes, exactly the bytes embed() returns per row


def embedding_array(rows, precision: str, dim: int):
    """[N, C] numpy from embed() -> a pyarrow array of embedding_type (zero-copy for the float types)."""
    import numpy as np
    import pyarrow as pa

    typ = embedding_type(precision, dim)
    rows = np.ascontiguousarray(rows)
    if precision in FLOAT_PRECISIONS:
        flat = pa.array(rows.reshape(-1), type=typ.value_type)
        return pa.FixedSizeListArray.from_arrays(flat, dim)
    buf = pa.py_buffer(rows.view(np.uint8).reshape(-1).tobytes())
    return pa.Array.from_buffers(typ, len(rows), [None, buf])


def _from_embedding_column(col, precision: str, dim: int):
    """The inverse of embedding_array: a pyarrow column -> [N, C] numpy of embed()'s dtype."""
    import numpy as np

    from postembed_fast.kernels.precision import precision_spec

    spec = precision_spec(precision)
    col = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    n = len(col)
    if precision in FLOAT_PRECISIONS:
        return col.flatten().to_numpy(zero_copy_only=False).reshape(n, dim)
    width = spec.columns(dim)
    raw = col.buffers()[1]
    start = col.offset * width * spec.numpy_dtype.itemsize
    return np.frombuffer(raw, dtype=spec.numpy_dtype, count=n * width,
                         offset=start).reshape(n, width).copy()


def read_output(out_dir, with_input: bool = False):
    """(ids list, [N, C] numpy) of every finished input of an output folder, in input order.
    For tests, checks and small outputs; large ones are read part by part (see load_into)."""
    import numpy as np
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
            blocks.append(_from_embedding_column(t.column("embedding"), settings["precision"], settings["dim"]))
            inputs += [key_dir.name] * t.num_rows
    from postembed_fast.kernels.precision import precision_spec

    spec = precision_spec(settings["precision"])
    emb = np.concatenate(blocks) if blocks else np.empty((0, spec.columns(settings["dim"])), spec.numpy_dtype)
    return (ids, emb, inputs) if with_input else (ids, emb)


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
                rec, reason, line = _parse_jsonl_line(raw)
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
        import numpy as np
        import pyarrow as pa

        recs = self._records(batch)
        good = [i for i, r in enumerate(recs) if r[3] is None]
        rows, errors = self._embed([recs[i][2] for i in good]) if good else ([], {})
        reasons = [r[3] for r in recs]
        for j, msg in errors.items():
            reasons[good[j]] = msg
        from postembed_fast.kernels.precision import precision_spec

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


def _parquet_metadata(settings: dict, path: str) -> dict:
    meta = {"postembed.model": settings["model"], "postembed.precision": settings["precision"],
            "postembed.dim": str(settings["dim"]), "postembed.input": path}
    if settings.get("ranges") is not None:
        meta["postembed.ranges"] = json.dumps(settings["ranges"])
    return meta


def _make_sink(out_dir: str, settings: dict):
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
                                       metadata=_parquet_metadata(settings, path))
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


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------
def read_settings(out_dir: Path) -> dict | None:
    try:
        return json.loads((Path(out_dir) / SETTINGS_FILE).read_text())
    except FileNotFoundError:
        return None


def _settings(cfg: Config) -> dict:
    """Model tag, dim and ranges, from an Embedder on this machine's CPU (it also checks the model and
    that int8/uint8 have ranges before any cluster work starts)."""
    from postembed_fast import Embedder
    from postembed_fast.kernels.precision import precision_spec

    spec = precision_spec(cfg.precision)
    e = Embedder(cfg.model, device="cpu")
    ranges = e.quantization_ranges if spec.needs_ranges else None
    if spec.needs_ranges and ranges is None:
        raise BackfillError(f"precision {cfg.precision} needs quantization ranges and model {e.model_tag} has "
                            "none: use float32/float16/binary, or a model with shipped ranges")
    return {"model": e.model_tag, "precision": cfg.precision, "dim": e.dim,
            "ranges": None if ranges is None else ranges.tolist(), "format": 1}


def _init_ray(cfg: Config):
    import ray

    if ray.is_initialized():  # a caller (tests, a notebook) already chose the cluster
        return False
    local = dict(address="local", _node_ip_address="127.0.0.1", include_dashboard=False)
    if cfg.ray_address == "local":
        # a single-machine cluster addressed on loopback, no dashboard
        ray.init(**local)
        return True
    try:
        ray.init(address=cfg.ray_address or "auto")
    except ConnectionError as exc:
        if cfg.ray_address:  # asked for a cluster: say so instead of silently running alone
            raise BackfillError(f"--ray-address {cfg.ray_address}: no running Ray cluster ({exc}); start one "
                                "with `ray start --head`, or use --ray-address local") from None
        ray.init(**local)  # the default: a running cluster if there is one, else a local one
    return True


def plan_workers(cfg: Config, resources: dict, nodes: list[dict]) -> dict:
    """How many actors with which resources. Every choice is checked against what the cluster has, so
    no actor waits forever for a GPU (or CPUs) that is not there."""
    total_gpus = float(resources.get("GPU", 0))
    total_cpus = float(resources.get("CPU", 0))
    device = cfg.device
    if device is not None and device != "cpu" and not device.startswith("cuda"):
        raise BackfillError(f"--device {device!r}: backfill actors run on 'cpu' or 'cuda'")
    gpw = cfg.gpus_per_worker
    if gpw is None:
        gpw = 1.0 if (total_gpus > 0 and device != "cpu") or (device or "").startswith("cuda") else 0.0
    if gpw < 0:
        raise BackfillError(f"--gpus-per-worker must be >= 0, got {gpw}")
    if device and device.startswith("cuda") and gpw == 0:
        raise BackfillError("--device cuda needs --gpus-per-worker > 0")
    if gpw > 0 and device == "cpu":
        raise BackfillError("--device cpu with --gpus-per-worker > 0: choose one")
    if gpw > 0 and total_gpus == 0:
        raise BackfillError("GPU actors requested (--gpus-per-worker / --device cuda) but the Ray cluster has "
                            "no GPU; use --gpus-per-worker 0 for CPU actors")
    if gpw > 0:
        workers = cfg.workers or max(1, int(total_gpus // gpw))
        cpus = cfg.cpus_per_worker if cfg.cpus_per_worker is not None else min(2.0, max(1.0, total_cpus // workers))
        io_cpus = 1.0 if total_cpus - workers * cpus >= 2 else 0.0
        if workers * gpw > total_gpus:
            raise BackfillError(f"{workers} workers x {gpw} GPUs > the cluster's {total_gpus:g} GPUs")
    else:
        # CPU actors: one per node by default, computing with all of its cores (threads). Ray schedules by
        # declared CPUs, and Ray Data runs small tasks of its own that ask for a whole CPU (file listing
        # for Parquet): an actor that declared every core would starve them and the job would hang. So
        # by default the actors declare one core less per node than they compute with (OMP_NUM_THREADS
        # and torch threads are set explicitly, not from num_cpus), and our read and write tasks declare
        # 0 CPUs: they cost little next to the encoder (a line parses in microseconds, embeds in ~13 ms).
        cpu_nodes = [n for n in nodes if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= 1]
        workers = cfg.workers or max(1, len(cpu_nodes))
        per_node_workers = math.ceil(workers / max(1, len(cpu_nodes)))
        if cfg.cpus_per_worker is not None:
            cpus = threads = cfg.cpus_per_worker
        else:
            per_node = min((n["Resources"]["CPU"] for n in cpu_nodes), default=total_cpus)
            threads = max(1.0, float(int(per_node // per_node_workers)))
            cpus = max(0.25, (per_node - 1) / per_node_workers)
        io_cpus = 0.0
        if cpus <= 0:
            raise BackfillError(f"--cpus-per-worker must be > 0, got {cpus}")
        if workers * cpus > total_cpus - 1:
            raise BackfillError(f"{workers} workers x {cpus:g} CPUs leave no CPU of the cluster's {total_cpus:g} "
                                "for Ray Data's own tasks (lower --workers or --cpus-per-worker)")
        return {"workers": workers, "gpus": 0.0, "cpus": cpus, "io_cpus": io_cpus, "device": "cpu",
                "threads": max(1, math.ceil(threads))}
    if cpus <= 0:
        raise BackfillError(f"--cpus-per-worker must be > 0, got {cpus}")
    if workers * cpus > total_cpus:
        raise BackfillError(f"{workers} workers x {cpus:g} CPUs > the cluster's {total_cpus:g} CPUs "
                            "(lower --workers or --cpus-per-worker)")
    return {"workers": workers, "gpus": gpw, "cpus": cpus, "io_cpus": io_cpus,
            "device": "cuda", "threads": max(1, math.ceil(cpus))}


def _prepare_output(out: Path, settings: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    old = read_settings(out)
    if old is None:
        tmp = out / (SETTINGS_FILE + ".tmp")
        tmp.write_text(json.dumps(settings, indent=1))
        os.replace(tmp, out / SETTINGS_FILE)
        return
    for k in ("model", "precision", "dim", "ranges"):
        if old.get(k) != settings.get(k):
            raise BackfillError(f"{out} holds a backfill with {k}={old.get(k)!r}, this run has {settings.get(k)!r}: "
                                "use a new --output folder for a new model or precision")


def _finish_round(out: Path, files: list[str], stats: dict, settings: dict) -> None:
    """Merge each input's reject pieces into rejects.jsonl, then write its _SUCCESS.json (last)."""
    for path in files:
        d = out / input_key(path)
        d.mkdir(parents=True, exist_ok=True)
        pieces = sorted(d.glob("rejects-*.jsonl"))
        if pieces:
            with open(d / (REJECTS_FILE + ".tmp"), "w", encoding="utf-8") as f:
                for p in pieces:
                    f.write(p.read_text(encoding="utf-8"))
            os.replace(d / (REJECTS_FILE + ".tmp"), d / REJECTS_FILE)
            for p in pieces:
                p.unlink()
        s = stats.get(path, {"rows": 0, "rejects": 0})
        done = {**fingerprint(path), **s, "model": settings["model"], "precision": settings["precision"],
                "finished_ms": int(time.time() * 1000)}
        (d / (SUCCESS_FILE + ".tmp")).write_text(json.dumps(done, indent=1))
        os.replace(d / (SUCCESS_FILE + ".tmp"), d / SUCCESS_FILE)


def _run_round(cfg: Config, files: list[str], fmt: str, settings: dict, plan: dict) -> dict:
    import ray.data

    out = Path(cfg.output)
    for path in files:  # an unfinished folder from an interrupted run is redone from scratch
        shutil.rmtree(out / input_key(path), ignore_errors=True)
    io = {"num_cpus": plan["io_cpus"]}

    def io_kw(reader):  # Ray >= 2.4x takes num_cpus= on readers and deprecates ray_remote_args
        import inspect

        return io if "num_cpus" in inspect.signature(reader).parameters else {"ray_remote_args": io}

    if fmt == "jsonl":
        # read as lines: every line becomes a row (even one that is not valid JSON or UTF-8), so bad
        # rows are rejected one by one instead of failing the whole file in a JSON reader
        ds = ray.data.read_datasource(_jsonl_lines(files), **io_kw(ray.data.read_datasource))
    else:
        import pyarrow.parquet as pq

        for path in files:  # a missing column is a setup error, not a bad row
            names = pq.read_schema(path).names
            for c in (cfg.id_field, cfg.text_field):
                if c not in names:
                    raise BackfillError(f"{path}: no column {c!r} (columns: {', '.join(names)}); "
                                        "see --id-field / --text-field")
        cols = [cfg.id_field, cfg.text_field]
        # select_columns after the read: Ray Data pushes the projection into the reader (columns= is
        # deprecated there), so only the id and text columns are read
        ds = ray.data.read_parquet(files, include_paths=True,
                                   **io_kw(ray.data.read_parquet)).select_columns(cols + ["path"])
    kw = dict(fmt=fmt, model=cfg.model, device=plan["device"], dtype=cfg.dtype, precision=cfg.precision,
              batch_tokens=cfg.batch_tokens, text_field=cfg.text_field, id_field=cfg.id_field,
              ranges=settings["ranges"], threads=plan["threads"])
    ds = ds.map_batches(EmbedBatch, fn_constructor_kwargs=kw, batch_size=cfg.batch_size, batch_format="pyarrow",
                        concurrency=plan["workers"], num_cpus=plan["cpus"], num_gpus=plan["gpus"] or None,
                        # the actor's OpenMP pools (torch's and the C++ kernels') size from this at start
                        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(plan["threads"])}})
    sink = _make_sink(str(out), settings)
    ds.write_datasink(sink, ray_remote_args=io)
    _finish_round(out, files, sink.stats, settings)
    return sink.stats


def run_backfill(cfg: Config, log=print) -> dict:
    """Embed every input file not yet done into cfg.output; then --load-into if given. -> summary dict."""
    problem = missing_extra()
    if problem:
        raise BackfillError(problem)
    out = Path(cfg.output)
    summary = {"files": 0, "skipped": 0, "rows": 0, "rejects": 0, "seconds": 0.0, "posts_per_s": None,
               "loaded": None}
    if cfg.inputs:
        from postembed_fast.kernels.precision import precision_spec

        precision_spec(cfg.precision)
        files = expand_inputs(cfg.inputs)
        settings = _settings(cfg)
        _prepare_output(out, settings)
        todo = [f for f in files if not is_done(out, f)]
        summary["skipped"] = len(files) - len(todo)
        if summary["skipped"]:
            log(f"backfill: {summary['skipped']} of {len(files)} input files already done in {out} (skipped)")
        if todo:
            import ray
            import ray.data

            started = _init_ray(cfg)
            try:
                ctx = ray.data.DataContext.get_current()
                ctx.execution_options.preserve_order = True  # output rows in input order (ids are kept anyway)
                ctx.enable_progress_bars = bool(cfg.progress)
                plan = plan_workers(cfg, ray.cluster_resources(), ray.nodes())
                log(f"backfill: {len(todo)} input files, model {settings['model']}, {cfg.precision}, "
                    f"{plan['workers']} {plan['device']} actor(s) x {plan['threads']} threads ({plan['cpus']:g} CPU declared)"
                    + (f" x {plan['gpus']:g} GPU" if plan["gpus"] else ""))
                t0 = time.perf_counter()
                by_fmt: dict[str, list[str]] = {}
                for f in todo:
                    by_fmt.setdefault(input_format(f), []).append(f)
                for fmt, fs in by_fmt.items():
                    for i in range(0, len(fs), cfg.files_per_round):
                        stats = _run_round(cfg, fs[i:i + cfg.files_per_round], fmt, settings, plan)
                        summary["files"] += len(fs[i:i + cfg.files_per_round])
                        summary["rows"] += sum(s["rows"] for s in stats.values())
                        summary["rejects"] += sum(s["rejects"] for s in stats.values())
                summary["seconds"] = time.perf_counter() - t0
            finally:
                if started:
                    ray.shutdown()
            total = summary["rows"] + summary["rejects"]
            summary["posts_per_s"] = total / summary["seconds"] if summary["seconds"] else None
            log(f"backfill: {summary['rows']} posts embedded, {summary['rejects']} rejected"
                + (f" (see {out}/*/{REJECTS_FILE})" if summary["rejects"] else "")
                + f", {summary['files']} files in {summary['seconds']:.1f} s = {summary['posts_per_s'] or 0:.1f} posts/s")
    if cfg.load_into:
        summary["loaded"] = load_into(out, cfg.load_into, prefix=cfg.prefix)
        log(f"backfill: {summary['loaded']} embeddings written to {cfg.load_into} under {cfg.prefix}<id>")
    return summary


# ---------------------------------------------------------------------------------------------
# into the near-line store
# ---------------------------------------------------------------------------------------------
def load_into(out_dir, redis_url: str, prefix: str = "emb:", batch: int = 1000) -> int:
    """Write a finished output into Redis in the near-line layout (postembed_fast/nearline.py): a hash
    `{prefix}{id}` per post (vector = embed()'s bytes, little-endian; model, dim, precision, created_ms
    and embedded_ms = when its input finished, as the backfill does not know the post's creation time;
    source_id = backfill:<input key>) and the ranges under `{prefix}__ranges__:{model}`. Only inputs
    with a _SUCCESS.json are loaded. Returns the number of hashes written."""
    from postembed_fast import nearline

    problem = nearline.missing_extra()
    if problem:
        raise BackfillError(problem)
    import numpy as np
    import pyarrow.parquet as pq
    import redis

    from postembed_fast.kernels.precision import precision_spec

    out_dir = Path(out_dir)
    settings = read_settings(out_dir)
    if settings is None:
        raise BackfillError(f"{out_dir}: not a backfill output ({SETTINGS_FILE} missing)")
    precision, dim, tag = settings["precision"], settings["dim"], settings["model"]
    spec = precision_spec(precision)
    dt = spec.numpy_dtype
    vdt = dt.newbyteorder("<") if dt.itemsize > 1 else dt
    r = redis.Redis.from_url(redis_url, socket_timeout=30, socket_connect_timeout=5)
    if settings.get("ranges") is not None:
        rng = np.asarray(settings["ranges"], dtype="<f4")
        r.hset(f"{prefix}{nearline._RANGES_INFIX}{tag}", mapping={
            "ranges": rng.tobytes(), "dim": str(dim), "model": tag, "shape": f"2,{dim}"})
    n = 0
    for key_dir in sorted(p for p in out_dir.iterdir() if (p / SUCCESS_FILE).exists()):
        done_ms = json.loads((key_dir / SUCCESS_FILE).read_text()).get("finished_ms", int(time.time() * 1000))
        for part in sorted(key_dir.glob("part-*.parquet")):
            pf = pq.ParquetFile(part)
            for rb in pf.iter_batches(batch_size=batch):
                ids = rb.column(0).to_pylist()
                vecs = _from_embedding_column(rb.column(1), precision, dim)
                pipe = r.pipeline(transaction=False)
                for pid, vec in zip(ids, vecs):
                    key = prefix + pid
                    pipe.delete(key)  # no field of an older version survives (as the near-line worker does)
                    pipe.hset(key, mapping={"vector": vec.astype(vdt, copy=False).tobytes(), "model": tag,
                                            "dim": str(dim), "precision": precision, "created_ms": done_ms,
                                            "embedded_ms": done_ms, "source_id": f"backfill:{key_dir.name}"})
                pipe.execute()
                n += len(ids)
    return n


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Embed a corpus of JSONL/Parquet files on Ray Data into "
                                "Parquet (resumable), optionally load it into the near-line Redis layout.")
    add_arguments(p)
    return p


def run_from_args(args, prog: str = PROG) -> int:
    """Exit codes: 0 done (rejected rows included: they are counted and written); 2 missing extra, bad
    input or settings; 130 interrupted."""
    if not args.inputs and not args.load_into:
        print(f"{prog}: error: give --input (to embed) and/or --load-into (to load --output into Redis)",
              file=sys.stderr)
        return 2
    problem = missing_extra() if args.inputs else None
    if problem:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return 2
    try:
        run_backfill(config_from_args(args), log=lambda m: print(m, file=sys.stderr))
    except BackfillError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (finished input files are kept; re-run to resume)", file=sys.stderr)
        return 130
    return 0


def main(argv=None, prog: str = PROG) -> int:
    return run_from_args(build_parser(prog).parse_args(argv), prog)


if __name__ == "__main__":
    sys.exit(main())
