"""Tokenizer throughput on real posts never tokenized before in the timing process.

    python bench/tokenizers_speed.py [CORPUS] [--rounds 5] [--chunk 4096] [--json OUT]
    from bench.tokenizers_speed import measure_tokenizers; measure_tokenizers(texts) -> dict

Candidates (each in its own fresh worker process, so no tokenizer cache has seen a timed text):
  shipped            FlatTokenizer as shipped: the compiled ASCII WordPiece (no cache), nanotoken
                     with its caches off for the non-ASCII texts
  nanotoken-nocache  FlatTokenizer on nanotoken alone with its caches off (NANOTOKEN_CACHE_ENTRIES=0)
  nanotoken          FlatTokenizer on nanotoken alone as shipped (word caches on; the warm-up chunk
                     and earlier rounds fill them, the timed texts are still unseen)
  hf-flat            FlatTokenizer's fallback: tokenizers encode_batch_fast -> flat numpy arrays
                     (tokenizers has no flat-output API as of 0.23)
  hf-lists           today's Embedder.tokenize: tokenizers encode_batch -> [e.ids ...] lists
Every candidate tokenizes the same chunks (`chunk` texts each, the Embedder's TOKENIZE_CHUNK): one
untimed warm-up chunk, then `rounds` timed chunks, the candidates taking turns chunk by chunk so
that a busy machine slows them all alike. Reported: median tokens/s and texts/s over the rounds,
CPU seconds per wall second while encoding (how many cores it keeps busy), tokens per CPU second,
and, on the warm-up chunk, how freely a pure-Python thread runs meanwhile (the GIL released or not).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = {
    "shipped": {"backend": "fast", "env": {"NANOTOKEN_CACHE_ENTRIES": "0"}},
    "nanotoken-nocache": {"backend": "nanotoken", "env": {"NANOTOKEN_CACHE_ENTRIES": "0"}},
    "nanotoken": {"backend": "nanotoken", "env": {}},
    "hf-flat": {"backend": "hf", "env": {}},
    "hf-lists": {"backend": "lists", "env": {}},
}


# ---- worker (one per candidate) -------------------------------------------------------------------
def _worker(name: str, texts_path: str, model: str | None) -> None:
    from postembed_fast.loading import load_tokenizer, read_model_folder, resolve_model
    from postembed_fast.tokenization import FlatTokenizer

    texts = json.loads(Path(texts_path).read_text())
    spec = read_model_folder(resolve_model(model)[0])
    hf = load_tokenizer(spec.encoder_folder, spec.max_seq_length)
    backend = CANDIDATES[name]["backend"]
    if backend == "lists":
        lower = spec.do_lower_case

        def encode(batch):  # today's Embedder.tokenize
            if lower:
                batch = [t.lower() for t in batch]
            enc = getattr(hf, "encode_batch_fast", hf.encode_batch)
            seqs = [e.ids for e in enc(batch, add_special_tokens=True)]
            return seqs, sum(map(len, seqs))

        label = "tokenizers encode_batch -> lists"
    else:
        if backend == "nanotoken":  # nanotoken alone, verified by FlatTokenizer like any encoder
            import nanotoken

            from postembed_fast.tokenization import _nanotoken_encoder

            nt = _nanotoken_encoder(nanotoken.Tokenizer.from_json(hf.to_str()), spec.max_seq_length, hf.truncation)
            tok = FlatTokenizer(hf, lowercase=spec.do_lower_case, fast_encoder=nt, backend="fast")
        else:
            tok = FlatTokenizer(hf, lowercase=spec.do_lower_case, backend=backend)

        def encode(batch):
            ids, offsets = tok.encode(batch)
            return ids, int(offsets[-1])

        label = tok.backend
    print(json.dumps({"ready": label}), flush=True)
    for line in sys.stdin:  # one request per line: [start, stop, with_spinner]
        start, stop, spin = json.loads(line)
        batch = texts[start:stop]
        if spin:
            print(json.dumps({"gil_free": _gil_free_ratio(encode, batch)}), flush=True)
            continue
        c0, t0 = time.process_time(), time.perf_counter()
        _, n_tokens = encode(batch)
        t1, c1 = time.perf_counter(), time.process_time()
        print(json.dumps({"seconds": t1 - t0, "cpu": c1 - c0, "tokens": n_tokens, "texts": len(batch)}), flush=True)


def _gil_free_ratio(encode, batch) -> float:
    """How much a pure-Python thread gets done while `encode` runs, relative to as long a time
    right after it: near 0 if encode holds the GIL throughout, near 1 (or, when encode busies
    every core, somewhat less) if it releases it."""
    import threading

    ticks, stop = [0], [False]

    def spin():
        while not stop[0]:
            ticks[0] += 1

    th = threading.Thread(target=spin)
    th.start()
    time.sleep(0.05)
    t0, a = time.perf_counter(), ticks[0]
    encode(batch)
    t1, b = time.perf_counter(), ticks[0]
    time.sleep(t1 - t0)
    t2, c = time.perf_counter(), ticks[0]
    stop[0] = True
    th.join()
    return ((b - a) / (t1 - t0)) / max((c - b) / (t2 - t1), 1e-9)


# ---- driver ---------------------------------------------------------------------------------------
def measure_tokenizers(texts: list[str], *, rounds: int = 5, chunk: int = 4096, model=None,
                       candidates=tuple(CANDIDATES)) -> dict:
    """Median throughput of each candidate over `rounds` chunks of unseen texts (see the module doc).
    Needs (rounds + 1) * chunk texts; chunk shrinks to fit a smaller list."""
    import importlib.util

    skipped = {}
    if importlib.util.find_spec("nanotoken") is None:
        skipped = {c: "nanotoken not installed" for c in candidates if CANDIDATES[c]["backend"] == "nanotoken"}
        candidates = [c for c in candidates if c not in skipped]
    chunk = min(chunk, len(texts) // (rounds + 1))
    if chunk < 1:
        raise ValueError(f"{len(texts)} texts are too few for {rounds} rounds")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "texts.json"
        path.write_text(json.dumps(texts[: (rounds + 1) * chunk]))
        procs = {}
        for name in candidates:
            env = {**os.environ, **CANDIDATES[name]["env"], "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
            procs[name] = subprocess.Popen(
                [sys.executable, __file__, "--worker", name, str(path)] + (["--model", str(model)] if model else []),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
        try:
            labels = {name: json.loads(p.stdout.readline())["ready"] for name, p in procs.items()}

            def ask(name, start, stop, spin=False):
                procs[name].stdin.write(json.dumps([start, stop, spin]) + "\n")
                procs[name].stdin.flush()
                return json.loads(procs[name].stdout.readline())

            samples = {name: [] for name in procs}
            gil = {}
            for name in procs:  # warm-up on chunk 0 (thread pools, first-call costs), untimed,
                gil[name] = ask(name, 0, chunk, spin=True)["gil_free"]  # with a GIL probe
            for r in range(1, rounds + 1):
                order = list(procs) if r % 2 else list(procs)[::-1]
                for name in order:
                    samples[name].append(ask(name, r * chunk, (r + 1) * chunk))
        finally:
            for p in procs.values():
                p.stdin.close()
                p.wait(timeout=60)
    results = {}
    for name, rs in samples.items():
        results[name] = {
            "runs": labels[name],
            "tokens_per_s": statistics.median(s["tokens"] / s["seconds"] for s in rs),
            "texts_per_s": statistics.median(s["texts"] / s["seconds"] for s in rs),
            "cores_busy": statistics.median(s["cpu"] / s["seconds"] for s in rs),
            "tokens_per_cpu_s": statistics.median(s["tokens"] / max(s["cpu"], 1e-9) for s in rs),
            "gil_free_ratio": round(gil[name], 2),
            "seconds": [round(s["seconds"], 4) for s in rs],
        }
    base = results.get("hf-lists", {}).get("tokens_per_s")
    for res in results.values():
        res["vs_hf_lists"] = res["tokens_per_s"] / base if base else None
    return {"rounds": rounds, "chunk_texts": chunk, "cpu_count": os.cpu_count(),
            "load_avg": os.getloadavg(), "candidates": results, "skipped": skipped, "precheck_ms": _precheck_costs(texts[:chunk])}


def _precheck_costs(texts: list[str]) -> dict:
    """Milliseconds per chunk of candidate lone-surrogate / type pre-checks (median of 5). FlatTokenizer
    runs only the first: the backends refuse invalid Unicode themselves, and the per-text scan that
    names the index runs only after a refusal."""
    def med(fn):
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return round(statistics.median(ts) * 1e3, 3)

    return {
        "type_set (used)": med(lambda: set(map(type, texts)) <= {str}),
        "per-text str.encode": med(lambda: [t.encode("utf-8") for t in texts]),
        "join + one encode": med(lambda: "".join(texts).encode("utf-8")),
        "per-text str.lower (do_lower_case models only)": med(lambda: [t.lower() for t in texts]),
    }


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", nargs="?", default=None, help="JSONL(.gz) posts (default: tests/data/posts.jsonl.gz)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--model", default=None)
    ap.add_argument("--json", default=None, help="write the result dict here")
    ap.add_argument("--worker", nargs=2, metavar=("NAME", "TEXTS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args.worker[0], args.worker[1], args.model)
        return
    sys.path.insert(0, str(ROOT))
    from bench.corpus import load_posts

    texts = [p["text"] for p in load_posts(args.corpus)]
    res = measure_tokenizers(texts, rounds=args.rounds, chunk=args.chunk, model=args.model)
    print(f"{res['rounds']} rounds x {res['chunk_texts']} unseen posts, {res['cpu_count']} CPUs, "
          f"load average {', '.join(f'{x:.1f}' for x in res['load_avg'])}")
    print(f"{'candidate':<19}{'runs':<34}{'M tokens/s':>11}{'texts/s':>10}{'x lists':>9}{'cores':>7}"
          f"{'M tok/CPU-s':>12}{'GIL free':>9}")
    for name, r in res["candidates"].items():
        print(f"{name:<19}{r['runs']:<34}{r['tokens_per_s'] / 1e6:>11.2f}{r['texts_per_s']:>10,.0f}"
              f"{r['vs_hf_lists']:>9.1f}{r['cores_busy']:>7.2f}{r['tokens_per_cpu_s'] / 1e6:>12.2f}"
              f"{r['gil_free_ratio']:>9.2f}")
    for name, why in res["skipped"].items():
        print(f"{name:<19}skipped: {why}")
    print("pre-check cost per chunk (ms):", json.dumps(res["precheck_ms"]))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
