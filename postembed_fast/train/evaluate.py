"""Triplet accuracy: the share of (anchor, positive, negative) triplets where cos(anchor, positive) >
cos(anchor, negative), per task and negative kind, with a 95% bootstrap confidence interval.

    python -m postembed_fast.train.evaluate --data POSTS.jsonl.gz --model PATH [--model NAME=PATH ...]
        [--triplets FILE] [--out results.json]

Models are embedded by the engine (postembed_fast.Embedder, float32), so what is scored is what
fast_embed serves. Without --triplets the triplets are built from the data's test split
(postembed_fast.train.tasks.build_triplets, deterministic for a seed).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from postembed_fast.train.data import read_posts, split_posts
from postembed_fast.train.tasks import (EVAL_TASKS, NEGATIVE_KINDS, TRAIN_TASKS, TRIPLETS_PER_TASK, build_triplets,
                                        read_triplets, resolve_ref)

BOOTSTRAP_RESAMPLES = 1000


def bootstrap_ci(correct: np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of a 0/1 (or difference) vector, resampled with replacement."""
    x = np.asarray(correct, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for i in range(0, resamples, 100):  # 100 resamples at a time: bounded memory for large n
        idx = rng.integers(0, x.size, size=(min(100, resamples - i), x.size))
        means[i:i + idx.shape[0]] = x[idx].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def paired_difference(a: np.ndarray, b: np.ndarray, seed: int = 0) -> dict:
    """Accuracy of a minus accuracy of b on the same triplets, with a paired bootstrap 95% interval."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    lo, hi = bootstrap_ci(d, seed=seed)
    return {"difference": float(d.mean()), "ci_low": lo, "ci_high": hi}


def parse_model_arg(spec: str) -> tuple[str, str]:
    """'NAME=PATH' or 'PATH' (named after the folder) or the default model's alias."""
    name, sep, path = spec.partition("=")
    if not sep:
        path = spec
        name = Path(spec).name or spec
    if not name or not path:
        raise ValueError(f"bad --model {spec!r}: expected PATH or NAME=PATH")
    return name, path


SCORED_PRECISIONS = ("float32", "int8", "binary")


def comparable_vectors(emb, texts: list[str], precision: str, **kw) -> np.ndarray:
    """Rows whose dot product is the similarity a store of that precision gives: unit float32 vectors;
    int8 codes decoded with the model's ranges and re-normalized; binary codes as +-1 / sqrt(bits)
    (the dot is then 1 - 2 * hamming / bits)."""
    if precision == "float32":
        return emb.embed(texts, **kw)
    codes = emb.embed(texts, precision=precision, **kw)
    if precision == "int8":
        lo, hi = emb.quantization_ranges
        x = (codes.astype(np.float32) + 128.0) * ((hi - lo) / 255.0) + lo
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if precision == "binary":
        bits = np.unpackbits((codes.astype(np.int16) + 128).astype(np.uint8), axis=1)[:, :emb.dim]
        return (bits.astype(np.float32) * 2 - 1) / np.sqrt(emb.dim)
    raise ValueError(f"precision {precision!r} cannot be scored; valid: {', '.join(SCORED_PRECISIONS)}")


def score_model(path: str, triplets: list[dict], by_id: dict, *, device=None, batch_tokens=None,
                show_progress: bool = False, precision: str = "float32", truncate_dim=None) -> tuple[dict, dict]:
    """-> (info {model_tag, dim, embed_seconds, texts}, {(task, kind): bool array per triplet})."""
    from postembed_fast import Embedder

    emb = Embedder(path, device=device, dtype="float32", truncate_dim=truncate_dim)
    refs = sorted({r for t in triplets for r in (t["anchor"], t["positive"], t["negative_ref"])})
    row = {r: i for i, r in enumerate(refs)}
    t0 = time.perf_counter()
    vecs = comparable_vectors(emb, [resolve_ref(r, by_id) for r in refs], precision, batch_tokens=batch_tokens,
                              show_progress=show_progress)
    seconds = time.perf_counter() - t0
    a = vecs[[row[t["anchor"]] for t in triplets]]
    p = vecs[[row[t["positive"]] for t in triplets]]
    n = vecs[[row[t["negative_ref"]] for t in triplets]]
    correct = (a * p).sum(1) > (a * n).sum(1)  # unit vectors: dot = cosine
    out = {}
    for key in {(t["task"], t["negative"]) for t in triplets}:
        mask = np.array([(t["task"], t["negative"]) == key for t in triplets])
        out[key] = correct[mask]
    return {"model_tag": emb.model_tag, "dim": emb.dim, "precision": precision, "embed_seconds": round(seconds, 1),
            "texts": len(refs)}, out


def summarize(name: str, info: dict, correct: dict, seed: int = 0) -> dict:
    rows = []
    for task in EVAL_TASKS:
        for kind in NEGATIVE_KINDS:
            if (task, kind) not in correct:
                continue
            c = correct[(task, kind)]
            lo, hi = bootstrap_ci(c, seed=seed)
            rows.append({"task": task, "negative": kind, "n": int(c.size), "accuracy": float(c.mean()),
                         "ci_low": lo, "ci_high": hi})
    hard_trained = [r["accuracy"] for r in rows if r["negative"] == "hard" and r["task"] in TRAIN_TASKS]
    every = [r["accuracy"] for r in rows]
    return {"model": name, **info, "results": rows,
            "mean_accuracy": float(np.mean(every)) if every else None,
            "mean_hard_trained_tasks": float(np.mean(hard_trained)) if hard_trained else None}


def format_table(summaries: list[dict]) -> str:
    cols = [(t, k) for t in EVAL_TASKS for k in NEGATIVE_KINDS
            if any((r["task"], r["negative"]) == (t, k) for s in summaries for r in s["results"])]
    head = ["model", "dim"] + [f"{t}/{k}" for t, k in cols] + ["mean"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for s in summaries:
        cell = {(r["task"], r["negative"]): r for r in s["results"]}
        vals = [f"{cell[c]['accuracy']:.3f} [{cell[c]['ci_low']:.3f}, {cell[c]['ci_high']:.3f}]" if c in cell else "-"
                for c in cols]
        lines.append(" | ".join([s["model"], str(s["dim"]), *vals, f"{s['mean_accuracy']:.4f}"]))
    return "\n".join("| " + ln + " |" for ln in lines)


def load_triplets(data_posts, triplets_path=None, *, seed=0, per_task=TRIPLETS_PER_TASK):
    if triplets_path is not None:
        return read_triplets(triplets_path)
    return build_triplets(split_posts(data_posts)["test"], seed=seed, per_task=per_task)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m postembed_fast.train.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the posts (JSONL or JSONL.gz) the triplets refer to")
    p.add_argument("--model", action="append", required=True, metavar="[NAME=]PATH",
                   help="a model folder (or all-MiniLM-L6-v2); repeat for a table")
    p.add_argument("--triplets", help="triplets file (python -m postembed_fast.train.triplets); "
                                      "default: built from the data's test split")
    p.add_argument("--seed", type=int, default=0, help="triplet seed when built here (default 0)")
    p.add_argument("--per-task", type=int, default=TRIPLETS_PER_TASK, help="anchors per task when built here")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--precision", choices=SCORED_PRECISIONS, default="float32",
                   help="score the stored codes of this precision (int8 uses the model's ranges)")
    p.add_argument("--out", help="write the results as JSON here")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        models = [parse_model_arg(m) for m in a.model]
        posts = read_posts(a.data)
        triplets = load_triplets(posts, a.triplets, seed=a.seed, per_task=a.per_task)
        by_id = {p.id: p for p in posts}
        summaries = []
        for name, path in models:
            info, correct = score_model(path, triplets, by_id, device=a.device, show_progress=sys.stderr.isatty(),
                                        precision=a.precision)
            summaries.append(summarize(name, info, correct))
            print(f"{name}: mean triplet accuracy {summaries[-1]['mean_accuracy']:.4f} "
                  f"({info['texts']} texts embedded in {info['embed_seconds']} s)", file=sys.stderr)
    except (ValueError, ImportError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    print(format_table(summaries))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"data": str(a.data), "triplets": a.triplets or "built from --data",
                                           "models": summaries}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
