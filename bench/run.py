"""`python -m bench`: every system on the same device, model and texts, in one run.

Sizes (full / --quick): throughput on 1,000 / 32 posts (median of 3 timed calls after a
warm-up), latency over 200 / 10 requests of 1 and of 8 posts, retrieval over 5,000 / 200
posts, batch_tokens sweep on 300 / 32 posts. The embed_iter memory check (1,000 vs 50,000
posts in fresh processes) is its own mode: `python -m bench --memory`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

FULL = dict(posts=1000, host_rounds=3, repeats=3, requests=200, retrieval_posts=5000, calib_posts=1000, sweep_posts=300,
            sweep_repeats=1, sweep_values=(1024, 2048, 4096, 8192, 16384), memory_sizes=(1000, 50000),
            warmup_posts=64, warmup_requests=5)
QUICK = dict(posts=32, host_rounds=2, repeats=3, requests=10, retrieval_posts=200, calib_posts=100, sweep_posts=32,
             sweep_repeats=1, sweep_values=(1024, 4096, 16384), memory_sizes=(200, 2000),
             warmup_posts=16, warmup_requests=2)


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=None, help="JSONL(.gz) with a text field (and title, for retrieval), "
                    "or plain text, one post per line (default: tests/data/posts.jsonl.gz)")
    ap.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    ap.add_argument("--quick", action="store_true", help="small sizes, finishes in about a minute on 2 CPU cores")
    ap.add_argument("--memory", action="store_true", help="only the embed_iter memory check (fresh processes)")
    ap.add_argument("--json", default=None, metavar="PATH", help="write every number here")
    ap.add_argument("--plot", default=None, metavar="PATH", help="PNG: throughput against batch_tokens")
    for k in ("posts", "repeats", "requests", "retrieval_posts", "calib_posts", "sweep_posts"):
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=None, help=f"override {k}")
    ap.add_argument("--memory-sizes", default=None, help="e.g. 1000,50000")
    ap.add_argument("--no-sweep", action="store_true", help="skip the batch_tokens sweep (and the plot)")
    ap.add_argument("--cpu-peers", action="store_true", help="CPU only: also the row group of `python -m bench.cpu_peers` "
                    "(sentence-transformers bf16/ONNX/OpenVINO, postembed_fast float32/bf16/default; interleaved rounds) "
                    "on the same posts; the ONNX/OpenVINO peers need the [peers] extra")
    a = ap.parse_args(argv)
    cfg = dict(QUICK if a.quick else FULL)
    for k in ("posts", "repeats", "requests", "retrieval_posts", "calib_posts", "sweep_posts"):
        if getattr(a, k) is not None:
            cfg[k] = getattr(a, k)
    if a.memory_sizes:
        cfg["memory_sizes"] = tuple(int(s) for s in a.memory_sizes.split(","))
    cfg["repeats"] = max(cfg["repeats"], 1)
    return a, cfg


def cosines(a, b):
    import numpy as np

    a, b = a.astype(np.float64), b.astype(np.float64)
    c = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return dict(cos_min=float(c.min()), cos_mean=float(c.mean()))


def main(argv=None):
    a, cfg = parse(argv)
    t_start = time.perf_counter()
    import numpy as np
    import torch

    from postembed_fast import Embedder, quantize_embeddings
    from postembed_fast.embedder import DEFAULT_BATCH_TOKENS, resolve_device

    from bench import measure, model_only, report, retrieval, roofline
    from bench.corpus import DEFAULT_CORPUS, load_posts, take
    from bench.systems import HF_BATCH, HFMeanPool, Postembed, SentenceTransformers

    device = resolve_device(a.device)
    gpu = device.type == "cuda"
    corpus = a.corpus or DEFAULT_CORPUS
    results = dict(command="python -m bench " + " ".join(sys.argv[1:]), quick=a.quick, config=cfg,
                   corpus=str(corpus), machine=measure.machine(device))
    print(report.header(results))

    if a.memory:
        from bench import memory

        results["memory"] = memory.run(cfg["memory_sizes"], a.corpus, device)
        report.targets(results)
        return report.save(results, a.json)

    posts = load_posts(corpus)
    texts_all = [p["text"] for p in posts]
    texts = take(texts_all, cfg["posts"])
    e = Embedder(device=device)  # default dtype: float32 on CPU, float16 on CUDA
    n_tokens = sum(map(len, e.tokenize(texts)))
    mean_len = n_tokens / len(texts)
    results["corpus_stats"] = dict(posts_in_corpus=len(posts), throughput_posts=len(texts), tokens=n_tokens,
                                   mean_tokens_per_post=mean_len, max_seq_length=e.max_seq_length)
    print(f"corpus: {len(posts)} posts; throughput on {len(texts)} posts, {mean_len:.1f} tokens/post "
          f"(tokenizer of the model, truncated at {e.max_seq_length})")

    # --- the device's ceiling and the roofline -------------------------------------------
    def measure_ceilings():
        c = {"float32": measure.gemm_ceiling(device, torch.float32)}
        if gpu:
            for dt in (torch.float16, torch.bfloat16):
                c[str(dt).replace("torch.", "")] = measure.gemm_ceiling(device, dt, n=8192)
        return c

    ceilings = measure_ceilings()  # measured again after the systems; the higher counts
    bt = DEFAULT_BATCH_TOKENS[device.type]
    roof = roofline.per_token(e.encoder.config, mean_len, roofline.weight_bytes(e.encoder), bt,
                              act_bytes=e.encoder.word.element_size())
    results["roofline"] = dict(per_token=roof, ceiling_flops=dict(ceilings),
                               ceiling_from="torch.mm 2048^3 (fp32; 8192^3 for fp16/bf16 on GPU), best of 5, "
                                            "before and after the systems, the higher")
    print(report.roofline_text(results["roofline"]))

    # --- int8 ranges: shipped, else calibrated on posts outside the retrieval set ----------
    n_ret = min(cfg["retrieval_posts"], sum(1 for p in posts if p["title"]))
    ranges_src = "shipped (postembed_fast/data)"
    if e.quantization_ranges is None:
        calib = texts_all[n_ret:n_ret + cfg["calib_posts"]]
        ranges_src = f"calibrated on {len(calib)} posts disjoint from the retrieval set"
        if len(calib) < 2:
            calib, ranges_src = texts_all[:cfg["calib_posts"]], "calibrated ON the retrieval set (corpus too small)"
        e.calibrate(calib)
    ranges = e.quantization_ranges
    results["int8_ranges"] = ranges_src

    # --- systems ---------------------------------------------------------------------------
    systems = []
    if gpu:
        systems += [Postembed(Embedder(device=device, dtype=dt)) for dt in ("float32", "bfloat16")]
    systems += [Postembed(e), Postembed(e, "int8"), Postembed(e, "binary")]  # int8/binary: e's ranges
    st = SentenceTransformers(device)
    systems += [st] + ([SentenceTransformers(device, torch.float16)] if gpu else [])
    systems += [HFMeanPool(device)] + ([HFMeanPool(device, torch.float16)] if gpu else [])

    rows, outputs = [], {}
    for s in sorted(systems, key=lambda s: s is not st):  # sentence-transformers first: the reference
        print(f"{s.name}: throughput ...", flush=True)
        tp, out = measure.throughput(s, texts, n_tokens, device, cfg["repeats"], texts[:cfg["warmup_posts"]])
        row = dict(system=s.name, dtype=s.dtype, **tp)
        outputs[s.name] = out
        if s.is_float:
            row.update(cosines(out, outputs[st.name]))
            for b in (1, 8):
                print(f"{s.name}: latency, batch of {b} ...", flush=True)
                row[f"latency_{b}"] = measure.latency(s, texts, b, cfg["requests"], device,
                                                     cfg["warmup_requests"])
        row["ratio_to_st"] = row["posts_per_s"] / rows[0]["posts_per_s"] if rows else 1.0
        row["flops_per_s"] = row["tokens_per_s"] * roof["flops"]
        rows.append(row)
    results["systems"] = rows
    after = measure_ceilings()
    results["roofline"]["ceiling_before_after"] = dict(before=ceilings, after=after)
    ceilings = {k: max(v, after[k]) for k, v in ceilings.items()}
    results["roofline"]["ceiling_flops"] = ceilings
    for row in rows:
        row["fraction_of_ceiling"] = row["flops_per_s"] / ceilings.get(row["dtype"], ceilings["float32"])

    if a.cpu_peers:  # the CPU peer row group (bench/cpu_peers.py), same posts, its own interleaved rounds
        if gpu:
            results["cpu_peers"] = {"skipped": "--cpu-peers measures CPU peers; this run is on " + str(device)}
        else:
            from bench import cpu_peers

            print("CPU peers (bench.cpu_peers) ...", flush=True)
            results["cpu_peers"] = cpu_peers.run(texts, threads=torch.get_num_threads(), rounds=cfg["repeats"],
                                                 warmup_posts=cfg["warmup_posts"], latency_requests=cfg["requests"],
                                                 corpus=corpus, command=results["command"])
            print(cpu_peers.table(results["cpu_peers"]))

    print("postembed_fast: model-only (encoder forward on packed batches) ...", flush=True)
    results["model_only"] = model_only.measure(e, texts, device, cfg["repeats"])
    print(f"  {results['model_only']['tokens_per_s']:,.0f} tokens/s ({results['model_only']['dtype']})")

    # --- the host side of embed() (encoder swapped for a no-op), on posts not tokenized yet ----
    from bench import host_pipeline

    unseen = texts_all[cfg["posts"]:]
    per_round = min(2000, len(unseen) // (4 * cfg["host_rounds"] + 1))
    if per_round >= 8:
        print(f"host side of embed(): {cfg['host_rounds']} fresh rounds of {per_round} posts ...", flush=True)
        results["host_pipeline"] = host_pipeline.measure(unseen, device, cfg["host_rounds"], per_round)
        print(host_pipeline.report(results["host_pipeline"]))
    else:
        results["host_pipeline"] = dict(skipped=f"only {len(unseen)} posts beyond the throughput set")

    # --- quantized outputs: derive from float32 only if that equals embed(precision=...) -----
    f32 = outputs[Postembed(e).name]
    same = {p: bool(np.array_equal(quantize_embeddings(f32, p, ranges if p == "int8" else None),
                                   outputs[Postembed(e, p).name])) for p in ("int8", "binary")}
    results["quantize_matches_embed"] = same

    # --- retrieval ---------------------------------------------------------------------------
    if n_ret >= 2:
        ret = [p for p in posts if p["title"]][:n_ret]
        titles, docs = [p["title"] for p in ret], [p["text"] for p in ret]
        print(f"retrieval: {n_ret} titles -> texts ...", flush=True)
        q = {"float32": e.embed(titles)}
        d = {"float32": e.embed(docs)}
        for p in ("int8", "binary"):
            if same[p]:
                q[p] = quantize_embeddings(q["float32"], p, ranges if p == "int8" else None)
                d[p] = quantize_embeddings(d["float32"], p, ranges if p == "int8" else None)
            else:
                q[p], d[p] = e.embed(titles, precision=p), e.embed(docs, precision=p)
        results["retrieval"] = dict(posts=n_ret, k=10, **retrieval.evaluate(q, d, ranges),
                                    codes="quantize_embeddings(float32)" if all(same.values()) else
                                    "e.embed(precision=...) where quantizing float32 differs",
                                    scoring=retrieval.__doc__.strip())
    else:
        results["retrieval"] = dict(posts=0, skipped="the corpus has no titles")

    # --- batch_tokens sweep (the plot) --------------------------------------------------------
    if not a.no_sweep:
        from bench.batch_tokens import sweep

        sw_texts = texts[:cfg["sweep_posts"]]
        sw_tokens = sum(map(len, e.tokenize(sw_texts)))
        values = cfg["sweep_values"] if not gpu else (4096, 16384, 65536, 131072)
        print(f"batch_tokens sweep on {len(sw_texts)} posts ({cfg['sweep_repeats']} timed call each):")
        results["batch_tokens_sweep"] = dict(posts=len(sw_texts), dtype=str(e.dtype).replace("torch.", ""),
                                             rows=sweep(e, sw_texts, sw_tokens, values, cfg["sweep_repeats"], device,
                                                        warmup_posts=cfg["warmup_posts"]))
        results["baseline_effective_batch_tokens"] = HF_BATCH * mean_len
    results["wall_s"] = time.perf_counter() - t_start
    print(report.table(results))
    report.targets(results)
    if a.plot and "batch_tokens_sweep" in results:
        report.plot(results, a.plot)
        print(f"plot: {a.plot}")
    report.save(results, a.json)
