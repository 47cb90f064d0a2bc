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

--crash (after the rest; the rate workers are stopped first) runs the crash scenarios, each on a fresh stream
with ONE worker process under a fixed consumer name: --crash-posts posts at --crash-rate/s, one SIGKILL, a
restart under the same name (which re-reads its own pending entries first), drain. `kill9_random`: kill -9 from
outside at a seeded random time mid-run. The store and the ack are one MULTI/EXEC in the worker, so "between the
store and the ack" does not exist; the two closest points use the worker's test hook (the environment variable
POSTEMBED_TEST_SIGKILL_BEFORE_EXEC / _AFTER_EXEC=N: it SIGKILLs itself at the first batch once N entries are
read): `kill9_before_exec` (batch embedded, nothing stored, not acked) and `kill9_after_exec` (stored and acked,
before the next read). Checks: every produced post has its hash, none missing, none extra, `source_id` = its
input entry, the vector equals this process's own `Embedder.embed(texts, precision=...)` (int8/uint8: identical
codes counted, +-1 tolerated as in the tests; float: atol 2e-3); "processed_twice" = output-stream upserts per
post minus 1, summed; "recover_s" = kill -> the first store of the restarted worker (includes its model load).
JSON "crash" key; a markdown table is printed.

    python -m bench.nearline --rates "" --crash --crash-posts 600 --crash-rate 50
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


def produce(r, stream, texts, rate, duration, tag, start_index, n=None):
    """XADD at `rate`/s for `duration` s (or `n` posts) on an absolute schedule. -> (ids, seconds, behind_max_ms)."""
    n = int(round(rate * duration)) if n is None else n
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


def lag_trend(samples: list[dict]) -> dict:
    """Lag (entries not yet delivered) over one produce window: the mean of its first and last thirds and the
    last sample, so growth is visible without reading the series."""
    lags = [x["lag"] or 0 for x in samples]
    k = len(lags) // 3
    mean = (lambda xs: round(sum(xs) / len(xs), 1) if xs else None)
    return {"samples": len(lags), "first_third_mean": mean(lags[:k]), "last_third_mean": mean(lags[-k:] if k else []),
            "at_end": lags[-1] if lags else None}


def worker_cmd(url, stream, group, consumer, prefix, args) -> list[str]:
    """`nearline embed` for one bench worker on `stream` (outputs under `stream`.embedded / .dead)."""
    return [sys.executable, "-m", "postembed_fast.nearline", "embed", "--redis", url, "--stream", stream,
            "--group", group, "--consumer", consumer, "--device", args.device, "--precision", args.precision,
            "--batch-max", str(args.batch_max), "--batch-wait-ms", str(args.batch_wait_ms), "--prefix", prefix,
            "--out-stream", f"{stream}.embedded", "--dead-stream", f"{stream}.dead"]


# The crash scenarios. The worker stores a batch's hashes + output entries and XACKs its input entries in ONE
# MULTI/EXEC, so "between the store and the ack" does not exist literally; the closest points are right before
# the EXEC (embedded, nothing stored, not acked) and right after it (stored and acked, before the next read).
# The worker's test hook (POSTEMBED_TEST_SIGKILL_{BEFORE,AFTER}_EXEC, postembed_fast/nearline/worker.py) kills it there.
CRASH_SCENARIOS = {
    "kill9_random": "SIGKILL from outside at a seeded random time while posts are being produced",
    "kill9_before_exec": "the worker SIGKILLs itself after embedding a batch, right before its MULTI/EXEC store+ack",
    "kill9_after_exec": "the worker SIGKILLs itself right after a batch's MULTI/EXEC store+ack returned",
}


def _decode_vec(raw: bytes, precision: str):
    import numpy as np
    from postembed_fast.kernels.precision import precision_spec

    return np.frombuffer(raw, dtype=precision_spec(precision).wire_dtype)


def compare_vectors(got, want, precision) -> dict:
    """Stored rows vs the bench process's own embed() of the same texts."""
    import numpy as np

    got, want = np.asarray(got), np.asarray(want)
    out = {"rows": int(len(got)), "rows_identical": int((got == want).all(axis=1).sum())}
    if precision in ("float16", "float32"):
        d = float(np.abs(got.astype(np.float32) - want.astype(np.float32)).max()) if len(got) else 0.0
        out.update(max_abs_diff=d, ok=d <= 2e-3)  # batch composition may move the last bit of a float
    elif precision in ("int8", "uint8"):
        d = int(np.abs(got.astype(np.int32) - want.astype(np.int32)).max()) if len(got) else 0
        # identical codes expected; +-1 on a few rows is what a different batch composition can do (tests allow it)
        out.update(max_code_diff=d, ok=d <= 1 and out["rows_identical"] >= 0.99 * len(got))
    else:
        bits = np.unpackbits(got.view(np.uint8), axis=-1) != np.unpackbits(want.view(np.uint8), axis=-1)
        frac = float(bits.mean()) if len(got) else 0.0
        out.update(bit_diff_frac=frac, ok=frac < 0.01)
    return out


def crash_scenario(r, url, args, texts, tmp, scenario: str, seed: int, ref) -> dict:
    """One worker (fixed consumer name) on a fresh stream; N posts at a fixed rate; one SIGKILL (from outside at a
    random time, or by the worker's test hook at a random entry count); restart under the same name; drain; check
    every post is stored once with its own embedding. `ref` is a callable () -> Embedder (loaded lazily)."""
    import random

    rng = random.Random(f"{seed}-{scenario}")
    n, rate = args.crash_posts, args.crash_rate
    stream = f"crash-{scenario}-{int(time.time() * 1000)}"
    out_stream, prefix, consumer = f"{stream}.embedded", f"{stream}:emb:", "crash0"
    r.xgroup_create(stream, args.group, id="0", mkstream=True)
    env = dict(os.environ)
    kill_after_s = kill_at_entries = None
    if scenario == "kill9_random":
        kill_after_s = rng.uniform(0.25, 0.75) * n / rate  # after the producer's first post
    else:
        kill_at_entries = 1 + rng.randint(max(1, n // 4), max(1, 3 * n // 4))  # 1: the warm-up post
        env[f"POSTEMBED_TEST_SIGKILL_{'BEFORE' if scenario == 'kill9_before_exec' else 'AFTER'}_EXEC"] = \
            str(kill_at_entries)
    cmd = worker_cmd(url, stream, args.group, consumer, prefix, args)
    logs = []

    def spawn(k, env):
        log = open(tmp / f"{stream}-worker{k}.log", "wb")
        logs.append(log)
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    proc = spawn(0, env)
    res = {"scenario": scenario, "what": CRASH_SCENARIOS[scenario], "posts": n, "rate": rate, "consumer": consumer,
           "stream": stream, "kill_after_s": None if kill_after_s is None else round(kill_after_s, 2),
           "kill_at_entries_read": kill_at_entries}
    try:
        t0 = time.monotonic()
        r.xadd(stream, {"id": "warmup", "text": texts[0], "created_ms": int(time.time() * 1000)})
        while r.xlen(out_stream) < 1:
            if proc.poll() is not None:
                raise SystemExit(f"crash worker exited early ({proc.returncode}); logs in {tmp}")
            if time.monotonic() - t0 > 300:
                raise SystemExit("crash worker not ready after 300 s")
            time.sleep(0.05)
        res["worker_ready_s"] = round(time.monotonic() - t0, 2)
        produced = {}

        def producer():
            produced["ids"], produced["s"], produced["behind_ms"] = produce(
                r, stream, texts, rate, n / rate, f"c{scenario}", 1 + rng.randrange(len(texts)), n=n)

        th = threading.Thread(target=producer, daemon=True)
        t_prod = time.monotonic()
        th.start()
        killed = False
        while not killed:
            if kill_after_s is not None and time.monotonic() - t_prod >= kill_after_s:
                proc.kill()  # kill -9
                proc.wait()
                killed = True
            elif proc.poll() is not None:  # the test hook (or a real failure: the exit code says which)
                killed = True
            elif not th.is_alive() and r.xpending(stream, args.group)["pending"] == 0 and \
                    _group_lag(r, stream, args.group) == 0:
                break  # everything stored and the kill point was never reached
            else:
                time.sleep(0.005)
        t_kill_ms = int(time.time() * 1000)
        res["killed"] = killed
        res["killed_exit_code"] = proc.returncode
        if killed:
            res["killed_at_s"] = round(time.monotonic() - t_prod, 2)
            res["pending_at_kill"] = len(r.xpending_range(stream, args.group, "-", "+", 100000, consumername=consumer))
            res["stored_at_kill"] = r.xlen(out_stream) - 1  # not the warm-up
            t_restart_ms = int(time.time() * 1000)
            proc = spawn(1, dict(os.environ))  # no test hook: the restarted worker runs normally
            res["restart_delay_ms"] = t_restart_ms - t_kill_ms
        th.join()
        res["produce_rate"] = round(n / produced["s"], 2)
        res["producer_behind_max_ms"] = round(produced["behind_ms"], 1)
        t_end = time.monotonic()
        while time.monotonic() - t_end < args.drain_timeout:
            if proc.poll() is not None:
                raise SystemExit(f"restarted crash worker exited ({proc.returncode}); logs in {tmp}")
            if r.xpending(stream, args.group)["pending"] == 0 and _group_lag(r, stream, args.group) == 0:
                break
            time.sleep(0.1)
        res["drain_s"] = round(time.monotonic() - t_end, 2)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            res["worker_exit_code"] = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            res["worker_exit_code"] = "killed after 60 s"
        for log in logs:
            log.close()

    # ---- checks -----------------------------------------------------------------------------------------
    inputs = {}  # post id -> (entry id, text)
    for eid, f in r.xrange(stream, "-", "+"):
        inputs[f[b"id"].decode()] = (eid.decode(), f[b"text"].decode())
    outputs: dict[str, int] = {}
    first_after_restart_ms = None
    for eid, f in r.xrange(out_stream, "-", "+"):
        if f.get(b"op", b"upsert") != b"upsert":
            continue
        pid = f[b"id"].decode()
        outputs[pid] = outputs.get(pid, 0) + 1
        if killed and first_after_restart_ms is None and int(f[b"embedded_ms"]) >= t_restart_ms:
            first_after_restart_ms = int(f[b"embedded_ms"])
    stored_keys = {k.decode()[len(prefix):] for k in r.scan_iter(match=prefix + "*", count=1000)}
    stored_keys = {k for k in stored_keys if not k.startswith("__")}  # the ranges key, tombstones
    want_ids = set(inputs)
    missing, extra = sorted(want_ids - stored_keys), sorted(stored_keys - want_ids)
    order = [pid for pid in inputs if pid in stored_keys]
    pipe = r.pipeline(transaction=False)
    for pid in order:
        pipe.hmget(prefix + pid, "vector", "source_id", "precision")
    rows = pipe.execute()
    wrong_source = [pid for pid, (_, src, _) in zip(order, rows) if src is None or src.decode() != inputs[pid][0]]
    import numpy as np

    got = np.stack([_decode_vec(v, args.precision) for v, _, _ in rows]) if rows else np.zeros((0, 0))
    want = ref().embed([inputs[pid][1] for pid in order], precision=args.precision) if order else got
    res.update({
        "produced": len(inputs) - 1, "stored": len(stored_keys & want_ids) - ("warmup" in stored_keys),
        "missing": len(missing), "missing_ids": missing[:20], "extra": len(extra), "extra_ids": extra[:20],
        "output_entries": sum(outputs.values()),
        "processed_twice": sum(c - 1 for c in outputs.values()),
        "posts_processed_twice": sum(1 for c in outputs.values() if c > 1),
        "not_announced": len(want_ids - set(outputs)),
        "wrong_source_id": len(wrong_source),
        "vectors": compare_vectors(got, want, args.precision),
        "dead_letters": r.xlen(f"{stream}.dead"),
        "pending_end": r.xpending(stream, args.group)["pending"],
        "recover_s": None if first_after_restart_ms is None else round((first_after_restart_ms - t_kill_ms) / 1000, 2),
    })
    res["passed"] = bool(killed and res["killed_exit_code"] == -signal.SIGKILL and not missing and not extra
                         and not wrong_source and res["vectors"]["ok"]
                         and not res["not_announced"] and not res["dead_letters"] and not res["pending_end"]
                         and res["worker_exit_code"] == 0)
    return res


def failover_scenario(r, url, args, texts, tmp, seed: int, ref) -> dict:
    """The deployment for availability: --workers N worker processes (--threads each) in one group on a fresh
    stream; --crash-posts posts at --crash-rate/s; one worker SIGKILLed at a seeded random time mid-run and NOT
    restarted; drain. Reports the creation -> stored latency overall and over the 30 s after the kill, the
    takeover time (kill -> the last of the killed worker's pending entries stored: a max, not a percentile),
    posts processed twice (by whom), missing posts and whether every vector is right."""
    import random

    import numpy as np

    rng = random.Random(f"{seed}-failover")
    n, rate, k = args.crash_posts, args.crash_rate, max(2, args.workers)
    stream = f"failover-{int(time.time() * 1000)}"
    out_stream, prefix = f"{stream}.embedded", f"{stream}:emb:"
    r.xgroup_create(stream, args.group, id="0", mkstream=True)
    threads = args.threads or max(1, (os.cpu_count() or 2) // k)
    cmd_args = ["--threads", str(threads)]
    logs, procs = [], []
    for i in range(k):
        log = open(tmp / f"{stream}-w{i}.log", "wb")
        logs.append(log)
        procs.append(subprocess.Popen(worker_cmd(url, stream, args.group, f"fo{i}", prefix, args) + cmd_args,
                                      stdout=log, stderr=subprocess.STDOUT))
    victim = rng.randrange(k)
    res = {"scenario": "failover_kill_one", "workers": k, "threads_per_worker": threads, "posts": n, "rate": rate,
           "victim": f"fo{victim}", "stream": stream}
    try:
        t0 = time.monotonic()
        for i in range(k):  # one post per worker through the whole path before the clock starts
            r.xadd(stream, {"id": f"warmup-{i}", "text": texts[i], "created_ms": int(time.time() * 1000)})
        while r.xlen(out_stream) < k or len({c["name"] for c in r.xinfo_consumers(stream, args.group)}) < k:
            if any(p.poll() is not None for p in procs):
                raise SystemExit(f"a failover worker exited early; logs in {tmp}")
            if time.monotonic() - t0 > 300:
                raise SystemExit("failover workers not ready after 300 s")
            time.sleep(0.05)
        res["workers_ready_s"] = round(time.monotonic() - t0, 2)
        produced = {}

        def producer():
            produced["ids"], produced["s"], produced["behind_ms"] = produce(
                r, stream, texts, rate, n / rate, "fo", k + rng.randrange(len(texts)), n=n)

        kill_after_s = rng.uniform(0.3, 0.6) * n / rate
        th = threading.Thread(target=producer, daemon=True)
        t_prod = time.monotonic()
        th.start()
        while time.monotonic() - t_prod < kill_after_s:
            time.sleep(0.005)
        procs[victim].kill()
        procs[victim].wait()
        t_kill_ms = int(time.time() * 1000)
        pending = r.xpending_range(stream, args.group, "-", "+", 100000, consumername=f"fo{victim}")
        victim_pending = {p["message_id"].decode() for p in pending}
        res.update(killed_at_s=round(time.monotonic() - t_prod, 2), pending_on_victim_at_kill=len(victim_pending),
                   killed_exit_code=procs[victim].returncode)
        th.join()
        res["produce_rate"] = round(n / produced["s"], 2)
        t_end = time.monotonic()
        while time.monotonic() - t_end < args.drain_timeout:
            if r.xpending(stream, args.group)["pending"] == 0 and _group_lag(r, stream, args.group) == 0:
                break
            time.sleep(0.1)
        res["drain_s"] = round(time.monotonic() - t_end, 2)
    finally:
        rcs = []
        for i, p in enumerate(procs):
            if i != victim and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for i, p in enumerate(procs):
            if i != victim:
                try:
                    rcs.append(p.wait(60))
                except subprocess.TimeoutExpired:
                    p.kill()
                    rcs.append("killed after 60 s")
        res["survivor_exit_codes"] = rcs
        for log in logs:
            log.close()

    inputs = {}  # post id -> (entry id, text, created_ms)
    for eid, f in r.xrange(stream, "-", "+"):
        inputs[f[b"id"].decode()] = (eid.decode(), f[b"text"].decode(), int(f.get(b"created_ms", 0)))
    stored_at: dict[str, list[int]] = {}
    by_entry_stored_ms = {}
    for _, f in r.xrange(out_stream, "-", "+"):
        if f.get(b"op", b"upsert") != b"upsert":
            continue
        pid = f[b"id"].decode()
        stored_at.setdefault(pid, []).append(int(f[b"embedded_ms"]))
        by_entry_stored_ms[f[b"source_id"].decode()] = int(f[b"embedded_ms"])
    timed = [pid for pid in inputs if not pid.startswith("warmup")]
    lat = [min(stored_at[p]) - inputs[p][2] for p in timed if p in stored_at]
    after = [min(stored_at[p]) - inputs[p][2] for p in timed
             if p in stored_at and t_kill_ms - 1000 <= inputs[p][2] <= t_kill_ms + 30000]
    takeover = [by_entry_stored_ms[e] - t_kill_ms for e in victim_pending if e in by_entry_stored_ms]
    missing = sorted(p for p in inputs if p not in stored_at)
    order = [p for p in inputs if p in stored_at]
    pipe = r.pipeline(transaction=False)
    for pid in order:
        pipe.hget(prefix + pid, "vector")
    got = np.stack([_decode_vec(v, args.precision) for v in pipe.execute()])
    want = ref().embed([inputs[p][1] for p in order], precision=args.precision)
    res.update({
        "produced": len(timed), "missing": len(missing), "missing_ids": missing[:20],
        "processed_twice": sum(len(v) - 1 for v in stored_at.values()),
        "latency_ms": {"p50": percentile(lat, 50), "p99": percentile(lat, 99), "max": max(lat, default=None)},
        "latency_30s_after_kill_ms": {"posts": len(after), "p50": percentile(after, 50),
                                      "p99": percentile(after, 99), "max": max(after, default=None)},
        "victim_pending_stored": len(takeover),
        "takeover_max_s": round(max(takeover) / 1000, 2) if takeover else None,
        "vectors": compare_vectors(got, want, args.precision),
        "pending_end": r.xpending(stream, args.group)["pending"],
    })
    res["passed"] = bool(not missing and res["vectors"]["ok"] and not res["pending_end"]
                         and len(takeover) == len(victim_pending) and all(c == 0 for c in rcs))
    return res


def restart_times(r, url, args, texts, tmp, rounds: int) -> dict:
    """A single worker, from exec to its first stored post: the post is already waiting in the stream when the
    process starts (a restart with a backlog), so this is process start + imports + model load + warm-up + one
    batch. Rounds on fresh streams; the median and every round."""
    times = []
    for i in range(rounds):
        stream = f"restart-{int(time.time() * 1000)}-{i}"
        out_stream = f"{stream}.embedded"
        r.xadd(stream, {"id": "p0", "text": texts[i % len(texts)], "created_ms": int(time.time() * 1000)})
        log = open(tmp / f"{stream}.log", "wb")
        t0 = time.time()
        p = subprocess.Popen(worker_cmd(url, stream, args.group, "rs", f"{stream}:emb:", args) +
                             ["--threads", str(args.threads or os.cpu_count() or 1)],
                             stdout=log, stderr=subprocess.STDOUT)
        try:
            while r.xlen(out_stream) < 1:
                if p.poll() is not None:
                    raise SystemExit(f"restart worker exited ({p.returncode}); log {tmp / (stream + '.log')}")
                time.sleep(0.002)
            stored_ms = int(r.xrange(out_stream)[0][1][b"embedded_ms"])
            times.append(round(stored_ms / 1000 - t0, 3))
        finally:
            p.send_signal(signal.SIGTERM)
            p.wait(60)
            log.close()
    return {"rounds": rounds, "exec_to_first_stored_s": times, "median_s": sorted(times)[len(times) // 2]}


def _group_lag(r, stream, group):
    g = next((g for g in r.xinfo_groups(stream) if g["name"].decode() == group), None)
    if g is None:
        return None
    if g.get("lag") is not None:
        return g["lag"]
    last = r.xinfo_stream(stream)["last-generated-id"]
    return 0 if g["last-delivered-id"] == last else 1


def crash_table(rows: list[dict]) -> str:
    head = ("| scenario | posts @ rate | kill | pending at kill | processed twice | missing | extra | "
            "vectors identical | recover s | passed |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for x in rows:
        kill = (f"{x['killed_at_s']} s" if x.get("killed") else "never") + (
            f" (>= {x['kill_at_entries_read']} read)" if x.get("kill_at_entries_read") else "")
        v = x["vectors"]
        lines.append(f"| {x['scenario']} | {x['produced']} @ {x['rate']:g}/s | {kill} | {x.get('pending_at_kill')} | "
                     f"{x['processed_twice']} | {x['missing']} | {x['extra']} | {v['rows_identical']}/{v['rows']} | "
                     f"{x['recover_s']} | {'yes' if x['passed'] else 'NO'} |")
    return "\n".join(lines)


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
    ap.add_argument("--crash", action="store_true",
                    help="then the crash scenarios (after the rate phases; `--rates \"\"` skips those): "
                         + "; ".join(f"{k}: {v}" for k, v in CRASH_SCENARIOS.items()))
    ap.add_argument("--crash-scenarios", default=",".join(CRASH_SCENARIOS), metavar="LIST",
                    help="which (default all: %(default)s)")
    ap.add_argument("--crash-posts", type=int, default=600, metavar="N",
                    help="posts per crash scenario (default %(default)s)")
    ap.add_argument("--crash-rate", type=float, default=50.0, metavar="R",
                    help="posts/s in the crash scenarios (default %(default)s)")
    ap.add_argument("--crash-seed", type=int, default=0, help="seeds the kill points (default %(default)s)")
    ap.add_argument("--failover", action="store_true",
                    help="after the rest: --workers (>= 2) workers in one group, one SIGKILLed mid-run and not "
                         "restarted (--crash-posts posts at --crash-rate); takeover time, latency, duplicates")
    ap.add_argument("--threads", type=int, default=0, help="--threads of each worker (default: cores / workers "
                    "for --failover, all cores otherwise)")
    ap.add_argument("--restart", type=int, default=0, metavar="ROUNDS",
                    help="after the rest: time one worker from exec to its first stored post, ROUNDS times")
    args = ap.parse_args(argv)
    scenarios = [x.strip() for x in args.crash_scenarios.split(",") if x.strip()]
    unknown = [x for x in scenarios if x not in CRASH_SCENARIOS]
    if unknown:
        ap.error(f"unknown --crash-scenarios {unknown}; known: {', '.join(CRASH_SCENARIOS)}")
    if (args.failover or args.restart) and args.no_workers:
        ap.error("--failover / --restart start their own worker processes: not with --no-workers")
    if args.crash and args.no_workers:
        ap.error("--crash starts and kills its own worker processes: not with --no-workers")

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
    rcs = []

    def stop_workers():
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                rcs.append(w.wait(60))
            except subprocess.TimeoutExpired:
                w.kill()
                rcs.append("killed after 60 s")
        workers.clear()

    try:
        if rates or args.searchable:  # the rate phases (and --searchable) on their own stream
            r.xgroup_create(stream, args.group, id="0", mkstream=True)
            if not args.no_workers:
                for k in range(args.workers):
                    log = open(tmp / f"worker{k}.log", "wb")
                    logs.append(log)
                    extra = ["--threads", str(args.threads)] if args.threads else []
                    workers.append(subprocess.Popen(worker_cmd(url, stream, args.group, f"bench{k}", prefix, args) + extra,
                                                    stdout=log, stderr=subprocess.STDOUT))
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
                p0 = time.monotonic() - sampler.t0
                ids, produce_s, behind_ms = produce(r, stream, texts, rate, args.duration, tag, start_index)
                p1 = time.monotonic() - sampler.t0
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
                         "pending_max": max((x["pending"] or 0 for x in in_phase), default=None),
                         # growth while producing (the whole series: "lag_timeline", samples tagged with the rate)
                         "lag_while_producing": lag_trend([x for x in in_phase if p0 <= x["t_s"] <= p1])}
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
        if args.crash:  # alone on the machine: the rate workers are stopped first
            if sampler is not None:
                sampler.stop.set()
                sampler.join()
            stop_workers()
            embedder = []

            def ref():
                if not embedder:
                    from postembed_fast import Embedder

                    embedder.append(Embedder(device=args.device))
                return embedder[0]

            result["crash"] = {"note": "store and ack are one MULTI/EXEC: kill points before/after it are the "
                                       "closest to 'between the store and the ack'", "scenarios": []}
            for sc in scenarios:
                x = crash_scenario(r, url, args, texts, tmp, sc, args.crash_seed, ref)
                result["crash"]["scenarios"].append(x)
                print(json.dumps(x), flush=True)
            result["crash"]["passed"] = all(x["passed"] for x in result["crash"]["scenarios"])
            print(crash_table(result["crash"]["scenarios"]), flush=True)
        if args.failover or args.restart:
            if sampler is not None:
                sampler.stop.set()
                sampler.join()
                result["lag_timeline"] = sampler.samples
                sampler = None
            stop_workers()
            fo_ref = []

            def fo_embedder():
                if not fo_ref:
                    from postembed_fast import Embedder

                    fo_ref.append(Embedder(device=args.device))
                return fo_ref[0]

            if args.failover:
                x = failover_scenario(r, url, args, texts, tmp, args.crash_seed, fo_embedder)
                result["failover"] = x
                print(json.dumps(x), flush=True)
            if args.restart:
                x = restart_times(r, url, args, texts, tmp, args.restart)
                result["restart"] = x
                print(json.dumps(x), flush=True)
    finally:
        if sampler is not None:
            sampler.stop.set()
            sampler.join()
            result["lag_timeline"] = sampler.samples
        stop_workers()
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
        crash_only = "-crash" if args.crash and not rates and not args.searchable else ""
        if (args.failover or args.restart) and not rates and not args.searchable and not args.crash:
            crash_only = "-failover"
        out = Path(args.json) if args.json else RESULTS / f"nearline{crash_only}-{args.device.replace(':', '')}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out} (worker logs: {tmp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
