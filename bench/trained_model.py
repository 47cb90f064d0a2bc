"""The trained post-embedding model served by the engine: postembed_fast vs sentence-transformers on the
same folder, same posts, alternating round by round in one process (speed), and their agreement
(cosine per post, float32).

    python -m bench.trained_model --model models/compare/multi-50 [--n 1000] [--rounds 3] [--device cpu]

Writes bench/results/<device>-trained-model.json.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
POSTS = Path(__file__).resolve().parents[1] / "tests" / "data" / "posts.jsonl.gz"
RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    with gzip.open(POSTS, "rt") as f:
        texts = [json.loads(line)["text"] for line, _ in zip(f, range(a.n))]

    from sentence_transformers import SentenceTransformer

    from postembed_fast import Embedder

    ours = Embedder(a.model, device=a.device, dtype="float32")
    st = SentenceTransformer(a.model, device=a.device)
    x, y = ours.embed(texts), st.encode(texts, batch_size=32, convert_to_numpy=True)
    cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    from bench.st_ratio import interleaved_rounds

    rounds = interleaved_rounds(st, ours, texts, a.rounds)
    out = {"command": f"python -m bench.trained_model --model {a.model} --n {a.n} --rounds {a.rounds} --device {a.device}",
           "model_tag": ours.model_tag, "dim": ours.dim, "max_seq_length": ours.max_seq_length, "posts": len(texts),
           "machine": f"{platform.node()} {os.cpu_count()} cpus", "load_average": os.getloadavg(),
           "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()), "rounds": rounds,
           "median_ratio": float(np.median([r["ratio"] for r in rounds]))}
    print(json.dumps({k: v for k, v in out.items() if k != "rounds"}))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{'cpu-2core' if a.device == 'cpu' else a.device}-trained-model.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
