"""Print process RSS and peak RSS (MB) after each embed_iter chunk, to see whether memory grows
with input length. Compare allocator settings from the shell, e.g.

    python bench/rss_per_chunk.py --n 5000
    MALLOC_MMAP_THRESHOLD_=1048576 python bench/rss_per_chunk.py --n 5000
"""
from __future__ import annotations

import argparse
import gzip
import json
import resource
from pathlib import Path

import psutil

POSTS = Path(__file__).resolve().parents[1] / "tests" / "data" / "posts.jsonl.gz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--chunk-size", type=int, default=1024)
    a = ap.parse_args()
    with gzip.open(POSTS, "rt") as f:
        texts = [json.loads(line)["text"] for line in f]

    from postembed_fast import Embedder

    e = Embedder(device="cpu")
    e.embed(texts[:16])
    proc, done = psutil.Process(), 0
    stream = (texts[i % len(texts)] for i in range(a.n))
    for chunk in e.embed_iter(stream, chunk_size=a.chunk_size):
        done += len(chunk)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
        print(f"{done:7d} posts   rss {proc.memory_info().rss >> 20:5d} MB   peak {peak:5d} MB", flush=True)


if __name__ == "__main__":
    main()
