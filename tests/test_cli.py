"""The `postembed-fast` command, run for real in a subprocess (`python -m postembed_fast` and, where
installed, the console script) on small inputs made from the committed posts."""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parent / "data" / "posts.jsonl.gz"  # as conftest.load_posts reads it
SCRIPT = shutil.which("postembed-fast", path=str(Path(sys.executable).parent))


def run(tmp_path, *args, stdin: bytes | None = None, script=False):
    # cwd=tmp_path: `python -m` puts the cwd first on sys.path, and the source tree must not shadow
    # the installed package (conftest.py).
    cmd = [SCRIPT] if script else [sys.executable, "-m", "postembed_fast"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(cmd + [str(a) for a in args], cwd=tmp_path, input=stdin if stdin is not None else b"",
                          capture_output=True, timeout=300, env=env)


def run_all(calls):
    """Several (cwd, args, kwargs) runs at once (most of a run is Python/torch start-up)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda c: run(c[0], *c[1], **c[2]), calls))


def stderr(proc) -> str:
    return proc.stderr.decode("utf-8", "replace")


@pytest.fixture(scope="module")
def rows():
    with gzip.open(DATA, "rt", encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(10)]


@pytest.fixture(scope="module")
def one_line_texts(rows):
    # plain-text posts are single lines: the sample's texts have newlines inside
    return [r["text"].replace("\n", " ") for r in rows]


def test_jsonl_gz_chunks_and_int_ids(tmp_path, rows, embedder):
    texts = [r["text"] for r in rows]
    src = tmp_path / "in.jsonl.gz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({"n": 1000 + i, "body": r["text"], "other": [1, 2]}) + "\n")
    p = run(tmp_path, "embed", src.name, "--output", "out.npy", "--device", "cpu", "--dtype", "float32",
            "--chunk-size", "3", "--text-field", "body", "--ids-field", "n", "--no-progress")
    assert p.returncode == 0, stderr(p)
    out = np.load(tmp_path / "out.npy")
    assert out.dtype == np.float32 and out.shape == (10, embedder.dim)
    np.testing.assert_allclose(out, embedder.embed(texts), rtol=0, atol=1e-6)  # 4 chunks, input order
    ids = np.load(tmp_path / "out.ids.npy")
    assert ids.dtype == np.int64 and ids.tolist() == list(range(1000, 1010))
    err = stderr(p)
    assert "10 posts" in err and "dim 384" in err and "float32" in err and "posts/s" in err
    assert "\r" not in err  # --no-progress
    assert sorted(x.name for x in tmp_path.iterdir()) == ["in.jsonl.gz", "out.ids.npy", "out.npy"]  # no temp files


def test_stdin_jsonl_sniffed_str_ids_int8_with_progress(tmp_path, rows, embedder):
    texts = [r["text"] for r in rows]
    data = "\ufeff" + "".join(json.dumps({"id": r["id"], "text": r["text"]}) + "\n" for r in rows)  # BOM ignored
    p = run(tmp_path, "embed", "-", "--output", "codes.npy", "--device", "cpu", "--dtype", "float32",
            "--precision", "int8", "--ids-field", "id", "--ids-output", "keys.npy", stdin=data.encode("utf-8"))
    assert p.returncode == 0, stderr(p)
    out = np.load(tmp_path / "codes.npy")
    ref = embedder.embed(texts, precision="int8")
    assert out.dtype == np.int8 and out.shape == ref.shape == (10, 384)
    assert np.abs(out.astype(np.int16) - ref).max() <= 1 and (out == ref).mean() > 0.999  # ties may round apart
    ids = np.load(tmp_path / "keys.npy")
    assert ids.dtype.kind == "U" and ids.tolist() == [r["id"] for r in rows]
    assert not (tmp_path / "codes.ids.npy").exists()
    assert "embedding" in stderr(p) and "10 posts" in stderr(p)  # progress bar, summary


def test_plain_text_file_binary_dimensions_empty_lines(tmp_path, one_line_texts, embedder):
    # an empty line is an empty post; other whitespace is kept; CRLF endings are line endings;
    # the file's name says nothing, its first line does not start with '{': plain text
    texts = one_line_texts[:4] + ["", "   indented post  "] + one_line_texts[4:]
    (tmp_path / "posts.data").write_bytes("\r\n".join(texts).encode("utf-8") + b"\r\n")
    script = SCRIPT is not None
    p = run(tmp_path, "embed", "posts.data", "--output", "bits.npy", "--device", "cpu", "--dtype", "float32",
            "--precision", "binary", "--dimensions", "128", "--no-progress", script=script)
    assert p.returncode == 0, stderr(p)
    out = np.load(tmp_path / "bits.npy")
    ref = embedder.embed(texts, precision="binary", dimensions=128)
    assert out.dtype == np.int8 and out.shape == (12, 16)
    np.testing.assert_array_equal(out, ref)
    assert "dim 128" in stderr(p) and "binary" in stderr(p)


def test_stdin_plain_text_dimensions(tmp_path, one_line_texts, embedder):
    texts = ["", *one_line_texts[:3], "", "{not json, but --format text}"]
    p = run(tmp_path, "embed", "-", "-o", "small.npy", "--device", "cpu", "--dtype", "float32",
            "--dimensions", "64", "--format", "text",
            "--batch-tokens", "64", "--no-progress", stdin="\n".join(texts).encode("utf-8"))  # no final newline
    assert p.returncode == 0, stderr(p)
    out = np.load(tmp_path / "small.npy")
    assert out.shape == (6, 64) and out.dtype == np.float32
    np.testing.assert_allclose(out, embedder.embed(texts, dimensions=64), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)


def test_empty_input(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    p = run(tmp_path, "embed", "empty.jsonl", "--output", "e.npy", "--device", "cpu", "--ids-field", "id",
            "--no-progress")
    assert p.returncode == 0, stderr(p)
    out = np.load(tmp_path / "e.npy")
    assert out.shape == (0, 384) and out.dtype == np.float32
    assert np.load(tmp_path / "e.ids.npy").shape == (0,)
    assert "0 posts" in stderr(p)


GOOD = json.dumps({"id": "a", "text": "a fine post"})
# the reasons are postembed_fast.inputs' (the same for embed, backfill and train; tests/test_inputs.py)
BAD_LINES = {
    "invalid JSON: Unterminated string starting at character 21":
        (GOOD + "\n" + GOOD + "\n" + '{"id": "c", "text": "unterminated\n').encode(),
    "not a JSON object (list)": (GOOD + "\n" + GOOD + "\n" + '["text"]\n').encode(),
    "missing text ('text'; fields: 'id', 'body')": (GOOD + "\n" + GOOD + "\n" + '{"id": "c", "body": "x"}\n').encode(),
    "missing text ('text' is null)": (GOOD + "\n" + GOOD + "\n" + '{"id": "c", "text": null}\n').encode(),
    "not valid UTF-8": (GOOD + "\n" + GOOD + "\n").encode() + b'{"id": "c", "text": "caf\xe9"}\n',
}
# the same checks, run in-process (cli.main) to keep the file quick
MORE_BAD_LINES = {
    "blank line": (GOOD + "\n" + GOOD + "\n" + "  \n" + GOOD + "\n").encode(),
    "id ('id') is float, not a string or integer": (GOOD + "\n" + GOOD + "\n" + '{"id": 1.5, "text": "x"}\n').encode(),
    "missing id ('id' is null)": (GOOD + "\n" + GOOD + "\n" + '{"id": null, "text": "x"}\n').encode(),
    "missing id ('id')": (GOOD + "\n" + GOOD + "\n" + '{"text": "x"}\n').encode(),
    "text ('text') is not valid Unicode": (GOOD + "\n" + GOOD + "\n" + '{"id": "c", "text": "\\ud800"}\n').encode(),
    "not valid UTF-8": b"ok\nfine\n\xff\n",  # gz, sniffed as text: the UTF-8 check is the same for both formats
}


def test_bad_lines_exit_2_with_line_number_no_output(tmp_path):
    """Each kind of bad line (line 3; the rest fine) -> exit 2, 'INPUT:3: ...', nothing written.
    The first chunk is read before the model loads, so these runs are quick."""
    calls = []
    for i, data in enumerate(BAD_LINES.values()):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "in.jsonl").write_bytes(data)
        calls.append((tmp_path / str(i), ["embed", "in.jsonl", "--output", "out.npy", "--device", "cpu",
                                          "--ids-field", "id", "--no-progress"], {}))
    for (kind, p), (cwd, _, _) in zip(zip(BAD_LINES, run_all(calls)), calls):
        assert p.returncode == 2, (kind, stderr(p))
        assert f"in.jsonl:3: {kind}" in stderr(p), (kind, stderr(p))
        assert not re.search(r"line \d+ column", stderr(p)), stderr(p)  # one line number: the file's
        assert sorted(x.name for x in cwd.iterdir()) == ["in.jsonl"], kind  # no output, no ids, no temp files


def test_more_bad_lines_in_process(tmp_path, capsys, monkeypatch):
    from postembed_fast.cli import main

    monkeypatch.chdir(tmp_path)
    for kind, data in MORE_BAD_LINES.items():
        name = "in.jsonl" if kind != "not valid UTF-8" else "in.gz"
        (tmp_path / name).write_bytes(data if kind != "not valid UTF-8" else gzip.compress(data))
        ids = ["--ids-field", "id"] if kind != "not valid UTF-8" else []
        assert main(["embed", name, "--output", "out.npy", "--device", "cpu", "--no-progress", *ids]) == 2, kind
        err = capsys.readouterr().err
        assert f"{name}:3: {kind}" in err, (kind, err)
        assert sorted(x.name for x in tmp_path.iterdir()) == [name], kind
        (tmp_path / name).unlink()


def test_bad_line_after_first_chunk_leaves_no_output(tmp_path, rows):
    """A bad line found after rows were already written: the partial output is removed, an old OUT stays."""
    lines = [json.dumps({"text": r["text"]}) for r in rows] + ['{"text": 5}']
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "out.npy").write_bytes(b"old")
    p = run(tmp_path, "embed", "-", "--output", "out.npy", "--device", "cpu", "--chunk-size", "4", "--no-progress",
            stdin=(tmp_path / "in.jsonl").read_bytes())
    assert p.returncode == 2, stderr(p)
    assert "<stdin>:11: text ('text') is int, not a string" in stderr(p)
    assert (tmp_path / "out.npy").read_bytes() == b"old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["in.jsonl", "out.npy"]


def _far_bad_line(tmp_path, name="in.jsonl", bad_at=2501) -> Path:
    """A JSONL file, good posts up to `bad_at` (well past the first chunk, 1024 on CPU) then a bad line."""
    lines = [json.dumps({"id": i, "text": f"post number {i}"}) for i in range(1, bad_at)]
    lines += [json.dumps({"id": bad_at, "text": 5})] + [json.dumps({"id": 0, "text": "after"})] * 3
    path = tmp_path / name
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return path


def test_a_file_is_checked_before_the_model_loads(tmp_path):
    """A bad line far into a file: exit 2 naming that line, and nothing embedded or written. --model is a
    folder that does not exist: the error reported is the line's, so the check ran before the model
    loaded; the same model flag on a good file is the model's error (the flag would have failed)."""
    bad = _far_bad_line(tmp_path, "in.jsonl.gz")
    (tmp_path / "good.jsonl").write_text(json.dumps({"id": 1, "text": "fine"}) + "\n", encoding="utf-8")
    (tmp_path / "out.npy").write_bytes(b"old")
    flags = ["--output", "out.npy", "--ids-field", "id", "--device", "cpu", "--chunk-size", "4",
             "--model", tmp_path / "no-such-model"]
    bad_run, good_run = run_all([(tmp_path, ["embed", bad.name, *flags], {}),
                                 (tmp_path, ["embed", "good.jsonl", *flags], {})])
    assert bad_run.returncode == 2, stderr(bad_run)
    assert "in.jsonl.gz:2501: text ('text') is int, not a string" in stderr(bad_run)
    assert "no-such-model" not in stderr(bad_run) and "embedding" not in stderr(bad_run)
    assert "checking" in stderr(bad_run)  # the checking pass's progress bar
    assert good_run.returncode == 2 and "no-such-model" in stderr(good_run), stderr(good_run)
    assert (tmp_path / "out.npy").read_bytes() == b"old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["good.jsonl", "in.jsonl.gz", "out.npy"]  # no ids, temps


def test_a_pipe_is_read_once_as_it_streams(tmp_path, rows, embedder):
    """A named pipe (as `<(zcat posts.gz)` is) cannot be read twice: it streams like stdin, every post
    embedded; a bad line in it is reported with its number."""
    texts = [r["text"] for r in rows]
    fifo = tmp_path / "posts.fifo"
    os.mkfifo(fifo)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def embed_from_fifo(data: bytes, out: str):
        proc = subprocess.Popen([sys.executable, "-m", "postembed_fast", "embed", fifo.name, "-o", out,
                                 "--format", "jsonl", "--device", "cpu", "--dtype", "float32",
                                 "--no-progress"],
                                cwd=tmp_path, stderr=subprocess.PIPE, env=env)
        try:
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline:  # until the command opens it to read
                try:
                    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                except OSError:  # ENXIO: no reader yet
                    time.sleep(0.05)
                    continue
                os.set_blocking(fd, True)
                with open(fd, "wb") as f:
                    f.write(data)
                break
            _, err = proc.communicate(timeout=120)  # opening it a second time would wait for a writer forever
        finally:
            proc.kill()
        return proc.returncode, err.decode("utf-8", "replace")

    good = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    code, err = embed_from_fifo(good, "out.npy")
    assert code == 0, err
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), embedder.embed(texts), rtol=0, atol=1e-6)
    code, err = embed_from_fifo(good + b'{"text": null}\n', "bad.npy")
    assert code == 2 and "posts.fifo:11: missing text ('text' is null)" in err, err
    assert not (tmp_path / "bad.npy").exists()


def test_rereadable_inputs_are_regular_files(tmp_path):
    from postembed_fast.cli import rereadable

    (tmp_path / "f.jsonl").write_bytes(b"")
    os.mkfifo(tmp_path / "p")
    assert rereadable(str(tmp_path / "f.jsonl"))
    assert not rereadable("-") and not rereadable(str(tmp_path / "p")) and not rereadable(str(tmp_path))
    assert not rereadable(str(tmp_path / "missing.jsonl"))  # PostReader reports it


def test_output_names_must_end_in_npy(tmp_path, capsys, monkeypatch):
    """-o / --ids-output name .npy files: another ending is a usage error naming the flag (exit 2, nothing
    written, the input not even read); .NPY is fine, and its ids go to OUT.ids.npy."""
    from postembed_fast.cli import default_ids_path, main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": i, "text": f"post {i}"}) + "\n" for i in (1, 2)),
                                       encoding="utf-8")
    for flags, flag, value in ((["-o", "out.txt"], "-o/--output", "out.txt"),
                               (["--output", "out"], "-o/--output", "out"),
                               (["-o", "out.npy", "--ids-field", "id", "--ids-output", "ids.txt"], "--ids-output",
                                "ids.txt")):
        with pytest.raises(SystemExit) as exc:
            main(["embed", "in.jsonl", *flags, "--device", "cpu", "--no-progress"])
        assert exc.value.code == 2, flags
        err = capsys.readouterr().err
        assert f"argument {flag}: must end in .npy" in err and repr(value) in err, err
        assert sorted(x.name for x in tmp_path.iterdir()) == ["in.jsonl"], flags

    assert default_ids_path("d/OUT.NPY") == "d/OUT.ids.npy" and default_ids_path("emb.npy") == "emb.ids.npy"
    assert main(["embed", "in.jsonl", "-o", "OUT.NPY", "--ids-field", "id", "--device", "cpu"]) == 0
    assert np.load(tmp_path / "OUT.NPY").shape == (2, 384)
    assert np.load(tmp_path / "OUT.ids.npy").tolist() == [1, 2]
    err = capsys.readouterr().err
    assert "checking" in err and "2/2" in err, err  # the checking pass gives the embedding bar its total


def test_usage_errors_help_version(tmp_path):
    from postembed_fast import PRECISIONS, __version__

    (tmp_path / "in.txt").write_text("a post\n", encoding="utf-8")
    bad_precision, ids_on_text, missing, version, help_, embed_help = run_all([
        (tmp_path, ["embed", "in.txt", "--output", "o.npy", "--precision", "int4"], {}),
        (tmp_path, ["embed", "in.txt", "--output", "o.npy", "--ids-field", "id"], {}),
        (tmp_path, ["embed", "missing.jsonl", "--output", "o.npy"], {}),
        (tmp_path, ["--version"], {}),
        (tmp_path, ["--help"], {}),
        (tmp_path, ["embed", "--help"], {}),
    ])
    assert bad_precision.returncode == 2 and "invalid choice: 'int4'" in stderr(bad_precision)
    assert all(v in stderr(bad_precision) for v in PRECISIONS)
    assert ids_on_text.returncode == 2 and "--ids-field needs JSONL or Parquet input" in stderr(ids_on_text)
    assert missing.returncode == 2 and "missing.jsonl: No such file" in stderr(missing)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["in.txt"]

    assert version.returncode == 0 and version.stdout.decode().strip() == f"postembed-fast {__version__}"
    assert help_.returncode == 0
    for name in ("embed", "serve", "nearline", "backfill", "train"):
        assert name in help_.stdout.decode(), name
    out = embed_help.stdout.decode()
    assert embed_help.returncode == 0
    for flag in ("--output", "--model", "--precision", "--dimensions", "--device", "--dtype", "--batch-tokens",
                 "--chunk-size", "--text-field", "--ids-field", "--ids-output", "--no-progress", "--format"):
        assert flag in out, flag
    assert "EMPTY LINE IS AN EMPTY POST" in out and "OUT.ids.npy" in out
    words = " ".join(out.split())  # argparse wraps the help text
    assert "A file is read twice: every line is checked first" in words  # INPUT's help: a file, and stdin
    assert "before the model loads or any post is embedded" in words
    assert "stdin (or a pipe) is read once and checked as it streams" in words
    assert "a name ending in .npy" in words


def test_nearline_subcommand_parses_the_worker_flags():
    """`postembed-fast nearline embed` is the worker of `python -m postembed_fast.nearline embed`."""
    from postembed_fast.cli import build_parser

    args = build_parser().parse_args(["nearline", "embed", "--stream", "s", "--group", "g", "--consumer", "c",
                                      "--precision", "binary", "--batch-max", "7", "--device", "cpu"])
    assert args.func.__name__ == "cmd_nearline_embed"
    assert args.cli_command.name == "embed" and args.parser.prog == "postembed-fast nearline embed"
    assert (args.stream, args.group, args.consumer, args.precision, args.batch_max) == ("s", "g", "c", "binary", 7)


# ---- one table of subcommands, one ModelOptions ---------------------------------------------------
_HELP_SCRIPT = """
import contextlib, io, json, sys
from postembed_fast.cli import COMMANDS, main

def leaves(commands, path=()):
    for c in commands:
        yield from leaves(c.subcommands, path + (c.name,)) if c.subcommands else [path + (c.name,)]

helps = {}
for path in leaves(COMMANDS):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main([*path, "--help"])
        except SystemExit as exc:
            assert exc.code == 0, (path, exc.code)
    helps[" ".join(path)] = out.getvalue()
heavy = ("sentence_transformers", "datasets", "accelerate", "transformers", "redis", "ray", "starlette", "uvicorn",
         "pyarrow", "orjson")
loaded = [m for m in heavy if m in sys.modules]
sys.modules["sentence_transformers"] = None  # the train extra, as if not installed
err = io.StringIO()
with contextlib.redirect_stderr(err):
    try:
        code = main(["train", "--data", "posts.jsonl", "--out", "model"])
    except SystemExit as exc:
        code = exc.code
print(json.dumps({"helps": helps, "loaded": loaded, "train_code": code, "train_err": err.getvalue()}))
"""


def test_every_subcommand_helps_without_its_extra_and_train_says_what_to_install(tmp_path):
    """Every row of the table (train too) prints its --help in a fresh process without importing any
    extra or the model; train without its extra exits 2 naming the pip extra."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", _HELP_SCRIPT], cwd=tmp_path, capture_output=True, timeout=300, env=env)
    assert p.returncode == 0, stderr(p)
    got = json.loads(p.stdout)
    assert sorted(got["helps"]) == ["backfill", "embed", "nearline embed", "nearline index", "serve", "train"]
    for name, flags in {"embed": ["--output", "--format", "--batch-tokens"], "serve": ["--max-batch-tokens"],
                        "nearline embed": ["--stream", "--batch-tokens"], "nearline index": ["--snapshot"],
                        "backfill": ["--input", "--load-into", "--batch-tokens"],
                        "train": ["--data", "--out", "--base", "--device"]}.items():
        assert f"usage: postembed-fast {name}" in got["helps"][name], name
        for flag in ("--model", "--device", "--dtype") if name != "train" else ():
            assert flag in got["helps"][name], (name, flag)
        for flag in flags:
            assert flag in got["helps"][name], (name, flag)
    # train takes only --device of the model flags; its --dtype is the training precision (auto default)
    assert "--dtype {auto,float32,bfloat16}" in got["helps"]["train"]
    assert got["loaded"] == [], got["loaded"]
    assert got["train_code"] == 2
    assert ("sentence_transformers is not installed; install with: pip install 'postembed_fast[train]'"
            in got["train_err"]), got["train_err"]
    assert got["train_err"].startswith("usage: postembed-fast train"), got["train_err"]


def test_every_config_is_a_model_options_built_from_the_same_flags():
    from dataclasses import FrozenInstanceError, replace

    from postembed_fast.backfill.job import Config as BackfillConfig
    from postembed_fast.backfill.job import config_from_args
    from postembed_fast.cli import build_parser
    from postembed_fast.nearline.index_updater import IndexConfig
    from postembed_fast.nearline.worker import Config as WorkerConfig
    from postembed_fast.options import MODEL_FLAGS, ModelOptions
    from postembed_fast.serve.options import ServeConfig

    flags = ["--model", "my-model", "--device", "cpu", "--dtype", "bfloat16", "--batch-tokens", "512"]
    parser = build_parser()
    configs = {
        "serve": ServeConfig.from_args(parser.parse_args(["serve", *flags[:6]])),  # no --batch-tokens (below)
        "nearline embed": WorkerConfig.from_args(parser.parse_args(["nearline", "embed", *flags])),
        "nearline index": IndexConfig.from_args(parser.parse_args(["nearline", "index", "--snapshot", "d", *flags])),
        "backfill": config_from_args(parser.parse_args(["backfill", "--output", "o", *flags])),
    }
    want = ModelOptions(model="my-model", device="cpu", dtype="bfloat16", batch_tokens=512)
    for name, cfg in configs.items():
        assert isinstance(cfg, ModelOptions), name
        expected = replace(want, batch_tokens=None) if name == "serve" else want
        assert ModelOptions(**{f: getattr(cfg, f) for f in MODEL_FLAGS}) == expected, name
        with pytest.raises(FrozenInstanceError):
            cfg.device = "cuda"
    for cls in (ServeConfig, WorkerConfig, IndexConfig, BackfillConfig):  # declared once, in ModelOptions
        for f in MODEL_FLAGS:
            assert cls.__dataclass_fields__[f] is ModelOptions.__dataclass_fields__[f], (cls, f)
    # serve: forward batches are the engine's default; its own token budget is how much it merges per call
    serve = ServeConfig.from_args(parser.parse_args(["serve", "--max-batch-tokens", "64"]))
    assert (serve.max_batch_tokens, serve.batch_tokens) == (64, None)
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--batch-tokens", "64"])
    train = parser.parse_args(["train", "--data", "d", "--out", "o", "--device", "cpu"])
    assert ModelOptions.from_args(train) == ModelOptions(device="cpu")  # the flags train does not take: None
    # the old import path of the model flags still works, with a warning naming the new one
    with pytest.warns(DeprecationWarning, match=r"cli_args\.add_model_args moved to postembed_fast\.options"):
        from postembed_fast.cli_args import add_model_args
    from postembed_fast.options import add_model_args as new

    assert add_model_args is new


def test_parquet_input_with_int_ids(tmp_path, rows, embedder, monkeypatch, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from postembed_fast import inputs
    from postembed_fast.cli import FORMATS, main

    assert FORMATS == ("auto", *inputs.FORMATS)  # --format takes the reader's formats

    texts = [r["text"] for r in rows]
    pq.write_table(pa.table({"n": pa.array(range(500, 510), pa.int64()), "body": texts}), tmp_path / "in.parquet",
                   row_group_size=4)
    monkeypatch.chdir(tmp_path)
    assert main(["embed", "in.parquet", "-o", "out.npy", "--device", "cpu", "--dtype", "float32", "--text-field", "body",
                 "--ids-field", "n", "--chunk-size", "3", "--no-progress"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), embedder.embed(texts), rtol=0, atol=1e-6)
    assert np.load(tmp_path / "out.ids.npy").tolist() == list(range(500, 510))
    pq.write_table(pa.table({"body": ["fine", None]}), tmp_path / "bad.parquet")
    assert main(["embed", "bad.parquet", "-o", "bad.npy", "--device", "cpu", "--text-field", "body",
                 "--no-progress"]) == 2
    assert "bad.parquet: row 2: missing text ('body' is null)" in capsys.readouterr().err
    assert not (tmp_path / "bad.npy").exists()
