"""The one reader of posts (postembed_fast/inputs.py) that `embed`, `backfill` and `train` share: every
format (JSONL, JSONL.gz, NDJSON, plain text, stdin, Parquet), one suffix table for all three, and one
message per bad line that names the file and the file's line number once."""
from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys

import pytest

from postembed_fast import inputs
from postembed_fast.inputs import SUFFIXES, InputError, PostReader, check_post, parse_jsonl_line

POSTS = [{"id": "a", "text": "first post"}, {"id": 7, "text": "  second, with spaces  "},
         {"id": "c", "text": "caf\u00e9 \u2028 inside"}]
JSONL = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in POSTS).encode("utf-8")
WANT = [(p["text"], p["id"]) for p in POSTS]


def read(path, **kw):
    with PostReader(str(path), **kw) as r:
        return r.format, list(r)


def error_of(path, **kw) -> str:
    with pytest.raises(InputError) as exc:
        read(path, **kw)
    return str(exc.value)


def assert_one_line_number(message: str, path, line: int):
    """`path:line: ...`, and no other line number in the message (no decoder 'line X column Y')."""
    assert message.startswith(f"{path}:{line}: "), message
    rest = message[len(f"{path}:{line}: "):]
    assert not re.search(r"line \d|column \d|char \d", rest), message


# ---- one suffix table ---------------------------------------------------------------------------
def test_suffix_table_is_the_one_every_command_uses():
    from postembed_fast.backfill import inputs as backfill_inputs
    from postembed_fast.backfill.layout import BackfillError

    assert set(SUFFIXES.values()) == set(inputs.FORMATS) == {"jsonl", "text", "parquet"}
    for suffix, fmt in SUFFIXES.items():
        name = f"/data/Posts-2024{suffix.upper()}"  # case does not matter
        assert inputs.format_of_name(name) == fmt, suffix
        assert inputs.strip_suffix(f"posts{suffix}") == "posts"
        if fmt == "text":  # plain text has no ids: the backfill says so, with the same table
            with pytest.raises(BackfillError, match="plain text has no ids"):
                backfill_inputs.input_format(name)
        else:
            assert backfill_inputs.input_format(name) == fmt, suffix
    assert set(backfill_inputs.JSONL_SUFFIXES) == {s for s, f in SUFFIXES.items() if f == "jsonl"}
    assert set(backfill_inputs.PARQUET_SUFFIXES) == {s for s, f in SUFFIXES.items() if f == "parquet"}
    assert inputs.format_of_name("posts.csv") is None and inputs.strip_suffix("posts.csv") == "posts.csv"
    with pytest.raises(BackfillError, match="unknown input format"):
        backfill_inputs.input_format("posts.csv")
    # the longest ending wins: .jsonl.gz is not '.gz' of something else
    assert inputs.suffixes("jsonl")[0].count(".") == 2


@pytest.mark.parametrize("suffix", [s for s, f in SUFFIXES.items() if f == "jsonl"])
def test_every_jsonl_suffix_reads_the_same_posts(tmp_path, suffix):
    path = tmp_path / f"posts{suffix}"
    path.write_bytes(gzip.compress(JSONL) if suffix.endswith(".gz") else JSONL)
    assert read(path, ids_field="id") == ("jsonl", WANT)


def test_gzip_is_found_by_its_bytes_whatever_the_name(tmp_path):
    (tmp_path / "posts.jsonl").write_bytes(gzip.compress(JSONL))  # gzip under a plain name
    (tmp_path / "posts.data").write_bytes(gzip.compress(JSONL))  # and under no known name: sniffed
    assert read(tmp_path / "posts.jsonl", ids_field="id") == ("jsonl", WANT)
    with PostReader(str(tmp_path / "posts.data"), ids_field="id") as r:
        assert r.gzipped and r.sniffed and r.format == "jsonl" and list(r) == WANT


# ---- plain text ---------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".txt", ".txt.gz"])
def test_plain_text_lines_are_posts(tmp_path, suffix):
    texts = ["first", "", "  kept whitespace \t", "{not json}", "last"]
    data = ("\r\n".join(texts[:3]) + "\n" + "\n".join(texts[3:])).encode()  # CRLF and LF; no final newline
    path = tmp_path / f"posts{suffix}"
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    assert read(path) == ("text", [(t, None) for t in texts])
    with PostReader(str(path)) as r, pytest.raises(InputError, match=r"plain text has no fields"):
        list(r.records())


def test_sniffing_an_unknown_name(tmp_path):
    (tmp_path / "a.data").write_bytes(b"\n\n" + JSONL)  # leading blank lines, then '{': JSONL
    (tmp_path / "b.data").write_bytes(b"just a post\n{second}\n")
    with PostReader(str(tmp_path / "a.data"), skip_blank=True) as r:
        assert r.sniffed and r.format == "jsonl" and [t for t, _ in r] == [p["text"] for p in POSTS]
    assert read(tmp_path / "b.data") == ("text", [("just a post", None), ("{second}", None)])
    # a sniffed JSONL error says why the file was read as JSONL
    (tmp_path / "c.data").write_bytes(b'{"text": "x"}\n{oops}\n')
    message = error_of(tmp_path / "c.data")
    assert_one_line_number(message, tmp_path / "c.data", 2)
    assert "read as JSONL because its first non-blank line starts with '{'" in message
    # without sniffing (train), an unknown name is JSONL
    with PostReader(str(tmp_path / "b.data"), sniff=False) as r:
        assert r.format == "jsonl"


# ---- stdin ------------------------------------------------------------------------------------
def test_stdin(tmp_path):
    """'-' reads the process's real stdin (a pipe): sniffed, gzip by its bytes, BOM ignored."""
    script = ("import json, sys; from postembed_fast.inputs import PostReader\n"
              "with PostReader('-', ids_field=sys.argv[1] or None) as r:\n"
              "    print(json.dumps({'name': r.name, 'format': r.format, 'posts': list(r)}))\n")

    def run(data: bytes, ids: str = ""):
        p = subprocess.run([sys.executable, "-c", script, ids], input=data, capture_output=True, cwd=tmp_path,
                           timeout=120)
        assert p.returncode == 0, p.stderr.decode()
        return json.loads(p.stdout)

    got = run(gzip.compress(inputs.BOM + JSONL), "id")
    assert got == {"name": "<stdin>", "format": "jsonl", "posts": [list(w) for w in WANT]}
    got = run(b"one\ntwo\n")
    assert got["format"] == "text" and got["posts"] == [["one", None], ["two", None]]


# ---- Parquet ----------------------------------------------------------------------------------
@pytest.fixture
def pq():
    pytest.importorskip("pyarrow", reason="Parquet needs pyarrow (the backfill extra)")
    import pyarrow.parquet

    return pyarrow.parquet


@pytest.fixture
def parquet_file(tmp_path, pq):
    pa = sys.modules["pyarrow"]
    path = tmp_path / "posts.parquet"
    pq.write_table(pa.table({"id": pa.array([1, 2, 3], pa.int64()), "body": ["one", "two", "three"],
                             "tags": [["a"], [], ["b", "c"]]}), path, row_group_size=2)
    return path


def test_parquet_posts_and_records(parquet_file, tmp_path):
    assert read(parquet_file, text_field="body", ids_field="id") == \
        ("parquet", [("one", 1), ("two", 2), ("three", 3)])
    with PostReader(str(parquet_file)) as r:
        assert [n for n, _ in r.records()] == [1, 2, 3]
    with PostReader(str(parquet_file)) as r:
        assert list(r.records())[2] == (3, {"id": 3, "body": "three", "tags": ["b", "c"]})
    # by its magic bytes under any name
    (tmp_path / "posts.bin").write_bytes(parquet_file.read_bytes())
    assert read(tmp_path / "posts.bin", text_field="body")[0] == "parquet"


def test_parquet_errors_name_the_row_or_column(tmp_path, parquet_file, pq):
    pa = sys.modules["pyarrow"]
    path = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["fine", None, "x"]}), path)
    message = error_of(path)
    assert message == f"{path}: row 2: missing text ('text' is null)"
    assert error_of(parquet_file) == f"{parquet_file}: no column 'text' (columns: id, body, tags)"
    nums = tmp_path / "nums.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), nums)
    assert error_of(nums) == f"{nums}: row 1: text ('text') is int, not a string"


def test_parquet_without_pyarrow_says_what_to_install(parquet_file, monkeypatch):
    for name in [m for m in sys.modules if m == "pyarrow" or m.startswith("pyarrow.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if the extra were not installed
    message = error_of(parquet_file, text_field="body")
    assert message.startswith(f"{parquet_file}: reading Parquet needs pyarrow: pyarrow is not installed; "
                              "install with: pip install 'postembed_fast[")


# ---- bad lines: one message, the file's line number once --------------------------------------------
BAD = [  # (line 3 of a file, reason)
    (b'{"id": "c" "text": "y"}', "invalid JSON: Expecting ',' delimiter at character 12"),
    (b'{"id": "c", "text": "x"', "invalid JSON: Expecting ',' delimiter at character 24"),  # was ': line 2 column 1'
    (b'{"id": "c", "text": "unterminated', "invalid JSON: Unterminated string starting at character 21"),
    (b'["a", "list"]', "not a JSON object (list)"),
    (b'"a string"', "not a JSON object (str)"),
    (b'{"id": "c", "body": "x"}', "missing text ('text'; fields: 'id', 'body')"),
    (b'{"id": "c", "text": null}', "missing text ('text' is null)"),
    (b'{"id": "c", "text": 5}', "text ('text') is int, not a string"),
    (b'{"id": "c", "text": "\\ud800 lone"}',
     "text ('text') is not valid Unicode (surrogates not allowed at character 1)"),
    (b'{"id": "c", "text": "caf\xe9"}', "not valid UTF-8 (invalid continuation byte at byte 25 of the line: "
                                        "b'\\xe9')"),
    (b'   ', "blank line (JSONL needs one JSON object per line)"),
]


@pytest.mark.parametrize("line, reason", BAD, ids=[r for _, r in BAD])
def test_a_bad_line_names_the_file_and_its_line_once(tmp_path, line, reason):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(JSONL[: JSONL.index(b"\n", JSONL.index(b"\n") + 1) + 1] + line + b"\n" + JSONL)
    message = error_of(path)
    assert message == f"{path}:3: {reason}"
    assert_one_line_number(message, path, 3)
    # the per-line functions the backfill uses give the same reason (as a reject, not an error)
    from postembed_fast.backfill.rows import check_row, parse_jsonl_line as backfill_parse

    rec, why, _ = backfill_parse(line)
    if why is None:
        why = check_row(rec, "text", "id")[2]
    assert why == reason


def test_a_json_error_on_a_later_line_of_the_document_has_no_second_line_number(tmp_path):
    """json.loads of a line never sees another line, so its 'line X column Y' is only noise: a
    pretty-printed object fails on its first line, at a character of that line."""
    path = tmp_path / "pretty.jsonl"
    path.write_text('{\n  "text": "x"\n}\n')
    message = error_of(path)
    assert_one_line_number(message, path, 1)
    assert message == f"{path}:1: invalid JSON: Expecting property name enclosed in double quotes at character 2"


def test_blank_lines_error_or_skip_and_line_numbers_stay_the_files(tmp_path):
    path = tmp_path / "posts.jsonl"
    path.write_bytes(b"\n" + JSONL[: JSONL.index(b"\n") + 1] + b"  \r\n\n" + b"[1]\n")
    assert error_of(path) == f"{path}:1: blank line (JSONL needs one JSON object per line)"  # embed
    assert error_of(path, skip_blank=True) == f"{path}:5: not a JSON object (list)"  # train, backfill


def test_bom_only_at_the_start(tmp_path):
    path = tmp_path / "posts.jsonl"
    path.write_bytes(inputs.BOM + JSONL)
    assert read(path, ids_field="id") == ("jsonl", WANT)
    (tmp_path / "posts.txt").write_bytes(inputs.BOM + b"one\n" + inputs.BOM + b"two\n")
    assert read(tmp_path / "posts.txt")[1] == [("one", None), ("\ufefftwo", None)]  # only the file's BOM


def test_invalid_utf8_in_plain_text(tmp_path):
    path = tmp_path / "posts.txt"
    path.write_bytes(b"ok\nfine\nbad \xff byte\n")
    message = error_of(path)
    assert message == f"{path}:3: not valid UTF-8 (invalid start byte at byte 5 of the line: b'\\xff')"


def test_ids_checked_first_and_kept_as_given():
    assert check_post({"id": 12, "text": "x"}, "text", "id") == ("x", 12, None)
    assert check_post({"id": "k", "text": 3}, "text", "id") == (None, "k", "text ('text') is int, not a string")
    assert check_post({"text": "x"}, "text", "id") == (None, None, "missing id ('id')")
    assert check_post({"id": None, "text": "x"}, "text", "id")[2] == "missing id ('id' is null)"
    assert check_post({"id": True, "text": "x"}, "text", "id")[2] == "id ('id') is bool, not a string or integer"
    assert check_post({"id": 1.5, "text": "x"}, "text", "id")[2] == "id ('id') is float, not a string or integer"
    assert check_post({"text": "x"}, "text") == ("x", None, None)  # no id field asked for
    assert parse_jsonl_line(b'{"a": 1}\r\n') == ({"a": 1}, None)
    assert parse_jsonl_line(b"[" * 100000)[1].startswith("invalid JSON")  # nested too deeply: a reason


def test_missing_file_and_the_same_errors_in_train(tmp_path):
    assert error_of(tmp_path / "nope.jsonl") == f"{tmp_path / 'nope.jsonl'}: No such file or directory"
    from postembed_fast.train.data import read_posts

    path = tmp_path / "train.jsonl"
    good = json.dumps({"id": "a", "source": "s", "section": "x", "title": "t", "text": "u"})
    path.write_text(good + "\n\n" + '{"id": "b" "source": "s"}\n')
    with pytest.raises(InputError) as exc:
        read_posts(path)
    assert str(exc.value) == f"{path}:3: invalid JSON: Expecting ',' delimiter at character 12"
    with pytest.raises(ValueError, match=r"train.jsonl:3: not a JSON object \(list\)"):  # still a ValueError
        path.write_text(good + "\n\n[1]\n")
        read_posts(path)


def test_train_reads_parquet_as_it_reads_jsonl(tmp_path, pq):
    from postembed_fast.train.data import read_posts

    pa = sys.modules["pyarrow"]
    rows = [{"id": f"p{i}", "source": f"s{i % 3}", "section": "utils", "title": f"t{i}", "text": f"post {i}",
             "tags": ["use::editing", "culture::TODO"] if i % 2 else []} for i in range(7)]
    (tmp_path / "posts.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "posts.parquet", row_group_size=3)
    posts = read_posts(tmp_path / "posts.jsonl.gz")
    assert read_posts(tmp_path / "posts.parquet") == posts and len(posts) == 7
    assert posts[1].tags == ("use::editing",)
    pq.write_table(pa.Table.from_pylist(rows + [rows[2]]), tmp_path / "again.parquet")
    with pytest.raises(InputError, match=r"again\.parquet: row 8: id 'p2' repeats row 3"):
        read_posts(tmp_path / "again.parquet")
