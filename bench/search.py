"""Exact top-k search: EmbeddingIndex against FAISS, usearch, torch and numpy on the same data.

    python -m bench.search [--posts 5000] [--n 100000] [--sigma 0.02] [--threads 2] [--model FOLDER]
                           [--json bench/results/cpu-2core-search.json] [--plot PNG]
    python -m bench.search --plot-only bench/results/cpu-2core-search.json --plot bench/results/cpu-2core-search.png

Data: real embeddings (Embedder(device="cpu"), default model or --model, e.g. the trained 50-d one) of tests/data/posts.jsonl.gz: the
titles are the queries, the texts the database. Quality (title -> own text recall@10) is measured
on those `--posts` real pairs. Speed: a database of `--n` vectors made from the real text
embeddings plus Gaussian noise (sigma per dimension, `--sigma`) and renormalized, queried by the
real title embeddings; queries/s at batch 1 (one query per call) and batch 256, k=10, every system
with `--threads` threads; recall@10 against exact float32 search of the same database; bytes per
vector stored. Binary rescored: top k*r by the asymmetric score (int8 query . +-1 sign bits),
re-ranked with the float16 vectors; "ITQ": the index binarizes x R, R = itq_rotation() trained on
the real text embeddings (the database of the quality section; the speed database is noisy copies
of them); the titles (queries) are never used for training. A held-out check trains on the first
half of the texts and searches the second half with the second half's titles. "Hamming top-40
rescored (before)": the first stage as it was before the asymmetric one, emulated here (top k*r by
search() without rescore, re-ranked with the same float16 vectors).
rabitq: EmbeddingIndex(precision="rabitq") with for_embedder's centroid (the model's mean embedding,
from its calibration posts: nothing from the database), with the midpoint of its ranges (the default
before), and, as FAISS trains it, with the database's mean
(centroid=); FAISS IndexRaBitQ (its centroid trained on the database, qb = query bits stated; "RR":
behind a RandomRotationMatrix), + IndexRefineFlat (k_factor 4, float32 refine), IndexRaBitQFastScan.
int8 "before": the earlier integer score of centred codes, (q - z).(x - z), emulated in numpy.
The JSON records the CPU model and flags (/proc/cpuinfo) and the compiled module's ISA level.
Peers need `pip install "faiss-cpu>=1.11" usearch` (skipped with a note when missing; IndexRaBitQ
from faiss 1.11).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "posts.jsonl.gz"
K = 10


PREFILTERS = (0, 4, 8, 12, 16)  # search(prefilter=f) rows: the Hamming pre-filter factors measured (0: every row)


def prefilter_label(f: int) -> str:
    return "every row" if f == 0 else f"Hamming prefilter {f}"


def load_pairs(n):
    titles, texts = [], []
    with gzip.open(DATA, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r.get("title") and r.get("text"):
                titles.append(r["title"])
                texts.append(r["text"])
            if len(titles) == n:
                break
    return titles, texts


def embed_pairs(n, cache, model=None):
    from postembed_fast import Embedder

    e = Embedder(model, device="cpu")
    # one cache file per model: the file also records the tag and is ignored if it does not match
    path = Path(cache.replace("{tag}", e.model_tag[:16])) if cache else None
    if path and path.exists():
        z = np.load(path, allow_pickle=False)
        if str(z["tag"]) == e.model_tag and len(z["q"]) == n:
            return e, z["q"], z["d"]
    titles, texts = load_pairs(n)
    t = time.perf_counter()
    q, d = e.embed(titles), e.embed(texts)
    print(f"embedded {len(titles)} titles + texts in {time.perf_counter() - t:.0f} s")
    if path:
        np.savez(path, q=q, d=d, tag=np.array(e.model_tag))
    return e, q, d


def timeit(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def qps(search, queries, batch, reps, singles):
    if batch == 1:
        qs = queries[:singles]
        dt = timeit(lambda: [search(qs[i: i + 1]) for i in range(len(qs))], reps)
        return len(qs) / dt
    qs = queries[:batch]
    return batch / timeit(lambda: search(qs), reps)


def recall(got, want):
    return float(np.mean([len(set(g[g >= 0]) & set(w)) / len(w) for g, w in zip(got, want)]))


def cpu_description() -> dict:
    """The CPU's model name and flags (Linux /proc/cpuinfo), and which ISA level our kernels run."""
    info = {"model": platform.processor() or platform.machine(), "flags": []}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and info["model"] in ("", platform.machine(), platform.processor()):
                info["model"] = value.strip()
            elif key.strip() == "flags":
                info["flags"] = value.split()
                break
    except OSError:
        pass
    try:
        from postembed_fast.kernels import _ext, cpu_isa

        if _ext._C is not None:
            info["postembed_isa_level"] = cpu_isa.ISA_LEVELS[_ext._C.cpu_isa()]
            info["scans"] = cpu_isa.scans()  # the build each of our scans ran (avx512 / avx2 / baseline)
    except Exception as exc:  # an older build without the ISA table
        info["postembed_isa_level"] = f"unknown ({exc})"
    return info


def pca50_int8_recall(q_real, d_real) -> dict:
    """int8 recall@10 of exact float32 at 50 dimensions without the 50-d model: the embeddings projected
    on the top 50 principal axes of texts [0, h) (and renormalized), ranges from those texts, database
    texts [h, n) searched by titles [h, n). (The old int8 score gave 0.710 here, 0.707 with the trained
    50-d model: the proxy tracks it.)"""
    from postembed_fast import quantize_embeddings
    from postembed_fast.ranges import ranges_of
    from postembed_fast.search import EmbeddingIndex

    h = len(d_real) // 2
    train = d_real[:h].astype(np.float64)
    axes = np.linalg.svd(train - train.mean(0), full_matrices=False)[2][:50].T

    def project(x):
        y = x.astype(np.float64) @ axes
        return (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)

    q, d, ranges = project(q_real[h:]), project(d_real[h:]), ranges_of(project(d_real[:h]))
    exact = np.argsort(-(q @ d.T), axis=1, kind="stable")[:, :K]
    ix = EmbeddingIndex(50, precision="int8", ranges=ranges)
    ix.add(d)
    x8, q8 = (quantize_embeddings(a, "int8", ranges).astype(np.int64) for a in (d, q))
    z8 = quantize_embeddings(np.zeros((1, 50), np.float32), "int8", ranges)[0].astype(np.int64)
    before = np.argsort(-((q8 - z8) @ (x8 - z8).T), axis=1, kind="stable")[:, :K]
    return {"int8 50-d PCA proxy": recall(ix.search(q, K)[1], exact),
            "int8 before (centred codes) 50-d PCA proxy": recall(before, exact)}


def faiss_rabitq(faiss, dim, qb, rotate=False, fast_scan=False):
    """FAISS's RaBitQ index for inner products: IndexRaBitQ (qb query bits) or IndexRaBitQFastScan,
    optionally behind a RandomRotationMatrix (seed 0)."""
    if fast_scan:
        ix = faiss.IndexRaBitQFastScan(dim, faiss.METRIC_INNER_PRODUCT)
    else:
        ix = faiss.IndexRaBitQ(dim, faiss.METRIC_INNER_PRODUCT)
    ix.qb = qb
    if not rotate:
        return ix, ix
    rr = faiss.RandomRotationMatrix(dim, dim)
    rr.init(0)
    return faiss.IndexPreTransform(rr, ix), ix


def faiss_rabitq_rows(faiss, dim):
    """(label, make) of the FAISS RaBitQ configurations compared: make() -> an untrained index."""
    rows = []
    if hasattr(faiss, "IndexRaBitQ"):
        for qb in (4, 8):
            rows.append((f"IndexRaBitQ qb={qb}", lambda qb=qb: faiss_rabitq(faiss, dim, qb)[0]))
        rows.append(("IndexRaBitQ qb=8 RR", lambda: faiss_rabitq(faiss, dim, 8, rotate=True)[0]))

        def refined():
            r = faiss.IndexRefineFlat(faiss_rabitq(faiss, dim, 4)[0])
            r.k_factor = 4
            return r

        rows.append(("IndexRaBitQ qb=4 + IndexRefineFlat x4", refined))
    if hasattr(faiss, "IndexRaBitQFastScan"):
        rows.append(("IndexRaBitQFastScan qb=8", lambda: faiss_rabitq(faiss, dim, 8, fast_scan=True)[0]))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--posts", type=int, default=5000)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--sigma", type=float, default=0.02)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds over all systems; the best is kept")
    ap.add_argument("--singles", type=int, default=50, help="queries timed one by one for batch 1")
    ap.add_argument("--rescore", type=int, default=4)
    ap.add_argument("--cache", default="/tmp/postembed_search_embeddings-{tag}.npz",
                    help="embeddings cache ({tag}: the model's tag)")
    ap.add_argument("--model", default=None, help="model folder (default: all-MiniLM-L6-v2), e.g. models/post-embed-50")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "cpu-2core-search.json"))
    ap.add_argument("--plot", default=None, metavar="PNG", help="also plot queries/s against recall@10")
    ap.add_argument("--plot-only", default=None, metavar="JSON",
                    help="no measurement: plot the results of an earlier run's JSON into --plot")
    args = ap.parse_args(argv)
    if args.plot_only:
        if not args.plot:
            ap.error("--plot-only needs --plot PNG")
        plot(json.loads(Path(args.plot_only).read_text()), args.plot)
        return None

    import torch

    from postembed_fast import quantize_embeddings
    from postembed_fast.search import EmbeddingIndex, itq_rotation
    from postembed_fast.search.index import HAMMING_PREFILTER
    from postembed_fast.kernels import _ext

    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()
    emb, q_real, d_real = embed_pairs(args.posts, args.cache, args.model)
    dim = q_real.shape[1]
    ranges = emb.quantization_ranges

    # ---- quality on the real pairs: title -> own text, recall@10 --------------------------
    quality, real_recall = {}, {}
    real_exact = np.argsort(-(q_real @ d_real.T), axis=1, kind="stable")[:, :K]
    t0 = time.perf_counter()
    rot = itq_rotation(d_real)  # the database's own vectors (as FAISS trains on data); never the queries
    itq_seconds = time.perf_counter() - t0
    rs = args.rescore
    mean_real = d_real.mean(axis=0)
    midpoint = None if ranges is None else (ranges.astype(np.float64).sum(axis=0) / 2).astype(np.float32)  # the old default
    for name, kw, prec, rotation, centroid in (
            ("float32", {}, "float32", None, None), ("int8", {}, "int8", None, None),
            ("binary", {}, "binary", None, None), ("binary ITQ", {}, "binary", rot, None),
            (f"binary + asymmetric rescore x{rs}", {"rescore": rs}, "binary", None, None),
            (f"binary ITQ + asymmetric rescore x{rs}", {"rescore": rs}, "binary", rot, None),
            ("rabitq", {}, "rabitq", None, None), (f"rabitq + rescore x{rs}", {"rescore": rs}, "rabitq", None, None),
            ("rabitq centroid=ranges midpoint", {}, "rabitq", None, midpoint),
            ("rabitq centroid=database mean", {}, "rabitq", None, mean_real),
            (f"rabitq centroid=database mean + rescore x{rs}", {"rescore": rs}, "rabitq", None, mean_real)):
        ix = EmbeddingIndex.for_embedder(emb, precision=prec, keep_float16="rescore" in kw, rotation=rotation,
                                         centroid=centroid)
        ix.add(d_real)
        _, ids = ix.search(q_real, K, **kw)
        quality[name] = float(np.mean([i in row for i, row in enumerate(ids)]))
        real_recall[name] = recall(ids, real_exact)
    # int8 before this version: the integer dot of codes centred on the code of 0.0
    x8, q8 = (quantize_embeddings(a, "int8", ranges).astype(np.int64) for a in (d_real, q_real))
    z8 = quantize_embeddings(np.zeros((1, dim), np.float32), "int8", ranges)[0].astype(np.int64)
    real_recall["int8 before (centred codes)"] = recall(
        np.argsort(-((q8 - z8) @ (x8 - z8).T), axis=1, kind="stable")[:, :K], real_exact)
    if dim > 50:  # a 50-d proxy (no 50-d model needed): PCA of the first half's texts, searched on the second half
        real_recall.update(pca50_int8_recall(q_real, d_real))
    pf_ix = EmbeddingIndex.for_embedder(emb, precision="binary", keep_float16=True)
    pf_ix.add(d_real)
    for f in PREFILTERS:  # the Hamming pre-filter before the asymmetric stage (search(prefilter=f))
        real_recall[f"binary + asymmetric rescore x{rs}, {prefilter_label(f)}"] = recall(
            pf_ix.search(q_real, K, rescore=rs, prefilter=f)[1], real_exact)
    rq_sweep = EmbeddingIndex.for_embedder(emb, precision="rabitq", keep_float16=True)
    rq_sweep.add(d_real)
    for r in (2, 10):
        real_recall[f"rabitq + rescore x{r}"] = recall(rq_sweep.search(q_real, K, rescore=r)[1], real_exact)
    try:
        if args.no_peers:
            raise ImportError("--no-peers")
        import faiss

        for label, make in faiss_rabitq_rows(faiss, dim):
            fx = make()
            fx.train(d_real)
            fx.add(d_real)
            _, ids = fx.search(q_real, K)
            quality["faiss " + label] = float(np.mean([i in row for i, row in enumerate(ids)]))
            real_recall["faiss " + label] = recall(ids, real_exact)
    except ImportError as exc:
        real_recall["faiss"] = f"skipped: {exc}"
    f16 = d_real.astype(np.float16).astype(np.float32)
    for label, rotation in (("binary", None), ("binary ITQ", rot)):
        sweep = EmbeddingIndex.for_embedder(emb, precision="binary", keep_float16=True, rotation=rotation)
        sweep.add(d_real)
        for r in (2, 4, 10):
            real_recall[f"{label} + asymmetric rescore x{r}"] = recall(sweep.search(q_real, K, rescore=r)[1],
                                                                       real_exact)
        for r in (4, 10, 25, 50):  # the first stage before: Hamming top k*r, then the same float16 re-rank
            _, cand = sweep.search(q_real, K * r)
            sc = np.einsum("qd,qkd->qk", q_real, f16[cand])
            top = np.take_along_axis(cand, np.argsort(-sc, axis=1, kind="stable")[:, :K], 1)
            real_recall[f"{label} Hamming top-{K * r} rescored (before)"] = recall(top, real_exact)
    # held out: ITQ trained on texts [0, h), searched over texts [h, n) with titles [h, n)
    h = len(d_real) // 2
    held = {"train": f"texts [0, {h})", "database": f"texts [{h}, {len(d_real)})",
            "queries": f"titles [{h}, {len(d_real)})"}
    held_exact = np.argsort(-(q_real[h:] @ d_real[h:].T), axis=1, kind="stable")[:, :K]
    for name, rotation in (("no rotation", None), ("ITQ trained on the other half", itq_rotation(d_real[:h])),
                           ("ITQ trained on the database itself", itq_rotation(d_real[h:]))):
        ix = EmbeddingIndex.for_embedder(emb, precision="binary", keep_float16=True, rotation=rotation)
        ix.add(d_real[h:])
        held[f"{name}: asymmetric rescore x{rs}"] = recall(ix.search(q_real[h:], K, rescore=rs)[1], held_exact)
        held[f"{name}: Hamming"] = recall(ix.search(q_real[h:], K)[1], held_exact)
    print("title->text recall@10:", quality)
    print("recall@10 vs exact float32, real texts:", real_recall)
    print("ITQ held out:", held)

    # ---- speed data -----------------------------------------------------------------------
    rng = np.random.default_rng(0)
    base = d_real[np.arange(args.n) % len(d_real)]
    db = base + rng.standard_normal(base.shape, dtype=np.float32) * np.float32(args.sigma)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    db = db.astype(np.float32)
    queries = q_real[rng.permutation(len(q_real))[:256]]
    exact = np.argsort(-(queries @ db.T), axis=1, kind="stable")[:, :K]

    results, searches = [], []

    def record(system, precision, search, bytes_per_vector, note=""):
        _, ids = search(queries)
        row = {"system": system, "precision": precision, "qps_batch1": 0.0, "qps_batch256": 0.0,
               "recall@10_vs_float32": recall(np.asarray(ids), exact), "bytes_per_vector": bytes_per_vector,
               "note": note}
        results.append(row)
        searches.append(search)
        return row

    # ours
    ours = {}
    for prec in ("binary", "int8", "float32"):
        ix = EmbeddingIndex.for_embedder(emb, precision=prec)
        ix.add(db)
        ours[prec] = ix
        record("postembed_fast EmbeddingIndex", prec, lambda qs, ix=ix: ix.search(qs, K),
               ix.bytes_per_vector - 8)
    # int8 as it was before the float estimate: quantize the query, the centred-code integer scan
    from postembed_fast.kernels import int8_topk
    from postembed_fast.kernels.int8_topk import int8_row_bias

    z8t = torch.from_numpy(quantize_embeddings(np.zeros((1, dim), np.float32), "int8", ranges)[0])
    db8 = ours["int8"]._codes[: len(ours["int8"])]
    bias8 = int8_row_bias(db8, z8t)
    record("postembed_fast EmbeddingIndex", "int8 before (centred codes)",
           lambda qs: int8_topk(torch.from_numpy(quantize_embeddings(qs, "int8", ranges)), db8, K, z8t,
                                db_bias=bias8), dim, note="the previous int8 search path, emulated")
    rix = EmbeddingIndex.for_embedder(emb, precision="binary", keep_float16=True)
    rix.add(db)
    record("postembed_fast EmbeddingIndex", f"binary+asymmetric rescore x{rs} (float16)",
           lambda qs: rix.search(qs, K, rescore=rs), rix.bytes_per_vector - 8)
    for f in PREFILTERS:
        record("postembed_fast EmbeddingIndex", f"binary+asymmetric rescore x{rs} (float16), {prefilter_label(f)}",
               lambda qs, f=f: rix.search(qs, K, rescore=rs, prefilter=f), rix.bytes_per_vector - 8,
               note="the asymmetric score of every row" if f == 0 else
               f"the asymmetric score for the rows reaching a Hamming gate (about {f} * k * r rows)")
    # ITQ trained on the real texts the noisy database is made of (training on 100k would take minutes)
    qix = EmbeddingIndex.for_embedder(emb, precision="binary", keep_float16=True, rotation=rot)
    qix.add(db)
    record("postembed_fast EmbeddingIndex", "binary ITQ", lambda qs: qix.search(qs, K),
           qix.bytes_per_vector - 8 - 2 * dim, note="rotation trained on the 5,000 real texts")
    record("postembed_fast EmbeddingIndex", f"binary ITQ+asymmetric rescore x{rs} (float16)",
           lambda qs: qix.search(qs, K, rescore=rs), qix.bytes_per_vector - 8,
           note="rotation trained on the 5,000 real texts")
    rq = EmbeddingIndex.for_embedder(emb, precision="rabitq", keep_float16=True)
    rq.add(db)
    record("postembed_fast EmbeddingIndex", "rabitq", lambda qs: rq.search(qs, K), rq.bytes_per_vector - 8 - 2 * dim,
           note="centroid: the model's mean embedding (for_embedder); 8-bit queries")
    record("postembed_fast EmbeddingIndex", f"rabitq+rescore x{rs} (float16)", lambda qs: rq.search(qs, K, rescore=rs),
           rq.bytes_per_vector - 8, note="centroid: the model's mean embedding (for_embedder)")
    rqm = EmbeddingIndex(dim, precision="rabitq", centroid=db.mean(axis=0))
    rqm.add(db)
    record("postembed_fast EmbeddingIndex", "rabitq centroid=database mean", lambda qs: rqm.search(qs, K),
           rqm.bytes_per_vector - 8, note="centroid: the database's mean, as FAISS trains it")

    # Each lower build of our scans, on the same indexes in the same run (POSTEMBED_CPU_ISA's cap, set
    # around each call): what the AVX-512 build buys over AVX2 and baseline on this CPU.
    from postembed_fast.kernels import _ext, cpu_isa

    def capped(level, search):
        def run(qs):
            prev = _ext._C._set_cpu_isa_cap(cpu_isa.ISA_LEVELS.index(level))
            try:
                return search(qs)
            finally:
                _ext._C._set_cpu_isa_cap(prev)
        return run

    if _ext._C is not None:
        best = cpu_isa.scan_level()
        lower = cpu_isa.SCAN_LEVELS[: cpu_isa.SCAN_LEVELS.index(best)] if best in cpu_isa.SCAN_LEVELS else ()
        for level in reversed(lower):
            for prec, search, nbytes in (("binary", lambda qs: ours["binary"].search(qs, K), ours["binary"].bytes_per_vector - 8),
                                         ("int8", lambda qs: ours["int8"].search(qs, K), ours["int8"].bytes_per_vector - 8),
                                         ("rabitq", lambda qs: rq.search(qs, K), rq.bytes_per_vector - 8 - 2 * dim)):
                record(f"postembed_fast EmbeddingIndex [{level} build]", prec, capped(level, search), nbytes,
                       note=f"POSTEMBED_CPU_ISA={level}: the {level} build of the same scan")

    # the same scores at every rank as FAISS' binary flat index?
    checks = {}
    bcodes_db = quantize_embeddings(db, "binary")
    bcodes_q = quantize_embeddings(queries, "binary")
    try:
        if args.no_peers:
            raise ImportError("--no-peers")
        import faiss

        faiss.omp_set_num_threads(args.threads)
        fb = faiss.IndexBinaryFlat(8 * bcodes_db.shape[1])  # bits, a multiple of 8 (padding bits are 0 in every code)
        fb.add(bcodes_db.view(np.uint8))
        fb_search = lambda qs: fb.search(quantize_embeddings(qs, "binary").view(np.uint8), K)  # noqa: E731
        record("faiss IndexBinaryFlat", "binary", lambda qs: fb_search(qs), bcodes_db.shape[1])
        D, _ = fb.search(bcodes_q.view(np.uint8), K)
        s_ours, _ = ours["binary"].search(bcodes_q, K)
        checks["binary_same_scores_as_faiss_every_rank"] = bool(np.array_equal(8 * bcodes_q.shape[1] - D, s_ours))
        ff = faiss.IndexFlatIP(dim)
        ff.add(db)
        record("faiss IndexFlatIP", "float32", lambda qs: ff.search(qs, K), 4 * dim)
        fs = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        fs.train(db)
        fs.add(db)
        record("faiss IndexScalarQuantizer 8bit", "int8", lambda qs: fs.search(qs, K), dim)
        for label, make in faiss_rabitq_rows(faiss, dim):
            fx = make()
            fx.train(db)  # the centroid: the database's mean
            fx.add(db)
            refine = "Refine" in label
            record("faiss " + label.split(" ")[0], "rabitq " + " ".join(label.split(" ")[1:]),
                   lambda qs, fx=fx: fx.search(qs, K), (dim + 7) // 8 + 8 + (4 * dim if refine else 0),
                   note="centroid trained on the database")
    except ImportError as exc:
        checks["faiss"] = f"skipped: {exc}"
    try:
        if args.no_peers:
            raise ImportError("--no-peers")
        from usearch.index import Index

        for prec, metric, data, qconv in (("i8", "ip", db, lambda qs: qs),
                                           ("b1", "hamming", bcodes_db.view(np.uint8),
                                            lambda qs: quantize_embeddings(qs, "binary").view(np.uint8))):
            ui = Index(ndim=dim, metric=metric, dtype=prec)
            ui.add(np.arange(len(data)), data, threads=args.threads)

            def us(qs, ui=ui, qconv=qconv):
                m = ui.search(qconv(qs), K, exact=True, threads=args.threads)
                keys = np.asarray(m.keys).reshape(len(qs), -1).astype(np.int64)
                return None, keys

            record("usearch exact", {"i8": "int8", "b1": "binary"}[prec], us, dim if prec == "i8" else dim // 8)
    except ImportError as exc:
        checks["usearch"] = f"skipped: {exc}"

    tdb = torch.from_numpy(db)
    record("torch matmul + topk", "float32",
           lambda qs: tuple(t.numpy() for t in torch.topk(torch.from_numpy(qs) @ tdb.T, K, dim=1)), 4 * dim)

    def np_search(qs):
        s = qs @ db.T
        part = np.argpartition(-s, K, axis=1)[:, :K]
        o = np.argsort(-np.take_along_axis(s, part, 1), axis=1, kind="stable")
        return None, np.take_along_axis(part, o, 1)

    record("numpy matmul + argpartition", "float32", np_search, 4 * dim)

    # timing: rounds over all systems in turn (a busy neighbour hits every system alike), best round kept
    for rnd in range(args.rounds):
        for row, search in zip(results, searches):
            row["qps_batch1"] = max(row["qps_batch1"], qps(search, queries, 1, 1, args.singles))
            row["qps_batch256"] = max(row["qps_batch256"], qps(search, queries, 256, 1, args.singles))
    for row in results:
        print(f"{row['system']:32s} {row['precision']:8s} b1 {row['qps_batch1']:9.1f} q/s  b256 "
              f"{row['qps_batch256']:9.1f} q/s  recall {row['recall@10_vs_float32']:.4f}  {row['bytes_per_vector']} B/vec")

    by = {(r["system"], r["precision"]): r for r in results}
    tgt = {}
    ob, fb_ = by.get(("postembed_fast EmbeddingIndex", "binary")), by.get(("faiss IndexBinaryFlat", "binary"))
    if ob and fb_:
        tgt["binary_vs_faiss_binary_flat_batch256"] = ob["qps_batch256"] / fb_["qps_batch256"]
        tgt["binary_scan_build"] = cpu_isa.scan_level() if _ext._C is not None else "torch"
        for level in ("avx2", "baseline"):
            lb = by.get((f"postembed_fast EmbeddingIndex [{level} build]", "binary"))
            if lb:
                tgt[f"binary_{level}_build_vs_faiss_binary_flat_batch256"] = lb["qps_batch256"] / fb_["qps_batch256"]
    orq, frq = by.get(("postembed_fast EmbeddingIndex", "rabitq")), by.get(("faiss IndexRaBitQ", "rabitq qb=4"))
    if orq and frq:
        tgt["rabitq_vs_faiss_IndexRaBitQ_qb4_batch256"] = orq["qps_batch256"] / frq["qps_batch256"]
    frq8 = by.get(("faiss IndexRaBitQ", "rabitq qb=8"))
    if orq and frq8:
        tgt["rabitq_vs_faiss_IndexRaBitQ_qb8_batch256"] = orq["qps_batch256"] / frq8["qps_batch256"]
    ffs = by.get(("faiss IndexRaBitQFastScan", "rabitq qb=8"))
    if orq and ffs:
        tgt["rabitq_vs_faiss_IndexRaBitQFastScan_batch256"] = orq["qps_batch256"] / ffs["qps_batch256"]
    tgt["rabitq_recall@10 (real texts, no rescore)"] = real_recall["rabitq"]
    tgt["rabitq_recall@10 (real texts, centroid=database mean)"] = real_recall["rabitq centroid=database mean"]
    for qb in (4, 8):
        if isinstance(real_recall.get(f"faiss IndexRaBitQ qb={qb}"), float):
            tgt[f"faiss_IndexRaBitQ_qb{qb}_recall@10 (real texts)"] = real_recall[f"faiss IndexRaBitQ qb={qb}"]
    tgt[f"rabitq_rescore_x{rs}_recall@10 (real texts)"] = real_recall[f"rabitq + rescore x{rs}"]
    tgt["int8_recall@10 (real texts)"] = real_recall["int8"]
    tgt["int8_before_recall@10 (real texts)"] = real_recall["int8 before (centred codes)"]
    oi, ui8 = by.get(("postembed_fast EmbeddingIndex", "int8")), by.get(("usearch exact", "int8"))
    if oi and ui8:
        tgt["int8_vs_usearch_i8_batch256"] = oi["qps_batch256"] / ui8["qps_batch256"]
        tgt["int8_vs_usearch_i8_batch1"] = oi["qps_batch1"] / ui8["qps_batch1"]
    # the target is on real embeddings: the real texts of the quality section
    tgt[f"binary_rescored_recall@10 (asymmetric, top-{K * rs}, real texts)"] = \
        real_recall[f"binary + asymmetric rescore x{rs}"]
    tgt[f"binary_ITQ_rescored_recall@10 (asymmetric, top-{K * rs}, real texts, ITQ trained on the database)"] = \
        real_recall[f"binary ITQ + asymmetric rescore x{rs}"]
    tgt["binary_ITQ_rescored_recall@10 (held out: ITQ trained on the other half)"] = \
        held[f"ITQ trained on the other half: asymmetric rescore x{rs}"]
    # pre-filter target: rescore x4 costs <= 1.5x plain binary search() at batch 256, recall >= 0.968
    plain = by.get(("postembed_fast EmbeddingIndex", "binary"))
    tgt["hamming_prefilter_default"] = HAMMING_PREFILTER
    for f in PREFILTERS:
        row = by.get(("postembed_fast EmbeddingIndex", f"binary+asymmetric rescore x{rs} (float16), {prefilter_label(f)}"))
        if plain and row:
            key = prefilter_label(f)
            tgt[f"binary_rescore_x{rs}_cost_vs_plain_batch256 ({key})"] = plain["qps_batch256"] / row["qps_batch256"]
            tgt[f"binary_rescore_x{rs}_recall@10 (real texts, {key})"] = real_recall[
                f"binary + asymmetric rescore x{rs}, {key}"]
    print("targets:", tgt, checks)

    out = {"command": "python -m bench.search " + " ".join(sys.argv[1:] if argv is None else argv), "machine": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__, "model_tag": emb.model_tag,
           "cpu_avx2_build": bool(_ext._C is not None and _ext._C.cpu_avx2()), "cpu": cpu_description(),
           "faiss": _faiss_version(),
           "data": {"posts": int(len(q_real)), "n": args.n, "sigma_per_dim": args.sigma, "dim": dim,
                    "queries": "title embeddings of the posts", "k": K},
           "title_to_text_recall@10": quality, "recall@10_vs_float32_real_texts": real_recall,
           "itq": {"trained_on": f"the {len(d_real)} real text embeddings (the quality section's database; the speed "
                                 "database is noisy copies of them); titles never", "iterations": 50, "seed": 0,
                   "seconds": round(itq_seconds, 2), "held_out": held},
           "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg(), "timing": "best of --rounds rounds over all systems in turn; batch 1 = --singles queries one per call", "results": results, "targets": tgt, "checks": checks}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print("wrote", args.json)
    if args.plot:
        plot(out, args.plot)
    return out


def _faiss_version():
    try:
        import faiss

        return faiss.__version__
    except ImportError:
        return None


def plot(out: dict, png: str) -> None:
    """Queries/s (log) against recall@10 vs exact float32 of the speed database, batch 256 and batch 1,
    one point per system, marker size by bytes per vector."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["results"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 6), sharey=False)
    for ax, key, title in ((axes[0], "qps_batch256", "batch 256"), (axes[1], "qps_batch1", "batch 1")):
        for r in rows:
            ours = r["system"].startswith("postembed_fast")
            x, y = r["recall@10_vs_float32"], r[key]
            ax.scatter(x, y, s=20 + r["bytes_per_vector"] / 8, marker="o" if ours else "s",
                       color="tab:red" if ours else "tab:gray", alpha=0.8)
            label = r["precision"] if ours else f"{r['system']} {r['precision']}"
            ax.annotate(label.replace("(float16)", "").strip(), (x, y), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel("recall@10 vs exact float32 (noisy database)")
        ax.set_ylabel("queries/s")
        ax.set_title(f"{title}, k = {out['data']['k']}, N = {out['data']['n']:,}, dim {out['data']['dim']}, "
                     f"{out['threads']} threads")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("Exact top-k: postembed_fast EmbeddingIndex (red) vs FAISS, usearch, torch, numpy (grey); "
                 "marker area ~ bytes/vector")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    print("wrote", png)


if __name__ == "__main__":
    main()
