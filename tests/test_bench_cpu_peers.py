"""bench.cpu_peers: the harness's pieces on a handful of real posts (no timing asserted).

The ONNX peer runs where the [peers] extra is installed and must report "unavailable: ..." where
it is not (CI installs [test] only): either way the run completes and writes its JSON."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("sentence_transformers")


def _bench_package():
    """bench/ from the repo root without putting the root on sys.path (conftest keeps the source
    tree's postembed_fast, which has no compiled _C, from shadowing the installed one)."""
    if "bench" not in sys.modules:
        root = Path(__file__).resolve().parents[1] / "bench"
        spec = importlib.util.spec_from_file_location("bench", root / "__init__.py", submodule_search_locations=[str(root)])
        sys.modules["bench"] = mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)


_bench_package()
from bench import cpu_peers  # noqa: E402
from bench.corpus import load_posts  # noqa: E402

PEERS_INSTALLED = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    texts = [p["text"] for p in load_posts()][:6]
    res = cpu_peers.run(texts, threads=2, rounds=1, systems=["st_fp32", "st_onnx", "pf_fp32", "pf_default"],
                        warmup_posts=2, latency_requests=2, cache_dir=tmp_path_factory.mktemp("exports"),
                        gemm_tokens=64, gemm_repeats=1)
    return res


def test_rows_cosines_and_json(result, tmp_path):
    rows = result["systems"]
    assert list(rows) == ["st_fp32", "st_onnx", "pf_fp32", "pf_default"]
    for sid in ("st_fp32", "pf_fp32", "pf_default"):
        r = rows[sid]
        assert r["status"] == "ok", r["status"]
        assert r["posts_per_s"] > 0 and len(r["seconds"]) == 1
        assert 0 < r["share_of_gemm_ceiling"]
    assert rows["st_fp32"]["x_st_fp32"] == pytest.approx(1.0)
    assert rows["st_fp32"]["cos_min"] == pytest.approx(1.0, abs=1e-12)
    assert rows["pf_fp32"]["compute_dtype"] == "float32"
    assert rows["pf_fp32"]["cos_min"] >= 0.9999 and rows["pf_fp32"]["cos_mean"] >= rows["pf_fp32"]["cos_min"]
    assert rows["pf_default"]["details"]["resolved_dtype"] in ("float32", "bfloat16")
    if PEERS_INSTALLED:  # the export made from the local folder runs inside sentence-transformers' encode()
        assert rows["st_onnx"]["status"] == "ok", rows["st_onnx"]["status"]
        assert rows["st_onnx"]["cos_min"] >= 0.9999
    else:
        assert rows["st_onnx"]["status"].startswith("unavailable: ")
    for sid in ("st_fp32", "pf_default"):
        assert rows[sid]["latency_1_post"]["p50_ms"] > 0
    # everything the committed results carry, and it serializes
    m = result["machine"]
    assert m["cpu"] and m["cpu_flags"] and m["cpu_kind"] == cpu_peers.cpu_kind(cpu_peers.cpu_flags())
    assert set(result["gemm"]["ceiling_flops"]) == {"float32", "bfloat16"}
    assert result["gemm"]["flops_per_token_linear"] == 6 * 2 * (4 * 384 * 384 + 2 * 384 * 1536)
    assert {"1min", "5min", "15min"} <= set(result["load_before"])
    p = tmp_path / "r.json"
    p.write_text(json.dumps(result, default=str))
    assert json.loads(p.read_text())["corpus_stats"]["posts"] == 6
    names = {t["target"] for t in result["targets"]}
    assert "float32 path x ST fp32" in names and "float32 path min cosine vs ST fp32" in names
    text = cpu_peers.table(result)
    assert "postembed_fast dtype=torch.float32" in text and "TFLOP/s" in text


@pytest.mark.parametrize("flags, kind, preset", [
    ("fma avx2 avx512f avx512_bf16 avx512_vnni amx_bf16 amx_int8", "amx", "avx512_vnni"),
    ("fma avx2 avx512f avx512_bf16 avx512_vnni", "avx512-bf16", "avx512_vnni"),
    ("fma avx2 avx512f", "avx512", "avx512"),
    ("fma avx2", "avx2", "avx2"),
    ("sse4_2", "baseline", "arm64"),
])
def test_cpu_kind_and_int8_preset(flags, kind, preset):
    assert cpu_peers.cpu_kind(flags.split()) == kind
    assert cpu_peers.int8_preset(flags.split()) == preset


def test_targets_name_missing_peers():
    rows = {"st_fp32": {"status": "ok", "posts_per_s": 50.0, "cos_min": 1.0, "compute_dtype": "float32"},
            "st_onnx": {"status": "unavailable: onnx not installed"},
            "pf_fp32": {"status": "ok", "posts_per_s": 70.0, "x_st_fp32": 1.4, "cos_min": 1.0, "compute_dtype": "float32"},
            "pf_default": {"status": "ok", "posts_per_s": 59.0, "cos_min": 1.0, "compute_dtype": "float32"}}
    t = {x["target"]: x for x in cpu_peers.targets(rows, {}, "avx2")}
    d = t["default x fastest of ST float32, ONNX, ONNX O3, OpenVINO float32"]
    assert d["result"] == "FAIL" and d["value"] == pytest.approx(59 / 50) and "st_onnx" in d["note"]
    assert t["float32 path x ST fp32"]["result"] == "PASS"
