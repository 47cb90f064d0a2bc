"""Triton kernels vs their pure-torch references (computed in float64).

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, which
conftest.py sets before any test module imports triton) at small sizes; on a CUDA
machine they run compiled on "cuda" at full sizes. Outputs are written into NaN-filled (float) or
sentinel-filled (integer) buffers, so an element the kernel never writes fails.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from postembed_fast.kernels import dispatch

if dispatch.TRITON_IMPORT_ERROR is not None:
    pytest.skip(f"triton is not importable: {dispatch.TRITON_IMPORT_ERROR}", allow_module_level=True)

from postembed_fast.kernels import attention, gelu, layernorm, pooling, quantize  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

if not CUDA:
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(attention._varlen_attention_kernel, InterpretedFunction):
        # triton.jit picks the interpreter when the kernel is decorated, i.e. at import.
        pytest.skip("no GPU and the Triton kernels are not interpreted (TRITON_INTERPRET is not 1, or "
                    "postembed_fast.kernels was imported before conftest.py set it)", allow_module_level=True)

# Mixed lengths: 1 and 2 (shorter than any block), 7, 97, 129 (one past a 128 block),
# 256 (exact blocks) and 300, all in one batch.
MIXED = [1, 2, 7, 97, 129, 256, 300]
HEADS = 4 if CUDA else 2  # the interpreter is slow; two heads still test the head stride

FLOAT_TOLS = [  # (dtype, limit on ||out - ref|| / ||ref||)
    (torch.float32, 1e-5),
    (torch.float16, 3e-3),
    (torch.bfloat16, 2e-2),
]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert not torch.isnan(out).any(), "NaN in the output: an element was never written"
    return ((out - ref).norm() / ref.norm()).item()


def cu_seqlens_of(lens):
    return torch.tensor([0, *np.cumsum(lens)], dtype=torch.int32, device=DEVICE)


def nan_like(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


# ---------------------------------------------------------------- varlen_attention


@pytest.mark.parametrize(
    "lens",
    [MIXED, [300], [1], [129, 2]],
    ids=["mixed", "single300", "single1", "129+2"],
)
@pytest.mark.parametrize("head_dim", [16, 32, 64] + ([128] if CUDA else []))
@pytest.mark.parametrize("dtype, tol", FLOAT_TOLS)
def test_varlen_attention(lens, head_dim, dtype, tol):
    torch.manual_seed(0)
    T = sum(lens)
    # q, k, v as strided views of one fused QKV output, as the encoder passes them
    qkv = torch.randn(T, 3, HEADS, head_dim, device=DEVICE).to(dtype)
    q, k, v = qkv.unbind(1)
    cu = cu_seqlens_of(lens)
    scale = head_dim ** -0.5
    out = attention.varlen_attention_triton(q, k, v, cu, max(lens), scale, out=nan_like((T, HEADS, head_dim), dtype))
    ref = attention.varlen_attention_torch(q.double(), k.double(), v.double(), cu, max(lens), scale)
    assert out.dtype == dtype and out.is_contiguous()
    assert rel_err(out, ref) < tol


@pytest.mark.parametrize("dtype, tol", FLOAT_TOLS[:2])
def test_varlen_attention_launcher_contiguous_inputs(dtype, tol):
    """Through the public launcher (dispatch -> Triton), separate contiguous q, k, v, default scale."""
    torch.manual_seed(1)
    lens = [5, 40, 17]
    q, k, v = (torch.randn(sum(lens), 2, 64, device=DEVICE).to(dtype) for _ in range(3))
    cu = cu_seqlens_of(lens)
    out = attention.varlen_attention(q, k, v, cu, max(lens), backend="triton")
    ref = attention.varlen_attention_torch(q.double(), k.double(), v.double(), cu, max(lens), 64 ** -0.5)
    assert rel_err(out, ref) < tol


def test_varlen_attention_rejects_head_dim():
    q = torch.randn(3, 1, 48, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim"):
        attention.varlen_attention(q, q, q, cu_seqlens_of([3]), 3, backend="triton")


# ---------------------------------------------------------------- add_layernorm / bias_gelu


@pytest.mark.parametrize("n, h", [(1, 1), (7, 64), (33, 250), (5, 384), (3, 1000)])
@pytest.mark.parametrize("dtype, tol", FLOAT_TOLS)
def test_add_layernorm(n, h, dtype, tol):
    torch.manual_seed(0)
    x, r = (torch.randn(n, h, device=DEVICE).to(dtype) for _ in range(2))
    w, b = torch.randn(h, device=DEVICE).to(dtype), torch.randn(h, device=DEVICE).to(dtype)
    out = layernorm.add_layernorm_triton(x, r, w, b, 1e-12, out=nan_like((n, h), dtype))
    ref = layernorm.add_layernorm_torch(x.double(), r.double(), w.double(), b.double(), 1e-12)
    assert out.dtype == dtype
    if h == 1:  # LayerNorm of one element is exactly its bias
        torch.testing.assert_close(out.double(), ref, atol=0, rtol=0)
    else:
        assert rel_err(out, ref) < tol


def test_add_layernorm_broadcast_residual():
    """The encoder's embedding LayerNorm passes a stride-0 residual (token_type0.expand_as(x))."""
    torch.manual_seed(0)
    x, vec, w, b = torch.randn(9, 96, device=DEVICE), *(torch.randn(96, device=DEVICE) for _ in range(3))
    out = layernorm.add_layernorm(x, vec.expand_as(x), w, b, 1e-5, backend="triton")
    ref = layernorm.add_layernorm_torch(x.double(), vec.double().expand_as(x), w.double(), b.double(), 1e-5)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("n, f", [(1, 1), (7, 128), (33, 250), (5, 1536)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype, tol", FLOAT_TOLS)
def test_bias_gelu(n, f, with_bias, dtype, tol):
    torch.manual_seed(0)
    x = (3 * torch.randn(n, f, device=DEVICE)).to(dtype)
    bias = torch.randn(f, device=DEVICE).to(dtype) if with_bias else None
    out = gelu.bias_gelu_triton(x, bias, out=nan_like((n, f), dtype))
    ref = gelu.bias_gelu_torch(x.double(), None if bias is None else bias.double())
    assert out.dtype == dtype
    assert rel_err(out, ref) < tol


# ---------------------------------------------------------------- pool_normalize / quantize

PRECISIONS = ["float32", "float16", "int8", "uint8", "binary", "ubinary"]
SENTINEL = 0x55  # integer outputs start filled with this (no NaN for ints)


def pooled_float64(hidden, lens, mode, normalize):
    x = hidden.double().cpu()
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    rows = [x[s] if mode == "cls" else x[s:s + n].mean(0) for s, n in zip(starts, lens)]
    p = torch.stack(rows)
    return p / p.norm(dim=1, keepdim=True).clamp_min(1e-12) if normalize else p


def make_ranges(d, seed=0):
    """Per-dimension [min, max] narrow enough that some values clip at 0 and 255."""
    g = torch.Generator().manual_seed(seed)
    half = 0.05 + 0.15 * torch.rand(d, generator=g)
    centre = 0.02 * torch.randn(d, generator=g)
    return torch.stack([centre - half, centre + half])


def check_codes(out, pooled64, precision, ranges):
    """Codes must equal the formulas applied to the float64 pooled values, except where that
    value lies within 1e-6 of a rounding boundary (a .5 tie for uint8/int8, 0 for the sign bits)."""
    x = pooled64.numpy()
    out = out.cpu().numpy()
    if precision in ("binary", "ubinary"):
        want = np.packbits(x > 0, axis=1)  # numpy's MSB-first order, zero-padded last byte
        if precision == "binary":
            want = (want.astype(np.int16) - 128).astype(np.int8)
        near = np.abs(x) < 1e-6
        padded = np.zeros((x.shape[0], want.shape[1] * 8), bool)
        padded[:, : x.shape[1]] = near
        tie = padded.reshape(x.shape[0], -1, 8).any(-1)
    else:
        lo, hi = ranges[0].double().numpy(), ranges[1].double().numpy()
        step = (hi - lo) / 255.0
        t = (x - lo) / step
        want = np.clip(np.floor(t + 0.5), 0, 255)
        tie = np.abs(t - np.floor(t) - 0.5) * step < 1e-6
        want = want.astype(np.uint8) if precision == "uint8" else (want - 128).astype(np.int8)
    assert out.dtype == want.dtype and out.shape == want.shape
    bad = (out != want) & ~tie
    assert not bad.any(), f"{bad.sum()} codes differ, first at {np.argwhere(bad)[0]}"
    assert tie.mean() < 0.01


def run_pool(hidden, lens, mode, normalize, precision, ranges):
    B, D = len(lens), hidden.shape[1]
    r = None if ranges is None else ranges.to(DEVICE)
    ref = pooling.pool_normalize_torch(hidden, cu_seqlens_of(lens), mode, normalize, precision, r)
    buf = nan_like(ref.shape, ref.dtype) if ref.is_floating_point() else torch.full_like(ref, SENTINEL)
    out = pooling.pool_normalize_triton(hidden, cu_seqlens_of(lens), mode, normalize, precision, r, out=buf)
    assert out.dtype == ref.dtype and out.shape == ref.shape == (B, D if precision[-6:] != "binary" else (D + 7) // 8)
    return out


@pytest.mark.parametrize("d", [384, 250, 1])
@pytest.mark.parametrize("mode", ["mean", "cls"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_pool_normalize(d, mode, precision):
    torch.manual_seed(0)
    hidden = torch.randn(sum(MIXED), d, device=DEVICE)
    ranges = make_ranges(d) if precision in ("int8", "uint8") else None
    out = run_pool(hidden, MIXED, mode, True, precision, ranges)
    pooled = pooled_float64(hidden, MIXED, mode, True)
    if precision == "float32":
        assert rel_err(out, pooled) < 1e-6
    elif precision == "float16":
        assert rel_err(out, pooled) < 1e-3
    else:
        check_codes(out, pooled, precision, ranges)


@pytest.mark.parametrize("precision", ["float32", "uint8", "ubinary"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pool_normalize_half_inputs_unnormalized(precision, dtype):
    """fp16/bf16 hidden states, normalize=False, single-sequence and mixed batches."""
    torch.manual_seed(0)
    for lens in ([300], [1], MIXED):
        hidden = torch.randn(sum(lens), 250, device=DEVICE).to(dtype)
        ranges = make_ranges(250) * 4 if precision == "uint8" else None
        out = run_pool(hidden, lens, "mean", False, precision, ranges)
        pooled = pooled_float64(hidden, lens, "mean", False)
        if precision == "float32":
            assert rel_err(out, pooled) < 1e-6
        else:
            check_codes(out, pooled, precision, ranges)


def test_pool_normalize_launcher():
    torch.manual_seed(0)
    hidden = torch.randn(sum(MIXED), 64, device=DEVICE)
    out = pooling.pool_normalize(hidden, cu_seqlens_of(MIXED), "mean", True, "binary", backend="triton")
    ref = pooling.pool_normalize(hidden, cu_seqlens_of(MIXED), "mean", True, "binary", backend="torch")
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


@pytest.mark.parametrize("d", [384, 250, 1])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_quantize_embeddings(d, precision):
    torch.manual_seed(0)
    x = 0.1 * torch.randn(37, d, device=DEVICE)
    ranges = make_ranges(d) if precision in ("int8", "uint8") else None
    r = None if ranges is None else ranges.to(DEVICE)
    ref = quantize.quantize_torch(x, precision, r)
    buf = nan_like(ref.shape, ref.dtype) if ref.is_floating_point() else torch.full_like(ref, SENTINEL)
    out = quantize.quantize_triton(x, precision, r, out=buf)
    if precision in ("float32", "float16"):
        torch.testing.assert_close(out, ref, atol=0, rtol=0)
    else:
        check_codes(out, x.double().cpu(), precision, ranges)


# ---------------------------------------------------------------- encoder, dispatch


@pytest.mark.parametrize("dtype, tol", FLOAT_TOLS[:2] if CUDA else FLOAT_TOLS[:1])
def test_encoder_triton_matches_torch(dtype, tol, encoder_inputs):
    from transformers import BertConfig, BertModel

    from postembed_fast.model import Encoder, EncoderConfig

    torch.manual_seed(0)
    hf = BertConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
                    vocab_size=100, max_position_embeddings=64)
    state = BertModel(hf).state_dict()
    cfg = EncoderConfig(model_type="bert", hidden=64, heads=4, layers=2, intermediate=128, vocab_size=100,
                        eps=hf.layer_norm_eps, position_offset=0)
    enc = Encoder(cfg, state, DEVICE, dtype, Path("."))
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 100, (n,), generator=g).tolist() for n in (1, 2, 7, 33, 64, 20)]
    packed = encoder_inputs(seqs, DEVICE)
    out = enc.forward(*packed, backend="triton")
    ref = enc.forward(*packed, backend="torch")
    assert out.shape == (sum(map(len, seqs)), 64)
    assert rel_err(out, ref.float()) < tol


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in dispatch.unavailable_reason("triton", "cpu")
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        gelu.bias_gelu(x, None, backend="triton")


def test_dispatch_picks_the_triton_kernels():
    dev = torch.device(DEVICE)
    assert dispatch.choose("varlen_attention", dev, "triton") is attention.varlen_attention_triton
    assert dispatch.choose("pool_normalize", dev, "triton") is pooling.pool_normalize_triton
    assert dispatch.choose("add_layernorm", dev, "triton") is layernorm.add_layernorm_triton
    assert dispatch.choose("bias_gelu", dev, "triton") is gelu.bias_gelu_triton
    assert dispatch.choose("quantize_embeddings", dev, "triton") is quantize.quantize_triton
    if CUDA:  # backend=None on a GPU prefers Triton
        assert dispatch.choose("varlen_attention", dev, None) is attention.varlen_attention_triton
