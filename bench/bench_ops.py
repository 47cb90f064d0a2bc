"""Micro-benchmarks, each op's backends side by side at serving shapes:

    python -m pytest bench/bench_ops.py --benchmark-only [--benchmark-group-by=group]

Not collected by the test run (pytest's testpaths is tests/). Device: $BENCH_DEVICE, else
cuda when available, else cpu; float16 on CUDA, float32 on CPU (the Embedder's defaults).
Backends that report themselves unavailable (unavailable_reason) or unimplemented
(RuntimeError) for the device are skipped with the reason.
Shapes: 4096 tokens = 32 sequences x 128, hidden 384 = 12 heads x 32, FFN 1536;
the layer / encoder benchmarks run real posts packed up to 4096 tokens.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from postembed_fast.kernels import (BACKENDS, add_layernorm, bias_gelu, pool_normalize,  # noqa: E402
                                    unavailable_reason, varlen_attention)

DEVICE = torch.device(os.environ.get("BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.float32
T, B, L, H, HEADS, HD, FFN = 4096, 32, 128, 384, 12, 32, 1536


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def run(benchmark, backend, fn):
    """Skip an unavailable backend, else time fn (device-synchronized)."""
    reason = unavailable_reason(backend, DEVICE.type) if backend else None
    if reason:
        pytest.skip(reason)
    try:
        fn()
    except RuntimeError as exc:  # e.g. "backend='cpp' is not implemented for cpu tensors"
        pytest.skip(str(exc))

    def timed():
        out = fn()
        _sync()
        return out

    benchmark.extra_info.update(device=str(DEVICE), dtype=str(DTYPE), backend=backend)
    benchmark(timed)


def rand(*shape, dtype=None):
    return torch.randn(*shape, device=DEVICE, dtype=dtype or DTYPE)


@pytest.fixture(scope="module")
def packed():
    cu = torch.arange(0, T + 1, L, dtype=torch.int32, device=DEVICE)
    return dict(qkv=rand(T, 3, HEADS, HD), cu=cu, x=rand(T, H), res=rand(T, H), w=rand(H), b=rand(H),
                h=rand(T, FFN), bias=rand(FFN))


backends = pytest.mark.parametrize("backend", BACKENDS)


@pytest.mark.benchmark(group="varlen_attention")
@backends
def test_varlen_attention(benchmark, packed, backend):
    q, k, v = packed["qkv"].unbind(1)  # strided views of a fused QKV output, as in the encoder
    run(benchmark, backend, lambda: varlen_attention(q, k, v, packed["cu"], L, backend=backend))


@pytest.mark.benchmark(group="pool_normalize")
@backends
@pytest.mark.parametrize("precision", ["float32", "binary"])
def test_pool_normalize(benchmark, packed, backend, precision):
    run(benchmark, backend, lambda: pool_normalize(packed["x"], packed["cu"], "mean", True, precision,
                                                   backend=backend))


@pytest.mark.benchmark(group="add_layernorm")
@backends
@pytest.mark.parametrize("out", ["fresh", "in-place"])
def test_add_layernorm(benchmark, packed, backend, out):
    # in place (out=residual) is what the encoder does; the values drift but stay finite (a LayerNorm)
    p = packed
    o = p["res"].clone() if out == "in-place" else None
    res = o if o is not None else p["res"]
    run(benchmark, backend, lambda: add_layernorm(p["x"], res, p["w"], p["b"], 1e-12, backend=backend, out=o))


@pytest.mark.benchmark(group="bias_gelu")
@backends
@pytest.mark.parametrize("bias", ["bias", "in-place-no-bias"])
def test_bias_gelu(benchmark, packed, backend, bias):
    # the encoder's form: the bias already added by the GEMM, GELU in place
    if bias == "bias":
        run(benchmark, backend, lambda: bias_gelu(packed["h"], packed["bias"], backend=backend))
    else:
        h = packed["h"].clone()
        run(benchmark, backend, lambda: bias_gelu(h.copy_(packed["h"]), None, backend=backend, out=h))


@pytest.fixture(scope="module")
def model():
    from postembed_fast import Embedder
    from postembed_fast.embedder import pack
    from postembed_fast.model import Workspace

    from bench.corpus import load_posts

    e = Embedder(device=DEVICE, dtype=DTYPE)
    seqs, total = [], 0
    for ids in e.tokenize([p["text"] for p in load_posts()[:400]]):
        if total + len(ids) > T:
            break
        seqs.append(ids)
        total += len(ids)
    one_layer = copy.copy(e.encoder)
    one_layer.layers = e.encoder.layers[:1]  # embeddings + the first layer
    return dict(encoder=e.encoder, one_layer=one_layer, batch=pack(seqs, DEVICE), workspace=Workspace())


# None = what the Embedder runs (dispatch's pick per op); a forced backend must implement every op
encoder_backends = pytest.mark.parametrize("backend", [None, *BACKENDS], ids=["default", *BACKENDS])


@pytest.mark.benchmark(group="encoder_layer")
@encoder_backends
def test_encoder_one_layer(benchmark, model, backend):
    run(benchmark, backend, lambda: model["one_layer"].forward(*model["batch"], backend=backend,
                                                               workspace=model["workspace"]))


@pytest.mark.benchmark(group="encoder_forward")
@encoder_backends
def test_encoder_forward(benchmark, model, backend):
    run(benchmark, backend, lambda: model["encoder"].forward(*model["batch"], backend=backend,
                                                             workspace=model["workspace"]))
