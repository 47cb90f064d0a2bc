"""Reading posts from files: JSONL, JSONL.gz, plain text (one post per line) and Parquet, for
`postembed-fast embed`, the backfill and training. One table of file-name endings (SUFFIXES), one
parse of a JSONL line (parse_jsonl_line) and one check of a post (check_post), so every command
accepts the same names and says the same thing about the same bad line. An error names the file and
the line once, the file's line number:

    posts.jsonl:3: invalid JSON: Expecting ',' delimiter at character 17
    posts.parquet: row 3: text ('text') is int, not a string

The backfill reads its files on Ray Data (a line per row, a bad line a reject, not an error): it takes
SUFFIXES and the two functions; PostReader is the streaming reader of the other commands.
pyarrow (Parquet) is imported only when a Parquet input is read.
"""
from __future__ import annotations

import codecs
import gzip
import io
import itertools
import json
import sys
import zlib

from postembed_fast.cli_args import missing_extra

# The one table: a file name's ending (lower-cased) -> its format. A compressed file is gzip whatever
# its name (its magic bytes say so); a name found nowhere here is sniffed by PostReader.
SUFFIXES = {
    ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".ndjson": "jsonl", ".ndjson.gz": "jsonl",
    ".json": "jsonl", ".json.gz": "jsonl",
    ".txt": "text", ".txt.gz": "text",
    ".parquet": "parquet", ".pq": "parquet",
}
FORMATS = ("jsonl", "text", "parquet")
BOM = codecs.BOM_UTF8  # ignored at the start of a file
_GZIP_MAGIC = b"\x1f\x8b"
_PARQUET_MAGIC = b"PAR1"
_SNIFF_MAX_LINES = 65536  # blank lines buffered while looking for the first non-blank one
_PARQUET_BATCH = 4096  # rows read from a Parquet file at a time
_FIELDS_SHOWN = 10  # field names listed when the text field is missing


# ---------------------------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------------------------
def _longest_first():
    return sorted(SUFFIXES, key=len, reverse=True)


def format_of_name(path: str) -> str | None:
    """'jsonl' | 'text' | 'parquet' by SUFFIXES, or None for a name it does not know."""
    name = str(path).lower()
    return next((SUFFIXES[s] for s in _longest_first() if name.endswith(s)), None)


def suffixes(*formats: str) -> tuple[str, ...]:
    """The endings of these formats (all formats when none is given), longest first."""
    return tuple(s for s in _longest_first() if not formats or SUFFIXES[s] in formats)


def strip_suffix(name: str) -> str:
    """`posts.jsonl.gz` -> `posts` (a name whose ending is not in SUFFIXES is returned as is)."""
    suffix = next((s for s in _longest_first() if name.lower().endswith(s)), "")
    return name[: len(name) - len(suffix)]


# ---------------------------------------------------------------------------------------------
# one line, one post
# ---------------------------------------------------------------------------------------------
class InputError(ValueError):
    """A bad input: `NAME:LINE: message` (Parquet: `NAME: row N: message`; no number when the whole
    file is the problem)."""

    def __init__(self, name: str, line: int | None, message: str, *, unit: str = "line"):
        self.name, self.line, self.message, self.unit = name, line, message, unit
        if line is None:
            where = name
        else:
            where = f"{name}:{line}" if unit == "line" else f"{name}: {unit} {line}"
        super().__init__(f"{where}: {message}")


def type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def decode_line(raw: bytes) -> tuple[str | None, str | None]:
    """A line's bytes -> (text, None), or (None, why it is not UTF-8)."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return None, (f"not valid UTF-8 ({exc.reason} at byte {exc.start + 1} of the line: "
                      f"{raw[exc.start:exc.end]!r})")


def parse_jsonl_line(raw: bytes) -> tuple[dict | None, str | None]:
    """One JSONL line (bytes, its line ending kept or not) -> (the JSON object, None), or (None, why
    not): not UTF-8, blank, not JSON, not an object. The reason carries no line number (the caller
    knows it): a JSON error's position is the character in the line."""
    line, reason = decode_line(raw)
    if reason is not None:
        return None, reason
    if not line.strip():
        return None, "blank line (JSONL needs one JSON object per line)"
    try:
        obj = json.loads(line.rstrip("\r\n"))  # without its ending, the same line says the same thing
    except json.JSONDecodeError as exc:  # its msg, without the 'line X column Y' of the str (a line)
        return None, f"invalid JSON: {exc.msg.removesuffix(' at')} at character {exc.pos + 1}"
    except RecursionError:
        return None, "invalid JSON: nested too deeply"
    if not isinstance(obj, dict):
        return None, f"not a JSON object ({type_name(obj)})"
    return obj, None


def check_post(record: dict, text_field: str = "text", id_field: str | None = None):
    """A record -> (text, id, None), or (text or None, id or None, why it is not a post). The id (only
    with `id_field`) is a str or an int and is checked first, so a rejected text still has its id;
    a text must be a str that is valid Unicode (a JSON "\\ud800" escape is not)."""
    pid = None
    if id_field is not None:
        if id_field not in record:
            return None, None, f"missing id ({id_field!r})"
        pid = record[id_field]
        if pid is None:
            return None, None, f"missing id ({id_field!r} is null)"
        if isinstance(pid, bool) or not isinstance(pid, (str, int)):
            return None, None, f"id ({id_field!r}) is {type_name(pid)}, not a string or integer"
    if text_field not in record:
        fields = ", ".join(map(repr, list(record)[:_FIELDS_SHOWN])) or "none"
        return None, pid, f"missing text ({text_field!r}; fields: {fields})"
    text = record[text_field]
    if text is None:
        return None, pid, f"missing text ({text_field!r} is null)"
    if not isinstance(text, str):
        return None, pid, f"text ({text_field!r}) is {type_name(text)}, not a string"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate
        return None, pid, f"text ({text_field!r}) is not valid Unicode ({exc.reason} at character {exc.start + 1})"
    return text, pid, None


# ---------------------------------------------------------------------------------------------
# a file
# ---------------------------------------------------------------------------------------------
class PostReader:
    """One input file, or '-' for stdin, read once: as posts (`for text, id in reader`) or as records
    (`reader.records()`: (number, dict) for JSONL and Parquet). Streams: it holds one line (one
    Parquet batch), plus the leading blank lines while sniffing.

    The format: `fmt` if given; else Parquet by its magic bytes (files only); else SUFFIXES; else,
    with `sniff`, JSONL if the first non-blank line starts with '{' and plain text otherwise (without
    `sniff`: JSONL). gzip is found by its magic bytes whatever the name, stdin too. A UTF-8 BOM at the
    start is ignored.

    Lines: JSONL lines go through parse_jsonl_line and check_post; a blank one is an error, or skipped
    with `skip_blank`. Plain text: the line is the post, only its ending ('\\n', '\\r\\n') removed, an
    empty line an empty post. Parquet: columns `text_field` (and `ids_field`), checked by check_post.
    The first bad line raises InputError."""

    def __init__(self, path: str, fmt: str = "auto", text_field: str = "text", ids_field: str | None = None, *,
                 sniff: bool = True, skip_blank: bool = False, sniff_hint: str = ""):
        if fmt != "auto" and fmt not in FORMATS:
            raise ValueError(f"unknown input format {fmt!r}; valid: auto, {', '.join(FORMATS)}")
        self.path, self.name = path, "<stdin>" if path == "-" else str(path)
        self.text_field, self.ids_field, self.skip_blank = text_field, ids_field, skip_blank
        self.unit = "line"
        self.sniffed = False  # True when the first line decided the format
        self._hint = (" (read as JSONL because its first non-blank line starts with '{'"
                      + (f"; {sniff_hint}" if sniff_hint else "") + ")")
        self._head: list[bytes] = []
        self._raw = self._stream = None
        self.gzipped = False
        if path == "-":
            raw = sys.stdin.buffer
        else:
            try:
                raw = open(path, "rb")  # noqa: SIM115 (closed in close())
            except OSError as exc:
                raise InputError(self.name, None, exc.strerror or str(exc)) from None
        self._raw = raw
        stream = raw if hasattr(raw, "peek") else io.BufferedReader(raw)
        try:
            magic = stream.peek(4)[:4]
        except OSError as exc:
            self.close()
            raise InputError(self.name, None, f"cannot read: {exc}") from None
        self.gzipped = magic[:2] == _GZIP_MAGIC
        self._stream = gzip.GzipFile(fileobj=stream, mode="rb") if self.gzipped else stream
        if fmt == "auto":
            if magic == _PARQUET_MAGIC:
                fmt = "parquet"
            else:
                fmt = format_of_name(path) if path != "-" else None
            if fmt is None:
                fmt, self.sniffed = (self._sniff(), True) if sniff else ("jsonl", False)
        self.format = fmt
        if fmt == "parquet":
            self._open_parquet()

    def _open_parquet(self) -> None:
        self.unit = "row"
        if self.path == "-" or self.gzipped:
            self.close()
            raise InputError(self.name, None, "Parquet is read from a file (it needs to seek), not from stdin "
                                              "or gzip")
        problem = missing_extra("backfill", "pyarrow")
        if problem:
            self.close()
            raise InputError(self.name, None, f"reading Parquet needs pyarrow: {problem}")
        import pyarrow.parquet as pq

        try:
            self._parquet = pq.ParquetFile(self.path)
        except Exception as exc:  # noqa: BLE001 -- pyarrow raises ArrowInvalid, OSError, ...
            self.close()
            raise InputError(self.name, None, f"cannot read as Parquet: {exc}") from None

    def _sniff(self) -> str:
        """JSONL if the first non-blank line starts with '{'; lines read here are replayed later."""
        try:
            for raw in self._stream:
                self._head.append(raw)
                stripped = raw[len(BOM):] if len(self._head) == 1 and raw.startswith(BOM) else raw
                if stripped.strip():
                    return "jsonl" if stripped.lstrip().startswith(b"{") else "text"
                if len(self._head) >= _SNIFF_MAX_LINES:
                    break
        except (OSError, EOFError, zlib.error) as exc:
            raise InputError(self.name, None, f"cannot read: {exc}") from None
        # no non-blank line: empty input (either format), or only blank lines (text; JSONL with ids)
        return "jsonl" if self.ids_field is not None and not self._head else "text"

    def error(self, number: int | None, message: str) -> InputError:
        """An InputError at line (Parquet: row) `number` of this input, for a caller's own checks."""
        return InputError(self.name, number, message, unit=self.unit)

    # -- lines ----------------------------------------------------------------------------------
    def _lines(self):
        """(line number, bytes with their line ending), the first line without its BOM."""
        lines = itertools.chain(self._head, self._stream)
        self._head = []
        n = 0
        try:
            for n, raw in enumerate(lines, 1):
                if n == 1 and raw.startswith(BOM):
                    raw = raw[len(BOM):]
                yield n, raw
        except (OSError, EOFError, zlib.error) as exc:
            raise InputError(self.name, n + 1, f"cannot read: {exc}") from None

    def _jsonl_records(self):
        for n, raw in self._lines():
            if self.skip_blank and not raw.strip():
                continue
            rec, reason = parse_jsonl_line(raw)
            if reason is not None:
                if self.sniffed and not reason.startswith(("blank", "not valid UTF-8")):
                    reason += self._hint
                raise InputError(self.name, n, reason)
            yield n, rec

    # -- Parquet --------------------------------------------------------------------------------
    def _parquet_rows(self, columns: list[str] | None):
        names = self._parquet.schema_arrow.names
        missing = [c for c in columns or () if c not in names]
        if missing:
            raise InputError(self.name, None, f"no column {missing[0]!r} (columns: {', '.join(names) or 'none'})")
        n = 0
        try:
            for batch in self._parquet.iter_batches(batch_size=_PARQUET_BATCH, columns=columns):
                for rec in batch.to_pylist():
                    n += 1
                    yield n, rec
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise InputError(self.name, None, f"cannot read as Parquet: {exc}") from None

    # -- what callers read ----------------------------------------------------------------------
    def records(self):
        """(line or row number, dict) of a JSONL or Parquet input."""
        if self.format == "text":
            raise InputError(self.name, None, "plain text has no fields: JSONL or Parquet records are needed "
                                              f"(by name: {', '.join(suffixes('jsonl', 'parquet'))})")
        if self.format == "parquet":
            return self._parquet_rows(None)
        return self._jsonl_records()

    def __iter__(self):
        """(text, id); id is None without ids_field (and for plain text, which has none)."""
        if self.format == "text":
            for n, raw in self._lines():
                line, reason = decode_line(raw)
                if reason is not None:
                    raise InputError(self.name, n, reason)
                if line.endswith("\n"):
                    line = line[:-2] if line.endswith("\r\n") else line[:-1]
                yield line, None
            return
        if self.format == "parquet":
            columns = [self.text_field] + ([self.ids_field] if self.ids_field not in (None, self.text_field) else [])
            rows = self._parquet_rows(columns)
        else:
            rows = self._jsonl_records()
        for n, rec in rows:
            text, pid, reason = check_post(rec, self.text_field, self.ids_field)
            if reason is not None:
                raise self.error(n, reason)
            yield text, pid

    def close(self) -> None:
        if self._raw is not None and self._raw is not sys.stdin.buffer:
            self._raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
