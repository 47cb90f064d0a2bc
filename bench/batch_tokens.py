"""Sweep postembed_fast's batch_tokens on one device: `python -m bench.batch_tokens [--device cpu]`.

Throughput (posts/s, tokens/s; tokenization included, after a warm-up, median of --repeats)
for each batch_tokens value; `python -m bench` runs the same sweep for its plot.
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_VALUES = (1024, 2048, 4096, 8192, 16384)


def sweep(embedder, texts, n_tokens, values=DEFAULT_VALUES, repeats=3, device="cpu", precision="float32",
          warmup_posts=64):
    from bench.measure import throughput
    from bench.systems import Postembed

    rows = []
    for bt in values:
        res, _ = throughput(Postembed(embedder, precision, batch_tokens=bt), texts, n_tokens, device, repeats,
                            warmup_texts=texts[:warmup_posts])
        rows.append(dict(batch_tokens=bt, posts_per_s=res["posts_per_s"], tokens_per_s=res["tokens_per_s"],
                         seconds=res["seconds"]))
        print(f"  batch_tokens={bt:>6}: {res['posts_per_s']:8.1f} posts/s {res['tokens_per_s']:10.0f} tokens/s",
              flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.batch_tokens", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: the Embedder's)")
    ap.add_argument("--posts", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--values", default=",".join(map(str, DEFAULT_VALUES)))
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    from postembed_fast import Embedder

    from bench.corpus import load_posts, take

    e = Embedder(device=a.device, dtype=a.dtype)
    texts = take([p["text"] for p in load_posts(a.corpus)], a.posts)
    n_tokens = sum(map(len, e.tokenize(texts)))
    print(f"{len(texts)} posts, {n_tokens / len(texts):.1f} tokens/post, device {a.device}, dtype {e.dtype}")
    rows = sweep(e, texts, n_tokens, [int(v) for v in a.values.split(",")], a.repeats, a.device)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(device=a.device, dtype=str(e.dtype), posts=len(texts), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
