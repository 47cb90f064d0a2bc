"""Backfill benchmark: `postembed_fast.backfill` on a local Ray against one in-process `embed()` call.

    python -m bench.backfill --posts 20000 --segments 2 --corpus ../shared/data/debian-posts.jsonl.gz

The first --posts posts of the corpus (string id and text) are split into --segments equal parts; each
part is a JSONL.gz input file of --files-per-segment files. For each part, alternately: the baseline,
ONE `Embedder.embed(texts)` call in this process (CPU, torch threads = the machine's cores, the model
loaded before timing), then the backfill of that part on a local Ray (loopback only, num_cpus = the
cores; one CPU actor computing with every core), timed from the call to the summary, actor start and
model load included (what a user pays per job), Ray start excluded (once per cluster). Alternating the
two on the same posts spreads the noise of a shared machine over both; the overhead is
sum(Ray seconds) / sum(baseline seconds) - 1. The Ray output is read back and compared with the
baseline rows (min cosine for floats, identical codes otherwise). Peak memory: the baseline process's
peak RSS growth during embed(), and the peak RSS of the Ray actor and of all Ray processes, sampled
every 0.2 s. The load average is recorded before and after. JSON: --json
(default bench/results/cpu-2core-backfill.json).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SHARED_CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "debian-posts.jsonl.gz"


def read_posts(path: Path, n: int) -> list[dict]:
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if isinstance(rec.get("id"), str) and isinstance(rec.get("text"), str):
                out.append({"id": rec["id"], "text": rec["text"]})
                if len(out) == n:
                    break
    if len(out) < n:
        raise SystemExit(f"{path}: only {len(out)} posts with a string id and text, --posts {n}")
    return out


class RaySampler(threading.Thread):
    """Peak RSS of the embedding actor and of every Ray process, sampled every 0.2 s."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop_event = threading.Event()
        self.actor_peak = self.ray_peak = 0

    def run(self):
        import psutil

        me = os.getpid()
        while not self.stop_event.is_set():
            actor = total = 0
            for p in psutil.process_iter(["name", "cmdline", "memory_info"]):
                try:
                    cmd = " ".join(p.info["cmdline"] or [])
                    rss = p.info["memory_info"].rss if p.info["memory_info"] else 0
                except (psutil.Error, TypeError):
                    continue
                if p.pid == me:
                    continue
                name = p.info["name"] or ""
                if "ray::" in cmd or "ray::" in name or "/ray/" in cmd or "raylet" in name or "gcs_server" in name:
                    total += rss
                    if "EmbedBatch" in cmd or "EmbedBatch" in name:
                        actor += rss
            self.actor_peak, self.ray_peak = max(self.actor_peak, actor), max(self.ray_peak, total)
            self.stop_event.wait(0.2)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def compare(got, want, precision: str) -> float | bool:
    import numpy as np

    if precision in ("float32", "float16"):
        g, w = got.astype(np.float64), want.astype(np.float64)
        return float(((g * w).sum(1) / np.linalg.norm(g, axis=1) / np.linalg.norm(w, axis=1)).min())
    return bool(np.array_equal(got, want))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default=str(SHARED_CORPUS if SHARED_CORPUS.exists() else
                                            Path(__file__).resolve().parent.parent / "tests/data/posts.jsonl.gz"))
    ap.add_argument("--posts", type=int, default=20000)
    ap.add_argument("--segments", type=int, default=2, help="alternations baseline/Ray (default %(default)s)")
    ap.add_argument("--files-per-segment", type=int, default=2)
    ap.add_argument("--precision", default="float32")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--json", default=str(RESULTS / "cpu-2core-backfill.json"))
    a = ap.parse_args(argv)

    import ray
    import torch

    from postembed_fast import Embedder
    from postembed_fast.backfill import job, layout

    cores = os.cpu_count() or 1
    load_before = os.getloadavg()
    posts = read_posts(Path(a.corpus), a.posts)
    seg = -(-len(posts) // a.segments)
    tmp = Path(tempfile.mkdtemp(prefix="bench-backfill-"))
    print(f"{len(posts)} posts from {a.corpus}, {a.segments} segments, {cores} cores, load {load_before}",
          file=sys.stderr)

    emb = Embedder(device="cpu")  # the baseline's model, loaded once, outside the timing
    ranges = emb.quantization_ranges if a.precision in ("int8", "uint8") else None
    emb.embed([p["text"] for p in posts[:64]], precision=a.precision, ranges=ranges)  # warm-up
    ray.init(num_cpus=cores, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    sampler = RaySampler()
    sampler.start()
    rows = []
    try:
        for s in range(a.segments):
            part = posts[s * seg:(s + 1) * seg]
            texts = [p["text"] for p in part]
            d = tmp / f"in-{s}"
            d.mkdir()
            per = -(-len(part) // a.files_per_segment)
            for k in range(a.files_per_segment):
                with gzip.open(d / f"posts-{k}.jsonl.gz", "wt", encoding="utf-8") as f:
                    for p in part[k * per:(k + 1) * per]:
                        f.write(json.dumps(p) + "\n")
            rss0 = rss_bytes()
            t0 = time.perf_counter()
            want = emb.embed(texts, precision=a.precision, ranges=ranges)
            base_s = time.perf_counter() - t0
            base_rss = rss_bytes() - rss0
            out = tmp / f"out-{s}"
            cfg = job.Config(output=str(out), inputs=[str(d)], precision=a.precision, progress=False,
                                  batch_size=a.batch_size, files_per_round=a.files_per_segment)
            t0 = time.perf_counter()
            summary = job.run_backfill(cfg, log=lambda m: print(m, file=sys.stderr))
            ray_s = time.perf_counter() - t0
            ids, got = layout.read_output(out)
            index = {p["id"]: i for i, p in enumerate(part)}
            assert len(ids) == len(part) and summary["rejects"] == 0, (len(ids), summary)
            match = compare(got, want[[index[i] for i in ids]], a.precision)
            row = {"segment": s, "posts": len(part), "baseline_s": base_s, "baseline_posts_per_s": len(part) / base_s,
                   "ray_s": ray_s, "ray_posts_per_s": len(part) / ray_s, "ray_job_s": summary["seconds"],
                   "overhead": ray_s / base_s - 1, "baseline_rss_growth_mb": base_rss / 2**20,
                   "match": match, "loadavg": os.getloadavg()}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    finally:
        sampler.stop_event.set()
        sampler.join()
        ray.shutdown()
    base = sum(r["baseline_s"] for r in rows)
    rays = sum(r["ray_s"] for r in rows)
    result = {
        "command": "python -m bench.backfill " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cores": cores, "platform": platform.platform(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "ray": ray.__version__},
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "corpus": a.corpus, "posts": len(posts), "precision": a.precision, "batch_size": a.batch_size,
        "baseline": "one Embedder.embed(texts) call per segment in this process, model loaded and warmed up before",
        "ray": "job.run_backfill on a local Ray (loopback, num_cpus=cores, 1 CPU actor x cores threads); "
               "actor start and model load included, ray.init excluded",
        "segments": rows,
        "baseline_posts_per_s": len(posts) / base, "ray_posts_per_s": len(posts) / rays,
        "overhead": rays / base - 1,
        "peak_rss_mb": {"baseline_process_max": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                        "ray_actor": sampler.actor_peak / 2**20, "ray_all_processes": sampler.ray_peak / 2**20},
        "min_match": min(r["match"] for r in rows),
    }
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("baseline_posts_per_s", "ray_posts_per_s", "overhead", "peak_rss_mb",
                                             "min_match", "loadavg_before", "loadavg_after")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
