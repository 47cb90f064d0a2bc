"""`python -m bench.cpu_peers`: postembed_fast against the CPU peers a user would pick, in one process.

Peers: sentence-transformers (torch float32, torch bfloat16 via model_kwargs={"torch_dtype": torch.bfloat16},
ONNX Runtime as exported, ONNX O3, ONNX dynamic int8 with the preset for this CPU, OpenVINO) and
postembed_fast (float32, bfloat16, and the default dtype=None). Every system gets the same posts and
thread count; after one warm-up call each, the timed rounds are interleaved (round r runs every
system once) and each system's posts/s is the median over rounds. Cosines are against
sentence-transformers float32 on the same posts. The bf16 and fp32 GEMM ceilings are measured on the
spot (torch.matmul at the encoder's linear shapes, before and after the systems, the higher), and each
system's share of its compute dtype's ceiling counts only the encoder's GEMM FLOPs of real tokens.

    python -m bench.cpu_peers --json bench/results/cpu-<kind>-cpu-peers.json     # 800 posts, 3 rounds
    python -m bench.cpu_peers --posts 32 --rounds 1 --systems st_fp32,pf_fp32    # a quick look

The ONNX and OpenVINO peers run inside sentence-transformers' own encode() (its tokenizer, batches of
32, pooling and normalization), with the transformer forward on ONNX Runtime / OpenVINO. Where
optimum (sentence-transformers' `backend="onnx"` / `"openvino"` dependency) imports, the peers are
built through that API: `backend="onnx"`, `export_optimized_onnx_model(model, "O3", ...)`,
`export_dynamic_quantized_onnx_model(model, preset, ...)`, `backend="openvino"`. Where it does not
(optimum-onnx and optimum-intel require transformers < 4.58 / < 5.6), the same graphs are made here
from the local model folder: torch.onnx.export of the Hugging Face model (eager attention, as optimum
exports), ONNX Runtime's transformer optimizer at optimum's O3 settings, ONNX Runtime's dynamic
quantizer with optimum's preset arguments, and OpenVINO reading that ONNX file. Exports go to a cache
folder keyed by the weights' hash; nothing downloads. A peer whose packages are missing is reported
as "unavailable: <reason>", never a crash.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# id -> display name, in table order. st_* peers are sentence-transformers' encode(); pf_* postembed_fast.
SYSTEMS = {
    "st_fp32": "sentence-transformers torch float32",
    "st_bf16": 'sentence-transformers torch bfloat16 (model_kwargs={"torch_dtype": torch.bfloat16})',
    "st_onnx": 'sentence-transformers backend="onnx"',
    "st_onnx_o3": "sentence-transformers ONNX O3",
    "st_onnx_int8": "sentence-transformers ONNX dynamic int8",
    "st_openvino": 'sentence-transformers backend="openvino"',
    "pf_fp32": "postembed_fast dtype=torch.float32",
    "pf_bf16": "postembed_fast dtype=torch.bfloat16",
    "pf_default": "postembed_fast default (dtype=None)",
}
REFERENCE = "st_fp32"
LATENCY_SYSTEMS = ("st_fp32", "st_bf16", "pf_default")  # single-post p50: the issue compares default vs ST bf16
ST_BATCH = 32  # sentence-transformers' default batch_size
EQUAL_QUALITY_COS = 0.999  # a peer counts as equal quality at min cosine >= this vs ST fp32 (issue 20)
# Issue 20's targets for the default (dtype=None) against the fastest peer, per CPU kind.
DEFAULT_TARGET = {"amx": 1.5, "avx512-bf16": 1.2, "avx512": 1.2, "avx2": 1.2, "baseline": 1.2}
FP32_TARGET_SPEEDUP, FP32_TARGET_COS = 1.4, 0.99999
BF16_TARGET_COS_MIN, BF16_TARGET_COS_MEAN = 0.9995, 0.99995
GEMM_TOKENS = 4096  # rows of the ceiling GEMMs: postembed_fast's CPU batch (ST's padded batches of 32 are similar)


class Unavailable(Exception):
    """A peer that cannot run here (package missing, export failed): reported, never fatal."""


# --- the CPU -------------------------------------------------------------------------------------

def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


def cpu_kind(flags) -> str:
    """The CPU kinds issue 20 states targets for, from /proc/cpuinfo flags (used in result file names)."""
    f = set(flags)
    if "amx_bf16" in f:
        return "amx"
    if "avx512_bf16" in f:
        return "avx512-bf16"
    if "avx512f" in f:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= f else "baseline"


def int8_preset(flags) -> str:
    """sentence-transformers' export_dynamic_quantized_onnx_model preset for this CPU."""
    f = set(flags)
    if "avx512_vnni" in f:
        return "avx512_vnni"
    if "avx512f" in f:
        return "avx512"
    return "avx2" if "avx2" in f else "arm64"


def machine_info(flags) -> dict:
    from bench import measure

    m = measure.machine("cpu")
    m["cpu_flags"] = " ".join(flags)
    m["cpu_kind"] = cpu_kind(flags)
    m["omp_num_threads_env"] = os.environ.get("OMP_NUM_THREADS")
    for pkg in ("onnxruntime", "onnx", "openvino", "optimum", "optimum-onnx", "optimum-intel"):
        m["versions"][pkg] = _version(pkg)
    try:
        import postembed_fast

        m["postembed_fast_cpu"] = postembed_fast.info().get("cpu", "not in info(): this build predates info()['cpu']")
    except Exception as exc:  # info() is someone else's code: never let it sink the run
        m["postembed_fast_cpu"] = f"info() failed: {exc}"
    return m


def _version(pkg):
    import importlib.metadata as md

    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def load_avg() -> dict:
    one, five, fifteen = os.getloadavg()
    return {"1min": one, "5min": five, "15min": fifteen, "at_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# --- GEMM ceilings at the encoder's shapes -------------------------------------------------------

def encoder_gemms(hidden: int, intermediate: int, tokens: int = GEMM_TOKENS) -> dict:
    """One layer's linears as (M, K, N): fused QKV, attention output, FFN up, FFN down."""
    return {"qkv": (tokens, hidden, 3 * hidden), "attn_out": (tokens, hidden, hidden),
            "ffn_up": (tokens, hidden, intermediate), "ffn_down": (tokens, intermediate, hidden)}


def gemm_ceiling(shapes: dict, dtype, repeats: int = 5) -> dict:
    """FLOP/s of torch.matmul(x [M, K], W.t()) (nn.Linear's layout) per shape, best of `repeats` after a
    warm-up (best, not median: on a shared machine the median measures the neighbours), and over one
    layer's mix (total FLOPs / summed best times)."""
    import torch

    per, flops, secs = {}, 0.0, 0.0
    for name, (m, k, n) in shapes.items():
        x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        torch.matmul(x, w.t())
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            torch.matmul(x, w.t())
            best = min(best, time.perf_counter() - t)
        per[name] = 2 * m * k * n / best
        flops, secs = flops + 2 * m * k * n, secs + best
    return {"layer_mix": flops / secs, "per_shape": per}


def gemm_flops_per_token(cfg) -> int:
    """Linear FLOPs per real token of a BERT encoder: 2 x (4 h^2 + 2 h i) per layer (attention's
    L-dependent matmuls left out: the ceiling GEMMs are the linears)."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    return cfg["num_hidden_layers"] * 2 * (4 * h * h + 2 * h * i)


# --- exports (made from the local model folder, cached) -------------------------------------------

class Exports:
    """ONNX files for the peers, made once per weights hash and onnxruntime version under `cache`."""

    def __init__(self, folder: Path, cache: Path, threads: int):
        from postembed_fast.loading import model_tag

        self.folder, self.threads = folder, threads
        self.dir = Path(cache) / f"{model_tag(folder, False)}-ort{_version('onnxruntime')}"

    def onnx(self) -> Path:
        """torch.onnx.export of the Hugging Face model, as optimum exports it: eager attention, opset 18,
        dynamic batch and sequence axes, last_hidden_state out."""
        out = self.dir / "model.onnx"
        if out.exists():
            return out
        _need("onnx", "onnxruntime")
        import torch
        from transformers import AutoModel

        m = AutoModel.from_pretrained(str(self.folder), local_files_only=True, attn_implementation="eager").eval()

        class LastHidden(torch.nn.Module):  # keyword call: transformers 5 takes no positional mask
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.m(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

        names = ["input_ids", "attention_mask", "token_type_ids"]
        ids = torch.randint(1000, 2000, (2, 16))
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp.onnx")
        with torch.no_grad():
            torch.onnx.export(LastHidden(m), (ids, mask, torch.zeros_like(ids)), str(tmp), input_names=names,
                              output_names=["last_hidden_state"], opset_version=18, dynamo=False,
                              dynamic_axes={k: {0: "batch_size", 1: "sequence_length"}
                                            for k in names + ["last_hidden_state"]})
        tmp.rename(out)
        return out

    def onnx_o3(self) -> Path:
        """optimum's O3 on CPU: ORT transformer optimizer, opt_level 2, BERT fusions, GELU approximation."""
        out = self.dir / "model_O3.onnx"
        if out.exists():
            return out
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model

        cfg = json.loads((self.folder / "config.json").read_text())
        opts = FusionOptions("bert")
        opts.enable_gelu_approximation = True
        opt = optimize_model(str(self.onnx()), model_type="bert", num_heads=cfg["num_attention_heads"],
                             hidden_size=cfg["hidden_size"], opt_level=2, optimization_options=opts, use_gpu=False)
        opt.save_model_to_file(str(out))
        return out

    def onnx_int8(self, preset: str) -> Path:
        """optimum's AutoQuantizationConfig.<preset>(is_static=False) applied by ORT's dynamic quantizer to
        the plain export (as export_dynamic_quantized_onnx_model does): IntegerOps, per-channel, u8
        activations, symmetric weights (u8 for avx2/avx512, s8 for avx512_vnni/arm64), full range."""
        out = self.dir / f"model_int8_{preset}.onnx"
        if out.exists():
            return out
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.registry import IntegerOpsRegistry

        weights = QuantType.QInt8 if preset in ("avx512_vnni", "arm64") else QuantType.QUInt8
        quantize_dynamic(str(self.onnx()), str(out), op_types_to_quantize=list(IntegerOpsRegistry), per_channel=True,
                         reduce_range=False, weight_type=weights,
                         extra_options={"WeightSymmetric": True, "ActivationSymmetric": False,
                                        "EnableSubgraph": False, "ForceSymmetric": False})
        return out


def _need(*modules):
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise Unavailable(f"{', '.join(missing)} not installed (pip install -e '.[peers]')")


def _optimum_reason() -> str | None:
    """None where sentence-transformers' ONNX/OpenVINO API can run (optimum imports), else why not."""
    try:
        import optimum.onnxruntime  # noqa: F401
    except Exception as exc:  # ImportError, or an optimum built for another transformers
        return f"{type(exc).__name__}: {exc}"
    return None


# --- runners: the transformer forward of sentence-transformers' pipeline on another engine ---------

def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in s.get_inputs()]

    def run(feeds):
        return s.run(None, {k: v for k, v in feeds.items() if k in names})[0]

    return run, {"engine": "onnxruntime", "intra_op_num_threads": threads, "inter_op_num_threads": 1,
                 "graph_optimization_level": "ORT_ENABLE_ALL (default)"}


def openvino_compiled(path: Path, threads: int, precision: str | None):
    """OpenVINO CPU plugin over the ONNX export; PERFORMANCE_HINT LATENCY as optimum-intel sets it.
    precision None keeps OpenVINO's default inference precision (bf16 on AMX / AVX512-BF16 CPUs)."""
    _need("openvino")
    import numpy as np
    import openvino as ov

    core = ov.Core()
    cfg = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if precision:
        cfg["INFERENCE_PRECISION_HINT"] = precision
    compiled = core.compile_model(core.read_model(str(path)), "CPU", cfg)
    request = compiled.create_infer_request()
    names = {p.get_any_name() for p in compiled.inputs}

    def run(feeds):
        out = request.infer({k: v for k, v in feeds.items() if k in names})
        return np.array(out[compiled.output(0)], copy=True)

    info = {"engine": f"openvino {ov.__version__}", "config": {k: str(v) for k, v in cfg.items()},
            "inference_precision": ov_precision(compiled),
            "inference_num_threads": int(compiled.get_property("INFERENCE_NUM_THREADS"))}
    return run, info


def ov_precision(compiled) -> str:
    """The inference precision a compiled OpenVINO model resolved to, as a dtype name (float32, bfloat16)."""
    try:
        p = compiled.get_property("INFERENCE_PRECISION_HINT")
        name = p.to_string() if hasattr(p, "to_string") else str(p)
    except Exception as exc:  # a property this OpenVINO does not report
        return f"unknown ({exc})"
    return {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}.get(name, name)


def _engine_module(run, config):
    """A torch module standing where sentence-transformers' Transformer keeps the Hugging Face model:
    the same keyword inputs, {"last_hidden_state"} out, computed by `run` (ONNX Runtime / OpenVINO)."""
    import numpy as np
    import torch

    class EngineModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = config

        def forward(self, input_ids, attention_mask, token_type_ids=None, **_):
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            out = run({k: np.ascontiguousarray(v.cpu().numpy(), dtype=np.int64) for k, v in feeds.items()})
            return {"last_hidden_state": torch.from_numpy(out).float()}

    return EngineModel()


# --- systems ----------------------------------------------------------------------------------------

class STPeer:
    """sentence-transformers encode() with its defaults (batch 32, length-sorted inside encode)."""

    def __init__(self, model, compute_dtype: str, via: str, details: dict | None = None):
        self.m, self.compute_dtype, self.via, self.details = model, compute_dtype, via, details or {}

    def embed(self, texts):
        import numpy as np

        out = self.m.encode(texts, batch_size=ST_BATCH, convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)


class PostembedPeer:
    def __init__(self, embedder, via: str):
        self.e, self.via, self.details = embedder, via, {}
        self.compute_dtype = str(embedder.dtype).replace("torch.", "")

    def embed(self, texts):
        return self.e.embed(texts)


def _st(folder, **kw):
    _need("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu", **kw)


def _st_engine(folder, run, details, via):
    st = _st(folder)
    st[0].model = _engine_module(run, st[0].model.config)  # replaces the torch model (its weights freed)
    return STPeer(st, details.get("compute_dtype", "float32"), via, details)


def build(sid: str, ctx) -> object:
    """One system by id, or Unavailable(reason)."""
    import torch

    folder, threads = ctx["folder"], ctx["threads"]
    direct = "sentence-transformers encode() with its Transformer's model swapped for {} over a graph made here " \
             "({}); sentence-transformers' own backend needs optimum: " + str(ctx["optimum_reason"])
    if sid == "st_fp32":
        return STPeer(_st(folder), "float32", "SentenceTransformer(folder)")
    if sid == "st_bf16":
        return STPeer(_st(folder, model_kwargs={"torch_dtype": torch.bfloat16}), "bfloat16",
                      'SentenceTransformer(folder, model_kwargs={"torch_dtype": torch.bfloat16})')
    if sid.startswith("pf_"):
        from postembed_fast import Embedder

        dtype = {"pf_fp32": torch.float32, "pf_bf16": torch.bfloat16, "pf_default": None}[sid]
        p = PostembedPeer(Embedder(device="cpu", dtype=dtype), f"Embedder(device='cpu', dtype={dtype})")
        if sid == "pf_default":
            p.details["resolved_dtype"] = p.compute_dtype
        return p
    if ctx["optimum_reason"] is None:
        return build_via_sentence_transformers_api(sid, ctx)
    ex = ctx["exports"]
    if sid == "st_onnx":
        run, d = ort_session(ex.onnx(), threads)
        return _st_engine(folder, run, d, direct.format("an ONNX Runtime session", "torch.onnx.export, eager, opset 18"))
    if sid == "st_onnx_o3":
        run, d = ort_session(ex.onnx_o3(), threads)
        return _st_engine(folder, run, d, direct.format("an ONNX Runtime session",
                                                        "ORT optimizer at optimum's O3: opt_level 2, BERT fusions, "
                                                        "GELU approximation"))
    if sid == "st_onnx_int8":
        preset = ctx["int8_preset"]
        run, d = ort_session(ex.onnx_int8(preset), threads)
        d.update(preset=preset, compute_dtype="int8")
        return _st_engine(folder, run, d, direct.format("an ONNX Runtime session",
                                                        f"ORT quantize_dynamic with optimum's {preset} preset"))
    if sid == "st_openvino":
        run, d = openvino_compiled(ex.onnx(), threads, ctx["openvino_precision"])
        d["compute_dtype"] = d["inference_precision"]
        return _st_engine(folder, run, d, direct.format("an OpenVINO CPU compiled model", "the ONNX export read by "
                                                                                        "OpenVINO"))
    raise ValueError(f"unknown system {sid!r}; valid: {', '.join(SYSTEMS)}")


def build_via_sentence_transformers_api(sid: str, ctx):
    """The peers exactly as a user makes them, where optimum imports (not the case with transformers 5.x)."""
    import onnxruntime as ort
    from sentence_transformers import (SentenceTransformer, export_dynamic_quantized_onnx_model,
                                       export_optimized_onnx_model)

    folder, threads, saved = str(ctx["folder"]), ctx["threads"], ctx["exports"].dir / "st-onnx"
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    kw = {"session_options": so, "provider": "CPUExecutionProvider"}
    if sid == "st_openvino":
        ov_cfg = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        if ctx["openvino_precision"]:
            ov_cfg["INFERENCE_PRECISION_HINT"] = ctx["openvino_precision"]
        m = SentenceTransformer(folder, device="cpu", backend="openvino", model_kwargs={"ov_config": ov_cfg})
        req = getattr(m[0].model, "request", None)  # optimum-intel's OVModel: an InferRequest or a CompiledModel
        prec = ov_precision(req.get_compiled_model() if hasattr(req, "get_compiled_model") else req)
        return STPeer(m, prec, 'backend="openvino"',
                      {"ov_config": {k: str(v) for k, v in ov_cfg.items()}, "inference_precision": prec})
    if not (saved / "onnx" / "model.onnx").exists():
        SentenceTransformer(folder, device="cpu", backend="onnx", model_kwargs=kw).save(str(saved))
    base = SentenceTransformer(str(saved), device="cpu", backend="onnx", model_kwargs=kw)
    if sid == "st_onnx":
        return STPeer(base, "float32", 'backend="onnx"', {"intra_op_num_threads": threads})
    if sid == "st_onnx_o3":
        if not (saved / "onnx" / "model_O3.onnx").exists():
            export_optimized_onnx_model(base, "O3", str(saved))
        return STPeer(SentenceTransformer(str(saved), device="cpu", backend="onnx",
                                          model_kwargs={**kw, "file_name": "onnx/model_O3.onnx"}),
                      "float32", 'export_optimized_onnx_model(model, "O3")', {"intra_op_num_threads": threads})
    preset = ctx["int8_preset"]
    files = sorted((saved / "onnx").glob(f"model_*_{preset}.onnx"))
    if not files:
        export_dynamic_quantized_onnx_model(base, preset, str(saved))
        files = sorted((saved / "onnx").glob(f"model_*_{preset}.onnx"))
    return STPeer(SentenceTransformer(str(saved), device="cpu", backend="onnx",
                                      model_kwargs={**kw, "file_name": f"onnx/{files[0].name}"}),
                  "int8", f'export_dynamic_quantized_onnx_model(model, "{preset}")', {"preset": preset})


# --- measuring ----------------------------------------------------------------------------------

def interleaved(peers: dict, texts, rounds: int, warmup_texts) -> tuple[dict, dict]:
    """One warm-up call each, then `rounds` rounds, each timing every system once on all `texts`.
    -> ({id: [seconds per round]}, {id: output of the last round})."""
    for sid, p in peers.items():
        print(f"  warm-up {sid} ...", flush=True)
        p.embed(warmup_texts)
    secs, outs = {sid: [] for sid in peers}, {}
    for r in range(rounds):
        for sid, p in peers.items():
            t = time.perf_counter()
            outs[sid] = p.embed(texts)
            secs[sid].append(time.perf_counter() - t)
            print(f"  round {r + 1}/{rounds} {sid}: {len(texts) / secs[sid][-1]:.1f} posts/s", flush=True)
    return secs, outs


def single_post_latency(peers: dict, texts, requests: int, warmup: int = 5) -> dict:
    """p50/p99 ms of embed([one post]), the systems taking turns request by request."""
    import numpy as np

    ms = {sid: [] for sid in peers}
    for i in range(requests + warmup):
        for sid, p in peers.items():
            t = time.perf_counter()
            p.embed([texts[i % len(texts)]])
            if i >= warmup:
                ms[sid].append((time.perf_counter() - t) * 1e3)
    return {sid: {"requests": requests, "p50_ms": float(np.percentile(v, 50)), "p99_ms": float(np.percentile(v, 99))}
            for sid, v in ms.items()}


def cosines(a, ref) -> dict:
    import numpy as np

    a, ref = a.astype(np.float64), ref.astype(np.float64)
    c = (a * ref).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(ref, axis=1))
    return {"cos_min": float(c.min()), "cos_mean": float(c.mean())}


def targets(rows: dict, latency: dict, kind: str) -> list[dict]:
    """Issue 20's targets for this CPU kind; a target whose systems did not run says so."""
    ok = {sid: r for sid, r in rows.items() if r.get("status") == "ok"}
    out = []

    def add(name, value, threshold, passed, note=""):
        out.append({"target": name, "value": value, "threshold": threshold,
                    "result": "PASS" if passed else "FAIL", "note": note})

    def skip(name, why):
        out.append({"target": name, "result": "not evaluated", "note": why})

    if kind in ("amx", "avx512-bf16"):
        pool = [s for s in ("st_fp32", "st_bf16", "st_onnx", "st_onnx_o3", "st_onnx_int8", "st_openvino")
                if s in ok and ok[s]["cos_min"] >= EQUAL_QUALITY_COS]
        label = f"fastest equal-quality peer (min cos >= {EQUAL_QUALITY_COS})"
    else:
        pool = [s for s in ("st_fp32", "st_onnx", "st_onnx_o3", "st_openvino")
                if s in ok and (s != "st_openvino" or ok[s]["compute_dtype"] == "float32")]
        label = "fastest of ST float32, ONNX, ONNX O3, OpenVINO float32"
    need = DEFAULT_TARGET[kind]
    if "pf_default" in ok and pool:
        best = max(pool, key=lambda s: ok[s]["posts_per_s"])
        ratio = ok["pf_default"]["posts_per_s"] / ok[best]["posts_per_s"]
        missing = [s for s in ("st_onnx", "st_onnx_o3", "st_openvino") if s not in ok]
        add(f"default x {label}", ratio, need, ratio >= need,
            f"fastest: {best} ({ok[best]['posts_per_s']:.1f} posts/s)" + (f"; not run: {', '.join(missing)}" if missing else ""))
    else:
        skip(f"default x {label}", "pf_default or every peer missing")
    if kind in ("amx", "avx512-bf16") and "pf_default" in ok:
        d = ok["pf_default"]
        add("default min cosine vs ST fp32", d["cos_min"], BF16_TARGET_COS_MIN, d["cos_min"] >= BF16_TARGET_COS_MIN)
        add("default mean cosine vs ST fp32", d["cos_mean"], BF16_TARGET_COS_MEAN, d["cos_mean"] >= BF16_TARGET_COS_MEAN)
    if "pf_fp32" in ok and REFERENCE in ok:
        f = ok["pf_fp32"]
        add("float32 path x ST fp32", f["x_st_fp32"], FP32_TARGET_SPEEDUP, f["x_st_fp32"] >= FP32_TARGET_SPEEDUP)
        add("float32 path min cosine vs ST fp32", f["cos_min"], FP32_TARGET_COS, f["cos_min"] >= FP32_TARGET_COS)
    else:
        skip("float32 path x ST fp32", "pf_fp32 or st_fp32 missing")
    if "pf_default" in latency and "st_bf16" in latency:
        a, b = latency["pf_default"]["p50_ms"], latency["st_bf16"]["p50_ms"]
        add("default 1-post p50 ms <= ST bf16's", a, b, a <= b)
    return out


def run(texts, *, threads: int, rounds: int = 3, systems=None, warmup_posts: int = 64, latency_requests: int = 50,
        cache_dir=None, openvino_precision=None, corpus="", command="python -m bench.cpu_peers",
        gemm_tokens: int = GEMM_TOKENS, gemm_repeats: int = 5) -> dict:
    """Measure `systems` (ids of SYSTEMS; default all) on `texts`. -> the result dict (JSON-ready)."""
    import numpy as np
    import torch

    from postembed_fast.loading import default_model_folder

    torch.set_num_threads(threads)
    flags = cpu_flags()
    kind = cpu_kind(flags)
    folder = default_model_folder()
    cfg = json.loads((folder / "config.json").read_text())
    wanted = list(systems or SYSTEMS)
    if REFERENCE not in wanted:
        wanted.insert(0, REFERENCE)  # the cosine reference
    cache = Path(cache_dir or os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "postembed_fast" / "cpu-peers"
    ctx = {"folder": folder, "threads": threads, "int8_preset": int8_preset(flags), "openvino_precision": openvino_precision,
           "optimum_reason": _optimum_reason(), "exports": Exports(folder, cache, threads)}
    res = {"command": command, "load_before": load_avg(),
           "machine": machine_info(flags), "corpus": str(corpus),
           "config": {"posts": len(texts), "rounds": rounds, "threads": threads, "warmup_posts": warmup_posts,
                      "latency_requests": latency_requests, "st_batch_size": ST_BATCH, "cpu_kind": kind,
                      "int8_preset": ctx["int8_preset"], "openvino_precision_hint": openvino_precision or "default",
                      "export_cache": str(ctx["exports"].dir),
                      "sentence_transformers_backend_api": ctx["optimum_reason"] or "available"}}
    shapes = encoder_gemms(cfg["hidden_size"], cfg["intermediate_size"], gemm_tokens)

    def ceilings():
        return {str(dt).replace("torch.", ""): gemm_ceiling(shapes, dt, gemm_repeats) for dt in (torch.float32, torch.bfloat16)}

    print("GEMM ceilings (before) ...", flush=True)
    ceil_before = ceilings()

    peers, rows = {}, {}
    for sid in wanted:
        print(f"loading {sid} ...", flush=True)
        t = time.perf_counter()
        try:
            peers[sid] = build(sid, ctx)
        except Unavailable as exc:
            rows[sid] = {"system": SYSTEMS[sid], "status": f"unavailable: {exc}"}
        except Exception as exc:  # an export or engine that fails here is a finding, not a crash
            rows[sid] = {"system": SYSTEMS[sid], "status": f"unavailable: {type(exc).__name__}: {exc}"}
        if sid in rows:
            print(f"  {rows[sid]['status']}", flush=True)
        else:
            rows[sid] = {"system": SYSTEMS[sid], "status": "ok", "load_s": time.perf_counter() - t}
    if REFERENCE not in peers:
        raise SystemExit(f"the reference {REFERENCE} cannot run: {rows[REFERENCE]['status']}")

    from postembed_fast import Embedder

    # real tokens (no padding), counted by postembed_fast's tokenizer: ids identical to Hugging Face's
    tok = next((p.e for p in peers.values() if isinstance(p, PostembedPeer)), None) or Embedder(device="cpu")
    ids, offsets = tok.tokenizer.encode(texts)
    n_tokens = int(offsets[-1])
    res["corpus_stats"] = {"posts": len(texts), "tokens": n_tokens, "mean_tokens_per_post": n_tokens / len(texts),
                           "max_seq_length": tok.max_seq_length}
    flops_tok = gemm_flops_per_token(cfg)
    secs, outs = interleaved(peers, texts, rounds, texts[:warmup_posts])
    print("single-post latency ...", flush=True)
    latency = (single_post_latency({s: peers[s] for s in LATENCY_SYSTEMS if s in peers}, texts, latency_requests)
               if latency_requests > 0 else {})  # --latency-requests 0: throughput only
    print("GEMM ceilings (after) ...", flush=True)
    ceil_after = ceilings()
    ceiling = {k: max(ceil_before[k]["layer_mix"], ceil_after[k]["layer_mix"]) for k in ceil_before}
    ref_pps = len(texts) / statistics.median(secs[REFERENCE])
    for sid, p in peers.items():
        med = statistics.median(secs[sid])
        row = rows[sid]
        row.update(via=p.via, compute_dtype=p.compute_dtype, details=p.details, seconds=secs[sid], median_s=med,
                   posts_per_s=len(texts) / med, tokens_per_s=n_tokens / med, x_st_fp32=len(texts) / med / ref_pps,
                   **cosines(outs[sid], outs[REFERENCE]))
        base = p.compute_dtype if p.compute_dtype in ceiling else "float32"
        row["gemm_ceiling_dtype"] = base
        row["share_of_gemm_ceiling"] = row["tokens_per_s"] * flops_tok / ceiling[base]
        if sid in latency:
            row["latency_1_post"] = latency[sid]
        if not np.isfinite(outs[sid]).all():
            row["status"] = "ok, but non-finite outputs"
    res["gemm"] = {"flops_per_token_linear": flops_tok, "shapes_mkn": shapes, "ceiling_flops": ceiling,
                   "before": ceil_before, "after": ceil_after, "threads": threads,
                   "method": f"torch.matmul(x[M,K], W[N,K].t()) per shape of one layer, best of {gemm_repeats} after a warm-up; "
                             "layer_mix = total FLOPs / summed times; before and after the systems, the higher"}
    res["systems"] = {sid: rows[sid] for sid in wanted}
    res["targets"] = targets(res["systems"], latency, kind)
    res["load_after"] = load_avg()
    return res


# --- printing --------------------------------------------------------------------------------

def table(res) -> str:
    ceil = res["gemm"]["ceiling_flops"]
    hdr = ("system", "posts/s", "x ST fp32", "min cos", "mean cos", "GEMM share", "1-post p50 ms")
    out = []
    for sid, r in res["systems"].items():
        if not r["status"].startswith("ok"):
            out.append((r["system"], r["status"], "", "", "", "", ""))
            continue
        lat = r.get("latency_1_post")
        out.append((r["system"] + ("" if r["compute_dtype"] in r["system"] else f" [{r['compute_dtype']}]"),
                    f"{r['posts_per_s']:.1f}", f"{r['x_st_fp32']:.2f}", f"{r['cos_min']:.6f}", f"{r['cos_mean']:.6f}",
                    f"{100 * r['share_of_gemm_ceiling']:.1f}% of {r['gemm_ceiling_dtype']}",
                    f"{lat['p50_ms']:.1f}" if lat else "-"))
    w = [max(len(str(x)) for x in col) for col in zip(hdr, *out)]
    fmt = lambda row: "| " + " | ".join(str(x).ljust(n) for x, n in zip(row, w)) + " |"  # noqa: E731
    lines = [fmt(hdr), "|" + "|".join("-" * (n + 2) for n in w) + "|", *map(fmt, out)]
    c, m = res["corpus_stats"], res["machine"]
    lines.append(f"\n{c['posts']} posts ({c['mean_tokens_per_post']:.1f} tokens/post), {res['config']['rounds']} "
                 f"interleaved rounds, median; {res['config']['threads']} threads; CPU {m['cpu']} "
                 f"(kind {m['cpu_kind']}); load {res['load_before']['1min']:.2f} before, "
                 f"{res['load_after']['1min']:.2f} after")
    lines.append("GEMM ceilings at the encoder's shapes: " + ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in ceil.items())
                 + f"; {res['gemm']['flops_per_token_linear'] / 1e6:.2f} MFLOP of GEMMs per token")
    for t in res["targets"]:
        v = f" {t['value']:.4g} (target {t['threshold']:.4g})" if "value" in t else ""
        lines.append(f"{t['result']}: {t['target']}{v}" + (f" [{t['note']}]" if t.get("note") else ""))
    return "\n".join(lines)


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.cpu_peers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=None, help="JSONL(.gz) or plain text (default: tests/data/posts.jsonl.gz)")
    ap.add_argument("--posts", type=int, default=800)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="for every system (default: the usable cores)")
    ap.add_argument("--warmup-posts", type=int, default=64)
    ap.add_argument("--latency-requests", type=int, default=50, help="single-post requests per system (0: none)")
    ap.add_argument("--systems", default=None, help=f"comma list of ids (default all): {', '.join(SYSTEMS)}")
    ap.add_argument("--openvino-precision", default=None, choices=("f32", "bf16", "f16"),
                    help="OpenVINO INFERENCE_PRECISION_HINT (default: OpenVINO's own, bf16 on AMX)")
    ap.add_argument("--cache-dir", default=None, help="where the exports go (default ~/.cache)")
    ap.add_argument("--json", default=None, metavar="PATH")
    a = ap.parse_args(argv)
    a.systems = [s.strip() for s in a.systems.split(",")] if a.systems else None
    bad = [s for s in a.systems or () if s not in SYSTEMS]
    if bad:
        ap.error(f"unknown system(s) {', '.join(bad)}; valid: {', '.join(SYSTEMS)}")
    if a.posts < 1 or a.rounds < 1:
        ap.error("--posts and --rounds must be >= 1")
    if a.latency_requests < 0:
        ap.error("--latency-requests must be >= 0")
    return a


def main(argv=None):
    a = parse(argv)
    threads = a.threads or len(os.sched_getaffinity(0))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # before torch and the C++ kernels start OpenMP
    from bench.corpus import DEFAULT_CORPUS, load_posts, take

    corpus = a.corpus or DEFAULT_CORPUS
    texts = take([p["text"] for p in load_posts(corpus)], a.posts)
    res = run(texts, threads=threads, rounds=a.rounds, systems=a.systems, warmup_posts=a.warmup_posts,
              latency_requests=a.latency_requests, cache_dir=a.cache_dir, openvino_precision=a.openvino_precision,
              corpus=corpus, command="python -m bench.cpu_peers " + " ".join(sys.argv[1:] if argv is None else argv))
    print(table(res))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1, default=str) + "\n")
        print(f"json: {a.json}")
    return res


if __name__ == "__main__":
    main()
