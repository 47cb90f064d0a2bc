"""Benchmark harness for postembed_fast: `python -m bench` (see bench/PERFORMANCE.md).

Modules: corpus (posts in), systems (the three embedders behind one interface),
measure (clocks, latency, peak RSS, machine), roofline, retrieval (recall@10 of
compressed outputs), batch_tokens (sweep), memory (embed_iter in fresh
subprocesses), report (table, PASS/FAIL, plot), run (the CLI).
Micro-benchmarks: `python -m pytest bench/bench_ops.py --benchmark-only`.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
