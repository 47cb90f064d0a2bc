"""Compute the quantization ranges shipped for the default model (all-MiniLM-L6-v2).

    python bench/calibrate_default.py --corpus ../shared/data/debian-posts.jsonl.gz --n 5000

Ranges = per-dimension min and max of the normalized float32 embeddings of real posts.
Posts whose `source` appears in the committed sample (tests/data/posts.jsonl.gz, used by
the tests and the retrieval benchmark) are skipped, so evaluations stay out-of-sample.
Writes postembed_fast/data/all-MiniLM-L6-v2.ranges.npy (float32 [2, 384]) and, from the same
embeddings, all-MiniLM-L6-v2.mean.npy (float32 [384], the default centroid of a rabitq index).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="JSONL(.gz) with text and source fields")
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--out", default=str(ROOT / "postembed_fast" / "data" / "all-MiniLM-L6-v2.ranges.npy"))
    ap.add_argument("--mean-out", default=str(ROOT / "postembed_fast" / "data" / "all-MiniLM-L6-v2.mean.npy"))
    args = ap.parse_args()

    with gzip.open(ROOT / "tests" / "data" / "posts.jsonl.gz", "rt") as f:
        held_out = {json.loads(line)["source"] for line in f}
    opener = gzip.open if args.corpus.endswith(".gz") else open
    with opener(args.corpus, "rt") as f:
        rows = [json.loads(line) for line in f]
    rows = [r for r in rows if r["source"] not in held_out and r["text"].strip()]
    rows.sort(key=lambda r: hashlib.sha1(r["id"].encode()).hexdigest())  # deterministic sample
    texts = [r["text"] for r in rows[: args.n]]

    from postembed_fast import Embedder
    from postembed_fast.embedder import ranges_of

    emb = Embedder(device="cpu", dtype="float32").embed(texts, show_progress=True)
    ranges = ranges_of(emb)
    np.save(args.out, ranges)
    print(f"{len(texts)} posts -> {args.out}: min {ranges[0].min():.4f}, max {ranges[1].max():.4f}")
    mean = emb.astype(np.float64).mean(axis=0).astype(np.float32)  # as Embedder.calibrate
    np.save(args.mean_out, mean)
    print(f"mean embedding -> {args.mean_out}: norm {np.linalg.norm(mean):.4f}")


if __name__ == "__main__":
    main()
