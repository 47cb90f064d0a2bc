"""The backfill's inputs: which files, in which format, their output folder key and fingerprint (resume),
and the JSONL lines datasource (lines as bytes, so one bad line is one reject). File names are read by
the one table of postembed_fast.inputs (SUFFIXES), as `embed` and `train` read them."""
from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
from pathlib import Path

from postembed_fast import inputs
from postembed_fast.backfill.layout import SUCCESS_FILE, BackfillError

FORMATS = ("jsonl", "parquet")  # plain text has no ids: not a backfill input
JSONL_SUFFIXES = inputs.suffixes("jsonl")
PARQUET_SUFFIXES = inputs.suffixes("parquet")


def input_format(path: str) -> str:
    fmt = inputs.format_of_name(path)
    if fmt in FORMATS:
        return fmt
    why = "plain text has no ids" if fmt == "text" else "unknown input format"
    raise BackfillError(f"{path}: {why} (JSONL: {', '.join(JSONL_SUFFIXES)}; "
                        f"Parquet: {', '.join(PARQUET_SUFFIXES)})")


def expand_inputs(specs: list[str]) -> list[str]:
    """Paths, globs and folders -> sorted absolute file paths (each once). Nothing matching is an error."""
    files: list[str] = []
    for spec in specs:
        if os.path.isdir(spec):
            found = [os.path.join(dp, f) for dp, _, fs in os.walk(spec) for f in fs
                     if inputs.format_of_name(f) in FORMATS]
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
    name = inputs.strip_suffix(os.path.basename(path))
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


def jsonl_lines(files: list[str]):
    """A Ray Data datasource: the non-blank lines of JSONL(.gz) files as raw bytes (column `text`, plus
    `path`). Not read_text: it decodes a whole file strictly, so one invalid UTF-8 byte fails the job,
    and it splits on str.splitlines(), i.e. also inside a JSON string holding an unescaped U+2028.
    Here each line is decoded on its own (a bad one becomes a reject) and split on newlines only. As
    inputs.PostReader reads a file: gzip by its magic bytes (Ray decompresses only a .gz name), the
    BOM of the first line ignored."""
    import pyarrow as pa
    from ray.data.datasource import FileBasedDatasource

    class JsonlLines(FileBasedDatasource):
        def _read_stream(self, f, path):
            data = f.readall()
            if data[:2] == b"\x1f\x8b":
                data = gzip.decompress(data)
            if data.startswith(inputs.BOM):
                data = data[len(inputs.BOM):]
            lines = [ln for ln in data.split(b"\n") if ln.strip()]
            yield pa.table({"text": pa.array([ln.rstrip(b"\r") for ln in lines], pa.binary())})

    return JsonlLines(files, include_paths=True)
