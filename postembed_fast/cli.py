"""The `postembed-fast` command (also `python -m postembed_fast`).

    postembed-fast embed posts.jsonl.gz --output emb.npy [--precision int8] [--ids-field id]
    postembed-fast serve | nearline embed | nearline index | backfill | train ...

COMMANDS is the one table of subcommands: a name, its help, the function that adds its flags
(imported when the parser is built, so it must import flags only) and the function that runs it,
`run(args, prog) -> exit code` (imported when it runs, with the extra it needs checked first). A new
subcommand is a new row; its model flags come from options.add_model_args.

Exit codes: 0 done; 2 usage or input error (bad flag, unreadable input, bad line: nothing is
written; a missing extra); 1 any other failure (e.g. the output directory is not writable); 130
interrupted.
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import stat
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# Importing the package itself is light (torch, no model); the model loads inside the subcommand.
from postembed_fast import PRECISIONS, __version__
from postembed_fast.cli_args import missing_extra, positive_int
from postembed_fast.inputs import FORMATS as INPUT_FORMATS
from postembed_fast.inputs import InputError, PostReader
from postembed_fast.options import ModelOptions, add_model_args

__all__ = ["COMMANDS", "Command", "InputError", "PostReader", "UsageError", "build_parser", "main"]

PROG = "postembed-fast"
FORMATS = ("auto", *INPUT_FORMATS)
DEFAULT_CHUNK = {"cpu": 1024, "cuda": 8192}  # texts per embed_iter chunk (progress updates once per chunk)
_ID_BLOCK = 65536  # ids converted to the .npy per block (memory stays flat)
NPY_SUFFIX = ".npy"  # what --output and --ids-output must end in (any case)


class UsageError(Exception):
    """A bad combination of flags or values found after parsing (argparse-style message, exit code 2)."""


# ---------------------------------------------------------------------------------------------
# the subcommand table
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    run: Callable[[argparse.Namespace, str], int] | None = None  # (args, prog) -> exit code
    description: str | None = None
    epilog: str | None = None
    missing_extra: Callable[[], str | None] | None = None  # a line saying what to install, or None
    subcommands: tuple[Command, ...] = ()


def _lazy(target: str) -> Callable:
    """'module:function', imported on the first call: a subcommand's modules load only when needed."""
    module, _, name = target.partition(":")

    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.target = target
    return call


def _serve_missing_extra() -> str | None:
    return missing_extra("serve", "orjson", "prometheus_client", "starlette", "uvicorn")


EMBED_EPILOG = """input formats:
  JSONL     one JSON object per line; the post is the string in --text-field. Every line must
            be such an object: a blank line, invalid JSON, a non-object, a missing field or a
            non-string text is an error (exit 2, 'INPUT:LINE: ...' on stderr, no output file), found
            before embedding in a file, as it streams from stdin (see INPUT).
  text      one post per line, the whole line is the post: only the line ending ('\\n' or
            '\\r\\n') is removed, other whitespace is kept. An EMPTY LINE IS AN EMPTY POST (kept,
            so row i is always line i+1); a final line ending does not start another post.
  Parquet   the post is the string column --text-field (--ids-field: a string or integer
            column); row i of the output is row i of the file (needs pyarrow; files, not stdin).
  Detection (--format auto): gzip by its magic bytes (any name, stdin too); Parquet by its magic
  bytes; then by name (.jsonl/.ndjson/.json[.gz] -> JSONL, .txt[.gz] -> text, .parquet/.pq ->
  Parquet); otherwise JSONL if the first non-blank line starts with '{', else text. Use --format
  text for plain text whose first post starts with '{'. A UTF-8 BOM is ignored; any other
  undecodable UTF-8 is an error (exit 2).

ids (JSONL and Parquet only, --ids-field FIELD):
  written beside the embeddings as OUT.ids.npy (OUT minus its .npy suffix, plus .ids.npy;
  --ids-output changes the path), one id per row: int64 if every id is an integer (within
  int64), else str (numpy '<U' array; integer ids then become their decimal string). Every
  line needs the field, and each id must be a string or an integer.

output (OUT and --ids-output must end in .npy, any case; exit 2 otherwise):
  A standard .npy file (numpy.load / mmap_mode='r'): float32 (N, D), float16 (N, D), int8 /
  uint8 (N, D), binary / ubinary (N, ceil(D/8)) packed sign bits; D = --dimensions or the
  model's dimension. Written to a temporary file in OUT's folder and renamed at the end, so
  a failed run never leaves a partial OUT. Empty input gives an (0, D) array.

exit status: 0 done; 2 bad usage or bad input (nothing written); 1 any other error (e.g. writing
  OUT); 130 interrupted.

examples:
  postembed-fast embed posts.jsonl.gz --output emb.npy --ids-field id
  postembed-fast embed posts.txt --output emb.npy --precision binary --no-progress
  cat posts.txt | postembed-fast embed - --output emb.npy --device cpu
"""


def npy_path(value: str) -> str:
    """An output name of embed (--output, --ids-output): the file written is a .npy, and its name says so."""
    if not value.lower().endswith(NPY_SUFFIX):
        raise argparse.ArgumentTypeError(f"must end in {NPY_SUFFIX} (a .npy file is written there), not {value!r}")
    return value


def _add_embed_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="INPUT",
                   help="input file (JSONL, JSONL.gz, plain text, .gz, Parquet), or - for stdin. A file is read "
                        "twice: every line is checked first, so a bad line stops the command (exit 2, its line "
                        "number) before the model loads or any post is embedded. stdin (or a pipe) is read once "
                        "and checked as it streams: a bad line stops it there, with its line number, maybe after "
                        "the posts before it were embedded; nothing is written")
    p.add_argument("-o", "--output", required=True, type=npy_path, metavar="OUT.npy",
                   help="output file, a name ending in .npy (replaced if it exists)")
    p.add_argument("--precision", default="float32", choices=PRECISIONS,
                   help="output precision (default: float32; int8/uint8 use the ranges shipped for the "
                        "default model)")
    p.add_argument("--dimensions", type=positive_int, default=None, metavar="K",
                   help="keep the first K dimensions, re-normalized (default: all)")
    p.add_argument("--chunk-size", type=positive_int, default=None, metavar="N",
                   help="posts embedded per step; memory grows with it, the progress bar moves once per step "
                        "(default: 1024 on CPU, 8192 on GPU)")
    p.add_argument("--format", default="auto", choices=FORMATS, help="input format (default: auto, see below)")
    p.add_argument("--text-field", default="text", metavar="FIELD",
                   help="JSONL field (Parquet column) holding the post (default: text)")
    p.add_argument("--ids-field", default=None, metavar="FIELD",
                   help="JSONL field (Parquet column) holding an id per post, written to OUT.ids.npy (see below)")
    p.add_argument("--ids-output", default=None, type=npy_path, metavar="PATH",
                   help="where --ids-field writes, a name ending in .npy (default: OUT.ids.npy)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_model_args(p)


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
_NPY_HEADER_LEN = 128  # fixed: the shape is known only at the end, the header is rewritten in place


def npy_header(dtype, shape: tuple) -> bytes:
    """A .npy version 1.0 header of exactly _NPY_HEADER_LEN bytes (a multiple of 64, as numpy aligns)."""
    import numpy as np

    body = repr({"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                 "shape": tuple(int(s) for s in shape)}).encode("latin1")
    pad = _NPY_HEADER_LEN - 10 - len(body) - 1
    if pad < 0:
        raise ValueError(f"npy header too long for shape {shape}")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", _NPY_HEADER_LEN - 10) + body + b" " * pad + b"\n"


class NpyStreamWriter:
    """Appends row blocks of one dtype/width to a temporary file beside `path`; commit() writes the
    final shape into the header and renames it to `path`; abort() removes it. np.load-able."""

    def __init__(self, path: Path, dtype, row_shape: tuple):
        import numpy as np

        self.path, self.dtype, self.row_shape, self.rows = Path(path), np.dtype(dtype), tuple(row_shape), 0
        fd, tmp = tempfile.mkstemp(dir=self.path.parent or ".", prefix=f".{self.path.name}.", suffix=".tmp")
        self.tmp = Path(tmp)
        self.f = os.fdopen(fd, "wb")
        self.f.write(npy_header(self.dtype, (0, *self.row_shape)))

    def write(self, block) -> None:
        import numpy as np

        block = np.ascontiguousarray(block)
        if block.dtype != self.dtype or block.shape[1:] != self.row_shape:
            raise RuntimeError(f"block {block.dtype} {block.shape} does not match {self.dtype} (N, *{self.row_shape})")
        self.f.write(block.data)
        self.rows += len(block)

    def commit(self) -> None:
        self.f.seek(0)
        self.f.write(npy_header(self.dtype, (self.rows, *self.row_shape)))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.chmod(self.tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it a normal file's mode
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self.f.close()
        finally:
            self.tmp.unlink(missing_ok=True)


class IdsWriter:
    """Ids spooled one JSON value per line to a temporary file (flat memory), converted at the end
    to a .npy: int64 if every id is an int within int64, else '<U' str."""

    def __init__(self, path: Path):
        self.path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent or ".", prefix=f".{self.path.name}.", suffix=".spool")
        self.spool_path = Path(tmp)
        self.spool = os.fdopen(fd, "w+", encoding="utf-8")
        self.n, self.all_int, self.max_len = 0, True, 1
        self.npy: NpyStreamWriter | None = None

    def add(self, id_) -> None:
        if isinstance(id_, int):
            if self.all_int and not -(2**63) <= id_ < 2**63:
                self.all_int = False
            self.max_len = max(self.max_len, len(str(id_)))
        else:
            self.all_int = False
            self.max_len = max(self.max_len, len(id_))
        self.spool.write(json.dumps(id_))
        self.spool.write("\n")
        self.n += 1

    def finish(self) -> None:
        """Builds the .npy in a temporary file (commit() renames it)."""
        import numpy as np

        dtype = np.dtype(np.int64) if self.all_int else np.dtype(f"<U{self.max_len}")
        self.npy = NpyStreamWriter(self.path, dtype, ())
        self.spool.seek(0)
        while block := [json.loads(s) for s in itertools.islice(self.spool, _ID_BLOCK)]:
            if not self.all_int:
                block = [s if isinstance(s, str) else str(s) for s in block]
            self.npy.write(np.array(block, dtype=dtype))

    def commit(self) -> None:
        self.npy.commit()
        self._drop_spool()

    def abort(self) -> None:
        if self.npy is not None:
            self.npy.abort()
        self._drop_spool()

    def _drop_spool(self):
        try:
            self.spool.close()
        finally:
            self.spool_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_ids_path(output: str) -> str:
    """OUT.npy -> OUT.ids.npy (the suffix matched in any case, as npy_path checks it)."""
    stem = output[: -len(NPY_SUFFIX)] if output.lower().endswith(NPY_SUFFIX) else output
    return stem + ".ids.npy"


# ---------------------------------------------------------------------------------------------
# embed
# ---------------------------------------------------------------------------------------------
def cmd_embed(args, prog: str = PROG) -> int:
    out_path = Path(args.output)
    ids_path = Path(args.ids_output or default_ids_path(args.output)) if args.ids_field else None
    if args.ids_output and not args.ids_field:
        raise UsageError("--ids-output needs --ids-field")
    if ids_path is not None and ids_path.resolve() == out_path.resolve():
        raise UsageError("--ids-output must differ from --output")
    for flag, path in (("--output", out_path), ("--ids-output", ids_path)):
        if path is not None and path.is_dir():
            raise UsageError(f"{flag}: {str(path)!r} is a directory")
    if not out_path.parent.is_dir():
        raise UsageError(f"--output: directory {str(out_path.parent)!r} does not exist")

    total = None
    if rereadable(args.input):  # the whole file is checked before the model loads
        with _open_input(args) as reader:
            total = check_posts(reader, progress=not args.no_progress)
    with _open_input(args) as reader:  # stdin, a pipe: checked as it streams (the output is written atomically)
        return _embed(args, reader, out_path, ids_path, total)


def _open_input(args) -> PostReader:
    reader = PostReader(args.input, args.format, args.text_field, args.ids_field,
                        sniff_hint="pass --format text for plain text")
    if args.ids_field and reader.format == "text":
        reader.close()
        raise UsageError("--ids-field needs JSONL or Parquet input (this input is plain text; see --format)")
    return reader


def rereadable(path: str) -> bool:
    """A regular file, which a second open reads from the start again. Not stdin, nor a pipe or another
    device (`<(zcat posts.gz)` is /dev/fd/N: opened again, it would read on from where the first read
    stopped). A path that cannot be stat'ed is left to PostReader to report."""
    if path == "-":
        return False
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def check_posts(reader: PostReader, progress: bool = False) -> int:
    """Reads every post of `reader` with the reader's own checks, keeping none (memory stays flat): the
    first bad line raises its InputError. Returns the number of posts (the progress bar's total)."""
    posts = reader
    if progress:
        from tqdm import tqdm

        posts = tqdm(reader, unit=" posts", desc="checking", file=sys.stderr, dynamic_ncols=True)
    n = 0
    try:
        for n, _ in enumerate(posts, 1):
            pass
    finally:
        if posts is not reader:
            posts.close()
    return n


def _device_type(device) -> str:
    if device is None:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if str(device).startswith("cuda") else "cpu"


def _embed(args, reader: PostReader, out_path: Path, ids_path: Path | None, total: int | None) -> int:
    t0 = time.perf_counter()
    model = ModelOptions.from_args(args)
    chunk_size = args.chunk_size or DEFAULT_CHUNK[_device_type(model.device)]
    ids = IdsWriter(ids_path) if ids_path is not None else None
    ok = False
    try:
        def texts():
            for text, id_ in reader:
                if ids is not None:
                    ids.add(id_)
                yield text

        stream = texts()
        # The first chunk is read before the model loads: a bad line there fails fast (stdin; a file is
        # already checked).
        first = list(itertools.islice(stream, chunk_size))

        from postembed_fast import Embedder

        try:
            emb = Embedder(model.model, device=model.device, dtype=model.dtype)
        except (ValueError, TypeError, FileNotFoundError) as exc:
            raise UsageError(str(exc)) from None
        load_s = time.perf_counter() - t0
        opts = dict(precision=args.precision, dimensions=args.dimensions, batch_tokens=model.batch_tokens)
        try:
            template = emb.embed([], **opts)  # validates the options; dtype and width of the rows
        except (ValueError, TypeError) as exc:
            raise UsageError(str(exc)) from None
        ok = _run(args, emb, opts, template, itertools.chain(first, stream), chunk_size, out_path, ids, load_s,
                  total)
        return 0
    finally:
        if not ok and ids is not None:
            ids.abort()


def _run(args, emb, opts, template, texts, chunk_size, out_path, ids, load_s, total) -> bool:
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit=" posts", desc="embedding", file=sys.stderr, dynamic_ncols=True)

    writer = None
    ok = False
    t1 = time.perf_counter()
    try:
        writer = NpyStreamWriter(out_path, template.dtype, template.shape[1:])
        for block in emb.embed_iter(texts, chunk_size=chunk_size, **opts):
            writer.write(block)
            if bar is not None:
                bar.update(len(block))
        if ids is not None:
            if ids.n != writer.rows:
                raise RuntimeError(f"{ids.n} ids for {writer.rows} rows")
            ids.finish()  # both files complete in their temporary paths before either is renamed
        writer.commit()
        if ids is not None:
            ids.commit()
        ok = True
    finally:
        if bar is not None:
            bar.close()
        if not ok and writer is not None:
            writer.abort()
    secs = time.perf_counter() - t1
    n = writer.rows
    width = args.dimensions or emb.dim
    shape = f"({n}, {template.shape[1]})"
    extra = f", ids -> {ids.path} ({ids.npy.dtype})" if ids is not None else ""
    print(f"{PROG}: {n} posts -> {out_path} {shape} {template.dtype}; dim {width}, precision {args.precision}; "
          f"{secs:.1f} s, {n / secs if secs > 0 else 0.0:.1f} posts/s (model load {load_s:.1f} s){extra}",
          file=sys.stderr)
    return True


# ---------------------------------------------------------------------------------------------
# serve
# ---------------------------------------------------------------------------------------------
def cmd_serve(args, prog: str = PROG) -> int:
    from postembed_fast.serve.__main__ import serve
    from postembed_fast.serve.options import ServeConfig

    return serve(ServeConfig.from_args(args))


# ---------------------------------------------------------------------------------------------
# the table, the parser, main
# ---------------------------------------------------------------------------------------------
COMMANDS: tuple[Command, ...] = (
    Command(
        "embed", help="embed a JSONL / JSONL.gz / plain-text / Parquet file of posts into a .npy file",
        description="Embed every post of INPUT into OUT.npy, in input order: row i of the array is line\n"
                    "i+1 of the input. Memory stays flat however long the input: posts stream through\n"
                    "Embedder.embed_iter and the rows straight to disk. A summary line goes to stderr.",
        epilog=EMBED_EPILOG, add_arguments=_add_embed_arguments, run=cmd_embed),
    Command(
        "serve", help="serve embeddings over HTTP (OpenAI- and TEI-compatible; needs the serve extra)",
        description="Serve embeddings over HTTP, the same as `python -m postembed_fast.serve`: POST /v1/embeddings,\n"
                    "GET /v1/models (OpenAI), POST /embed and / (TEI), POST /tokenize, GET /health, /info,\n"
                    "/metrics. Concurrent requests are merged into token-budget batches. SIGTERM drains\n"
                    "(new requests 503 until those in flight are answered) and exits 0.",
        add_arguments=_lazy("postembed_fast.serve.options:add_arguments"),
        run=cmd_serve, missing_extra=_serve_missing_extra),
    Command(
        "nearline", help="near-line embedding from a Redis stream (needs the nearline extra)",
        description="Near-line embedding, the same as `python -m postembed_fast.nearline`: `embed` runs one\n"
                    "consumer-group worker that embeds new posts of a Redis stream into Redis hashes; `index`\n"
                    "keeps a searchable EmbeddingIndex of the worker's output stream (GET /search).",
        subcommands=(
            Command("embed", help="embed new posts of a Redis stream into Redis (SIGTERM: finish the batch, exit 0)",
                    add_arguments=_lazy("postembed_fast.nearline.worker:add_embed_arguments"),
                    run=_lazy("postembed_fast.nearline.worker:run_from_args"),
                    missing_extra=_lazy("postembed_fast.nearline.worker:missing_extra")),
            Command("index", help="keep a searchable index of the output stream, GET /search (snapshots to disk "
                                  "and resumes from them; SIGTERM: final snapshot, exit 0)",
                    add_arguments=_lazy("postembed_fast.nearline.index_updater:add_index_arguments"),
                    run=_lazy("postembed_fast.nearline.index_updater:run_from_args"),
                    missing_extra=_lazy("postembed_fast.nearline.index_updater:missing_extra")),
        )),
    Command(
        "backfill", help="embed a corpus of JSONL/Parquet files on Ray Data into Parquet (needs the backfill extra)",
        description="Backfill, the same as `python -m postembed_fast.backfill`: embeds every input file not yet\n"
                    "done into DIR/<input key>/part-*.parquet (id, embedding) on a pool of Ray Data actors,\n"
                    "rejects bad rows into rejects.jsonl, and can load a finished output into Redis.",
        # the extra is checked by the job: --load-into alone needs Redis, not Ray
        add_arguments=_lazy("postembed_fast.backfill.job:add_arguments"),
        run=_lazy("postembed_fast.backfill.job:run_from_args")),
    Command(
        "train", help="train the post-embedding model: multi-task contrastive fine-tuning to 50-d (needs the "
                      "train extra)",
        description="Train the post-embedding model, the same as `python -m postembed_fast.train`: fine-tunes\n"
                    "the base encoder on the posts' labeling tasks into a sentence-transformers folder that\n"
                    "Embedder loads, then prints the triplet-accuracy table of the new model and the base.",
        add_arguments=_lazy("postembed_fast.train.__main__:add_arguments"),
        run=_lazy("postembed_fast.train.__main__:run_from_args"),
        missing_extra=_lazy("postembed_fast.train.__main__:missing_extra")),
)


def _entry(cmd: Command, path: tuple[str, ...]) -> Callable[[argparse.Namespace], int]:
    """`args.func` of a row: checks its extra, then runs it under its full name ('postembed-fast nearline
    index'); named cmd_<path> (cmd_nearline_index)."""
    prog = " ".join((PROG, *path))

    def func(args) -> int:
        problem = cmd.missing_extra() if cmd.missing_extra else None
        if problem:
            raise UsageError(problem)
        return cmd.run(args, prog)

    func.__name__ = func.__qualname__ = "cmd_" + "_".join(path)
    return func


def _add_commands(sub, commands: tuple[Command, ...], path: tuple[str, ...] = ()) -> None:
    for cmd in commands:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description, epilog=cmd.epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if cmd.subcommands:
            nested = p.add_subparsers(dest=f"{cmd.name}_command", metavar="COMMAND", required=True)
            _add_commands(nested, cmd.subcommands, (*path, cmd.name))
            continue
        cmd.add_arguments(p)
        p.set_defaults(func=_entry(cmd, (*path, cmd.name)), cli_command=cmd, parser=p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="postembed_fast: high-throughput post embeddings (padding-free BERT).",
        epilog=f"'{PROG} COMMAND --help' describes a command.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_commands(sub, COMMANDS)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        args.parser.error(str(exc))  # usage line + message, exit 2
    except InputError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # writing the output (input errors are InputError)
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
