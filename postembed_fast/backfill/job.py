"""The backfill job: settings, the actor plan, rounds of input files on Ray Data, resume, the command."""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from postembed_fast.backfill.inputs import (
    expand_inputs,
    fingerprint,
    input_format,
    input_key,
    is_done,
    jsonl_lines,
)
from postembed_fast.backfill.layout import (
    REJECTS_FILE,
    SETTINGS_FILE,
    SUCCESS_FILE,
    BackfillError,
    read_settings,
)
from postembed_fast.backfill.load import load_into
from postembed_fast.backfill.rows import EmbedBatch
from postembed_fast.backfill.sink import make_sink
from postembed_fast.cli_args import missing_extra as missing
from postembed_fast.cli_args import non_negative_int, positive_int
from postembed_fast.kernels.precision import PRECISIONS, precision_spec
from postembed_fast.nearline import store
from postembed_fast.options import ModelOptions, add_model_args

PROG = "python -m postembed_fast.backfill"


def missing_extra() -> str | None:
    return missing("backfill", "pyarrow", "ray", "ray.data")


@dataclass(frozen=True)
class Config(ModelOptions):
    """The job's settings; model, device, dtype, batch_tokens are ModelOptions' (keyword-only). Here device
    None means GPU actors if the cluster has GPUs, else CPU actors; "cpu" or "cuda" forces one."""

    output: str
    inputs: list[str] = field(default_factory=list)  # paths, globs or folders
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
    snapshot_ms: int | None = None  # None: each input file's mtime
    tombstone_ttl: int = store.DEFAULT_TOMBSTONE_TTL_S
    force: bool = False
    announce: str | None = None  # the output stream to announce loaded posts on
    progress: bool = True


def add_arguments(p: argparse.ArgumentParser) -> None:
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
    k.add_argument("--snapshot-ms", type=non_negative_int, default=None, metavar="MS",
                   help="when the input was snapshotted (ms since the epoch): posts the near-line worker stored "
                        "from stream entries at or after it, or deleted at or after it, are kept as they are "
                        "(default: each input file's mtime, recorded in its _SUCCESS.json)")
    k.add_argument("--tombstone-ttl", type=positive_int, default=store.DEFAULT_TOMBSTONE_TTL_S, metavar="SECONDS",
                   help="the near-line worker's --tombstone-ttl: a snapshot older than this is refused, since "
                        "deletes before it left no tombstone (default %(default)s)")
    k.add_argument("--force", action="store_true", help="load a snapshot older than --tombstone-ttl anyway")
    k.add_argument("--announce", nargs="?", const="posts.embedded", default=None, metavar="STREAM",
                   help="also add each stored post to the worker's output stream (default posts.embedded), so "
                        "the near-line index updater sees it; for small loads (a large one: build the index "
                        "with `nearline index --from-backfill DIR`)")
    add_model_args(p)


def config_from_args(a) -> Config:
    """The model flags via ModelOptions.from_args, the job's own here."""
    return Config.from_args(a, output=a.output, inputs=a.inputs, precision=a.precision, text_field=a.text_field,
                            id_field=a.id_field, ray_address=a.ray_address, gpus_per_worker=a.gpus_per_worker,
                            cpus_per_worker=a.cpus_per_worker, workers=a.workers, batch_size=a.batch_size,
                            files_per_round=a.files_per_round, load_into=a.load_into, prefix=a.prefix,
                            snapshot_ms=a.snapshot_ms, tombstone_ttl=a.tombstone_ttl, force=a.force,
                            announce=a.announce, progress=a.progress)


def _settings(cfg: Config) -> dict:
    """Model tag, dim and ranges, from an Embedder on this machine's CPU (it also checks the model and
    that int8/uint8 have ranges before any cluster work starts)."""
    from postembed_fast import Embedder
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
        return io if "num_cpus" in inspect.signature(reader).parameters else {"ray_remote_args": io}

    if fmt == "jsonl":
        # read as lines: every line becomes a row (even one that is not valid JSON or UTF-8), so bad
        # rows are rejected one by one instead of failing the whole file in a JSON reader
        ds = ray.data.read_datasource(jsonl_lines(files), **io_kw(ray.data.read_datasource))
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
    sink = make_sink(str(out), settings)
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
                compute = cfg.dtype or "default dtype (each actor's: its CPU's capability table, float16 on GPU)"
                log(f"backfill: {len(todo)} input files, model {settings['model']}, {compute}, {cfg.precision}, "
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
        report = load_into(out, cfg.load_into, prefix=cfg.prefix, snapshot_ms=cfg.snapshot_ms,
                           tombstone_ttl_s=cfg.tombstone_ttl, force=cfg.force, announce_stream=cfg.announce)
        summary["loaded"] = report.written
        summary["load"] = {"written": report.written, "skipped_newer": report.skipped_newer,
                           "skipped_deleted": report.skipped_deleted, "already_loaded": report.already_loaded}
        log(f"backfill: loaded into {cfg.load_into} under {cfg.prefix}<id>: {report.summary()}")
    return summary


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
