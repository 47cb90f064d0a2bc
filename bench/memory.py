"""embed_iter memory: peak RSS of a fresh process embedding N posts, for small and large N.

Each N runs in its own subprocess (`python -m bench.memory --child N`), so its peak is clean.
The child loads the Embedder, streams N posts (the corpus repeated) through embed_iter and
drops each chunk as a server writing to disk would. Reported: the kernel's peak RSS of the
child (ru_maxrss: model load included, no sampling gaps) and its growth over the RSS right
after loading; the target compares the peaks of the large and the small run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def child(n, corpus, device, chunk_size):
    import resource

    import psutil
    import torch

    from postembed_fast import Embedder

    from bench.corpus import load_posts
    from bench.measure import PeakRSS, sync

    texts = [p["text"] for p in load_posts(corpus)]
    e = Embedder(device=device)
    e.embed(texts[:16])  # load-time allocations and first-call caches belong to the baseline
    stream = (texts[i % len(texts)] for i in range(n))
    rows = 0
    t0 = time.perf_counter()
    with PeakRSS(interval=0.005) as rss:
        for chunk in e.embed_iter(stream, chunk_size=chunk_size):
            rows += len(chunk)
        sync(device)
    secs = time.perf_counter() - t0
    res = dict(posts=rows, chunk_size=chunk_size, seconds=secs, posts_per_s=rows / secs,
               rss_after_load_mb=rss.start / 2**20, rss_peak_sampled_mb=rss.peak / 2**20,
               rss_growth_mb=rss.growth / 2**20,
               ru_maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               rss_end_mb=psutil.Process().memory_info().rss / 2**20)
    if torch.device(device).type == "cuda":
        res["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(res))


def run(sizes, corpus, device, chunk_size=1024, limit_mb=200.0) -> dict:
    """-> {"runs": [child results], "peak_delta_mb", "limit_mb", "pass"}."""
    runs = []
    for n in sizes:
        cmd = [sys.executable, "-m", "bench.memory", "--child", str(n), "--device", str(device),
               "--chunk-size", str(chunk_size)] + (["--corpus", str(corpus)] if corpus else [])
        print(f"  memory: embed_iter over {n} posts in a fresh process ...", flush=True)
        p = subprocess.run(cmd, capture_output=True, text=True,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if p.returncode:
            raise RuntimeError(f"memory child failed:\n{p.stderr[-3000:]}")
        r = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"    peak RSS {r['ru_maxrss_mb']:.0f} MB (growth after load {r['rss_growth_mb']:.0f} MB), "
              f"{r['posts_per_s']:.1f} posts/s", flush=True)
        runs.append(r)
    delta = runs[-1]["ru_maxrss_mb"] - runs[0]["ru_maxrss_mb"]
    return dict(runs=runs, peak_delta_mb=delta, limit_mb=limit_mb, passed=delta <= limit_mb,
                measures="ru_maxrss of a fresh process per size (kernel peak RSS, model load included); "
                         "delta = peak(largest) - peak(smallest)")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.memory")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="1000,50000")
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chunk-size", type=int, default=1024)
    a = ap.parse_args(argv)
    if a.child is not None:
        return child(a.child, a.corpus, a.device, a.chunk_size)
    print(json.dumps(run([int(s) for s in a.sizes.split(",")], a.corpus, a.device, a.chunk_size), indent=1))


if __name__ == "__main__":
    main()
