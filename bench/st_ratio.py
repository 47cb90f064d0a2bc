"""Interleaved throughput check: sentence-transformers encode (batch 32) and postembed_fast
embed on the same posts, alternating in one process, 3 rounds (float32, CPU by default).

    python bench/st_ratio.py --start 0 --n 1000

A cross-check of `python -m bench`'s ratio: alternating the two systems round by round
exposes both to the same machine load.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
POSTS = Path(__file__).resolve().parents[1] / "tests" / "data" / "posts.jsonl.gz"


def interleaved_rounds(st, ours, texts, rounds: int) -> list[dict]:
    """sentence-transformers encode (batch 32) then postembed_fast embed of the same texts, per round;
    -> [{sentence_transformers_posts_s, postembed_fast_posts_s, ratio}], each round printed."""
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        st.encode(texts, batch_size=32)
        t_st = time.perf_counter() - t
        t = time.perf_counter()
        ours.embed(texts)
        t_ours = time.perf_counter() - t
        out.append({"sentence_transformers_posts_s": len(texts) / t_st, "postembed_fast_posts_s": len(texts) / t_ours,
                    "ratio": t_st / t_ours})
        print(f"sentence-transformers {len(texts) / t_st:6.1f} posts/s   postembed_fast {len(texts) / t_ours:6.1f} "
              f"posts/s   ratio {t_st / t_ours:.3f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    with gzip.open(POSTS, "rt") as f:
        texts = [json.loads(line)["text"] for line in f][a.start : a.start + a.n]

    from sentence_transformers import SentenceTransformer

    from postembed_fast import Embedder
    from postembed_fast.loading import default_model_folder

    ours = Embedder(device=a.device)
    st = SentenceTransformer(str(default_model_folder()), device=a.device)
    ours.embed(texts[:50])
    st.encode(texts[:50])
    ratios = [r["ratio"] for r in interleaved_rounds(st, ours, texts, a.rounds)]
    print(f"median ratio {np.median(ratios):.3f} over {a.rounds} rounds, {len(texts)} posts")


if __name__ == "__main__":
    main()
