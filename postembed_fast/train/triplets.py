"""Write the evaluation triplets of a corpus's test split to a file, deterministically:

    python -m postembed_fast.train.triplets --data POSTS.jsonl.gz --out triplets.jsonl.gz [--seed 0]

The same data and seed give a byte-identical file (records hold post ids and tags, not texts).
"""
from __future__ import annotations

import argparse
import collections
import sys

from postembed_fast.train.data import read_posts, split_posts
from postembed_fast.train.tasks import TRIPLETS_PER_TASK, build_triplets, write_triplets


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m postembed_fast.train.triplets", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="posts, JSONL or JSONL.gz")
    p.add_argument("--out", required=True, help="output file (.jsonl or .jsonl.gz)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-task", type=int, default=TRIPLETS_PER_TASK, help="anchors per task (each: random + hard)")
    a = p.parse_args(argv)
    if a.per_task < 1:
        p.error("--per-task must be >= 1")
    try:
        test = split_posts(read_posts(a.data))["test"]
    except ValueError as exc:
        p.exit(2, f"{p.prog}: error: {exc}\n")
    triplets = build_triplets(test, seed=a.seed, per_task=a.per_task)
    write_triplets(triplets, a.out)
    counts = collections.Counter((t["task"], t["negative"]) for t in triplets)
    print(f"{len(triplets)} triplets from {len(test)} test posts -> {a.out}: "
          + ", ".join(f"{t}/{k} {n}" for (t, k), n in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
