"""Near-line benchmark: creation-to-stored latency and throughput of `postembed_fast.nearline embed` workers.

    python -m bench.nearline --rates 20,50,100 --duration 60 --workers 1 --device cpu

A producer writes real posts (tests/data/posts.jsonl.gz by default) to a fresh Redis stream at each fixed
rate for --duration seconds (paced on an absolute schedule; `created_ms` = the producer's clock at XADD),
then waits for the workers to drain. Per rate it reports the creation-to-stored latency
(embedded_ms - created_ms of each post, read back from the output stream) p50/p99/max, the achieved
produce rate, the stored throughput, and the group's lag/pending sampled every 0.5 s. Without --redis it
starts its own redis-server (no persistence) on a free loopback port; without --no-workers it starts
--workers worker processes (and stops them with SIGTERM, checking they exit 0). Both clocks are this
machine's, so the latency is not skewed. JSON: --json (default bench/results/nearline-DEVICE.json).

--searchable N (after the rate phases; `--rates ""` skips those) also starts `nearline index` on the output
stream and measures, for N posts XADDed one at a time every --searchable-interval s, the time from XADD to the
post being in the top 10 of GET /search?q=<its own title> (polled every 25 ms; each poll embeds the title,
so the polling itself takes some CPU from the worker). A title that never finds its own post within
--searchable-timeout s is a retrieval miss (counted apart when the post was stored), not a latency.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.corpus import DEFAULT_CORPUS, load_posts


def load_posts_with_titles(path) -> list[dict]:
    """Posts that have a title, from the end of the corpus (the rate phases use it from the start)."""
    return [p for p in reversed(load_posts(path)) if p.get("title")]

RESULTS = Path(__file__).resolve().parent / "results"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(tmp: Path):
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not found (apt-get install redis-server), or pass --redis URL")
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp), "--save", "",
                             "--appendonly", "no", "--logfile", str(tmp / "redis.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"redis://127.0.0.1:{port}/0"


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class Sampler(threading.Thread):
    """Every `interval` s: the group's lag (not yet delivered) and pending (delivered, not acked)."""

    def __init__(self, r, stream, group, out_stream, interval=0.5):
        super().__init__(daemon=True)
        self.r, self.stream, self.group, self.out_stream, self.interval = r, stream, group, out_stream, interval
        self.samples, self.phase, self.t0 = [], None, time.monotonic()
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(self.interval):
            try:
                g = next((g for g in self.r.xinfo_groups(self.stream) if g["name"].decode() == self.group), None)
                stored = self.r.xlen(self.out_stream)
            except Exception:  # noqa: BLE001 -- a sample missed is not a result lost
                continue
            self.samples.append({"t_s": round(time.monotonic() - self.t0, 2), "rate": self.phase,
                                 "lag": None if g is None else g.get("lag"),
                                 "pending": None if g is None else g.get("pending"), "stored": stored})


def produce(r, stream, texts, rate, duration, tag, start_index):
    """XADD at `rate`/s for `duration` s on an absolute schedule. -> (ids, seconds, behind_max_ms)."""
    n = int(rate * duration)
    ids, behind = [], 0.0
    t0 = time.monotonic()
    for i in range(n):
        due = t0 + i / rate
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        else:
            behind = max(behind, now - due)
        pid = f"{tag}-{i}"
        r.xadd(stream, {"id": pid, "text": texts[(start_index + i) % len(texts)],
                        "created_ms": int(time.time() * 1000)})
        ids.append(pid)
    return ids, time.monotonic() - t0, behind * 1000


def read_outputs(r, out_stream, after_id="-"):
    """{post id: (created_ms, embedded_ms)} of the first output of each post after `after_id`."""
    got, cursor = {}, after_id
    while True:
        rows = r.xrange(out_stream, min=cursor, max="+", count=10000)
        if cursor != "-" and rows and rows[0][0].decode() == cursor:
            rows = rows[1:]
        if not rows:
            return got
        for eid, f in rows:
            pid = f[b"id"].decode()
            if pid not in got and f.get(b"op", b"upsert") == b"upsert":
                got[pid] = (int(f[b"created_ms"]), int(f[b"embedded_ms"]))
        cursor = rows[-1][0].decode()


def searchable_phase(r, url, out_stream, stream, prefix, posts, n, interval, timeout, device, tmp):
    """XADD -> found in /search top-10 by its own title, one post at a time. -> phase dict."""
    from urllib.parse import urlencode
    from urllib.request import urlopen

    port = _free_port()
    log = open(tmp / "index.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "postembed_fast.nearline", "index", "--redis", url, "--stream",
                             out_stream, "--prefix", prefix, "--snapshot", str(tmp / "index-snapshot"),
                             "--port", str(port), "--device", device], stdout=log, stderr=subprocess.STDOUT)

    def get(path, **q):
        with urlopen(f"http://127.0.0.1:{port}{path}" + (f"?{urlencode(q)}" if q else ""), timeout=30) as resp:
            return json.loads(resp.read())

    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the index updater exited with {proc.returncode}; log in {tmp / 'index.log'}")
        try:
            if get("/health").get("status") == "ok":
                break
        except OSError:
            pass
        if time.monotonic() - t0 > 300:
            raise SystemExit("index updater not ready after 300 s")
        time.sleep(0.1)
    ready_s = time.monotonic() - t0
    lat, misses, unstored = [], 0, 0
    chosen = [p for p in posts if p.get("title")][:n]
    try:
        for i, p in enumerate(chosen):
            pid = f"searchable-{i}"
            t_add = time.monotonic()
            r.xadd(stream, {"id": pid, "text": p["text"], "created_ms": int(time.time() * 1000)})
            found = False
            while time.monotonic() - t_add < timeout:
                if pid in [x["id"] for x in get("/search", q=p["title"], k=10)["results"]]:
                    found = True
                    break
                time.sleep(0.025)
            if found:
                lat.append((time.monotonic() - t_add) * 1000)
            elif r.exists(prefix + pid):
                misses += 1
            else:
                unstored += 1
            rest = interval - (time.monotonic() - t_add)
            if rest > 0:
                time.sleep(rest)
        info = get("/info")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "killed after 60 s"
        log.close()
    return {"phase": "xadd_to_searchable", "posts": len(chosen), "found_top10": len(lat),
            "title_misses": misses, "not_stored_in_time": unstored, "timeout_s": timeout,
            "index_ready_s": round(ready_s, 2), "index_count": info["count"], "index_precision": info["precision"],
            "latency_ms": {q: None if v is None else round(v, 1) for q, v in
                           (("p50", percentile(lat, 50)), ("p90", percentile(lat, 90)),
                            ("p99", percentile(lat, 99)), ("max", max(lat, default=None)))},
            "index_exit_code": rc}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.nearline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--redis", default=None, metavar="URL", help="an existing Redis (default: start one)")
    ap.add_argument("--rates", default="20,50,100", help="posts/s, comma-separated (default %(default)s)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per rate (default %(default)s)")
    ap.add_argument("--drain-timeout", type=float, default=120.0, help="max wait for the backlog after each rate")
    ap.add_argument("--workers", type=int, default=1, help="worker processes to start (default %(default)s)")
    ap.add_argument("--no-workers", action="store_true", help="workers run elsewhere on --stream/--group")
    ap.add_argument("--stream", default=None, help="input stream (default: a fresh posts-bench-TIME)")
    ap.add_argument("--group", default="embedders")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="int8")
    ap.add_argument("--batch-max", type=int, default=256)
    ap.add_argument("--batch-wait-ms", type=int, default=50)
    ap.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    ap.add_argument("--json", default=None, help="output (default bench/results/nearline-DEVICE.json)")
    ap.add_argument("--searchable", type=int, default=0, metavar="N",
                    help="then measure XADD -> own title in /search top-10 for N posts (default 0: skip)")
    ap.add_argument("--searchable-interval", type=float, default=1.0, metavar="S",
                    help="seconds between those posts (default %(default)s)")
    ap.add_argument("--searchable-timeout", type=float, default=30.0, metavar="S",
                    help="give up on one post after S seconds (default %(default)s)")
    args = ap.parse_args(argv)

    import redis

    rates = [float(x) for x in args.rates.split(",") if x.strip()]
    texts = [p["text"] for p in load_posts(args.corpus)]
    stream = args.stream or f"posts-bench-{int(time.time())}"
    out_stream, prefix = f"{stream}.embedded", f"{stream}:emb:"
    tmp = Path(tempfile.mkdtemp(prefix="bench-nearline-"))
    redis_proc, url = (None, args.redis) if args.redis else start_redis(tmp)
    r = redis.Redis.from_url(url, socket_timeout=10)
    for _ in range(200):
        try:
            r.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    workers, logs = [], []
    result = {"bench": "nearline", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
              "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(), "python": platform.python_version(),
              "config": {k: v for k, v in vars(args).items() if k != "redis"} | {"stream": stream, "rates": rates,
                                                                                "posts_in_corpus": len(texts)},
              "phases": []}
    sampler = None
    try:
        r.xgroup_create(stream, args.group, id="0", mkstream=True)
        if not args.no_workers:
            for k in range(args.workers):
                log = open(tmp / f"worker{k}.log", "wb")
                logs.append(log)
                workers.append(subprocess.Popen(
                    [sys.executable, "-m", "postembed_fast.nearline", "embed", "--redis", url, "--stream", stream,
                     "--group", args.group, "--consumer", f"bench{k}", "--device", args.device,
                     "--precision", args.precision, "--batch-max", str(args.batch_max),
                     "--batch-wait-ms", str(args.batch_wait_ms), "--prefix", prefix, "--out-stream", out_stream,
                     "--dead-stream", f"{stream}.dead"], stdout=log, stderr=subprocess.STDOUT))
        # warm-up: one post per worker through the whole path before the clock starts
        t_ready = time.monotonic()
        for k in range(max(1, len(workers))):
            r.xadd(stream, {"id": f"warmup-{k}", "text": texts[k], "created_ms": int(time.time() * 1000)})
        while r.xlen(out_stream) < max(1, len(workers)):
            if any(w.poll() is not None for w in workers):
                raise SystemExit(f"a worker exited early; logs in {tmp}")
            if time.monotonic() - t_ready > 300:
                raise SystemExit("workers not ready after 300 s")
            time.sleep(0.1)
        result["worker_ready_s"] = round(time.monotonic() - t_ready, 2)
        sampler = Sampler(r, stream, args.group, out_stream)
        sampler.start()
        start_index = 0
        for rate in rates:
            sampler.phase = rate
            tag = f"r{rate:g}"
            last_out = r.xinfo_stream(out_stream)["last-generated-id"].decode()
            ids, produce_s, behind_ms = produce(r, stream, texts, rate, args.duration, tag, start_index)
            start_index += len(ids)
            t_end = time.monotonic()
            got = {}
            while time.monotonic() - t_end < args.drain_timeout:
                got = read_outputs(r, out_stream, last_out)
                if all(i in got for i in ids):
                    break
                time.sleep(0.2)
            drain_s = time.monotonic() - t_end
            lat = [got[i][1] - got[i][0] for i in ids if i in got]
            in_phase = [x for x in sampler.samples if x["rate"] == rate]
            first_created = min((got[i][0] for i in ids if i in got), default=0)
            last_stored = max((got[i][1] for i in ids if i in got), default=0)
            span = (last_stored - first_created) / 1000 if lat else None
            phase = {"rate_target": rate, "posts": len(ids), "stored": len(lat), "missing": len(ids) - len(lat),
                     "produce_rate": round(len(ids) / produce_s, 2), "producer_behind_max_ms": round(behind_ms, 1),
                     "throughput_posts_s": round(len(lat) / span, 2) if span else None,
                     "drain_s": round(drain_s, 2),
                     "latency_ms": {"p50": percentile(lat, 50), "p90": percentile(lat, 90),
                                    "p99": percentile(lat, 99), "max": max(lat, default=None),
                                    "mean": round(sum(lat) / len(lat), 1) if lat else None},
                     "lag_max": max((x["lag"] or 0 for x in in_phase), default=None),
                     "pending_max": max((x["pending"] or 0 for x in in_phase), default=None)}
            result["phases"].append(phase)
            print(json.dumps(phase), flush=True)
            if phase["missing"]:
                print(f"rate {rate:g}: {phase['missing']} posts not stored within {args.drain_timeout} s; "
                      "higher rates would only queue further, stopping", file=sys.stderr)
                break
        if args.searchable:
            if args.no_workers and not args.stream:
                raise SystemExit("--searchable with --no-workers needs --stream (the workers' stream)")
            sampler.phase = "searchable"
            phase = searchable_phase(r, url, out_stream, stream, prefix, load_posts_with_titles(args.corpus),
                                     args.searchable, args.searchable_interval, args.searchable_timeout,
                                     args.device, tmp)
            result["searchable"] = phase
            print(json.dumps(phase), flush=True)
    finally:
        if sampler is not None:
            sampler.stop.set()
            sampler.join()
            result["lag_timeline"] = sampler.samples
        rcs = []
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                rcs.append(w.wait(60))
            except subprocess.TimeoutExpired:
                w.kill()
                rcs.append("killed after 60 s")
        result["worker_exit_codes"] = rcs
        for log in logs:
            log.close()
        try:
            result["dead_letters"] = r.xlen(f"{stream}.dead")
        except Exception:  # noqa: BLE001
            pass
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
        result["loadavg_end"] = os.getloadavg()
        out = Path(args.json) if args.json else RESULTS / f"nearline-{args.device.replace(':', '')}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out} (worker logs: {tmp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
