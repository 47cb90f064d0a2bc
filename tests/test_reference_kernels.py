"""The pure-torch references (backend="torch", the fallback that always works) against naive
float64 implementations written from the definitions, plus the launchers' argument checks
and the dispatch rules. The Triton and C++ kernels are tested against these references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from postembed_fast.kernels import add_layernorm, bias_gelu, pool_normalize, varlen_attention
from postembed_fast.kernels import dispatch

SEQ_LENS = [1, 2, 7, 97, 129, 256, 300]


def packed(lens):
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    return cu


def naive_attention(q, k, v, lens, scale):
    out = torch.empty_like(q, dtype=torch.float64)
    start = 0
    for n in lens:
        sl = slice(start, start + n)
        qs, ks, vs = (t[sl].double().transpose(0, 1) for t in (q, k, v))  # [H, n, d]
        p = torch.softmax(qs @ ks.transpose(1, 2) * scale, dim=-1)
        out[sl] = (p @ vs).transpose(0, 1)
        start += n
    return out


def rel_err(out, ref):
    return float((out.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("lens", [SEQ_LENS, [1], [300], [5, 1, 3]], ids=["mixed", "one-token", "one-long", "small"])
@pytest.mark.parametrize("heads, head_dim", [(2, 16), (3, 32), (1, 64)])
def test_varlen_attention_reference_on_strided_fused_qkv(lens, heads, head_dim):
    torch.manual_seed(0)
    T = sum(lens)
    qkv = torch.randn(T, 3 * heads * head_dim)
    q, k, v = qkv.view(T, 3, heads, head_dim).unbind(1)  # strided views, as the encoder passes them
    assert T == 1 or not q.is_contiguous()
    out = varlen_attention(q, k, v, packed(lens), max(lens), backend="torch")
    ref = naive_attention(q, k, v, lens, 1 / math.sqrt(head_dim))
    assert out.shape == (T, heads, head_dim) and out.is_contiguous()
    assert rel_err(out, ref) < 1e-5


def test_varlen_attention_explicit_scale_and_fp16():
    torch.manual_seed(1)
    lens = [7, 33]
    q, k, v = (torch.randn(40, 2, 16) for _ in range(3))
    ref = naive_attention(q, k, v, lens, 0.3)
    assert rel_err(varlen_attention(q, k, v, packed(lens), 33, scale=0.3), ref) < 1e-5
    out16 = varlen_attention(q.half(), k.half(), v.half(), packed(lens), 33, scale=0.3)
    assert out16.dtype == torch.float16 and rel_err(out16, ref) < 5e-3


def naive_pool(hidden, lens, mode, normalize):
    x = hidden.double()
    rows, start = [], 0
    for n in lens:
        rows.append(x[start] if mode == "cls" else x[start : start + n].mean(0))
        start += n
    p = torch.stack(rows)
    return p / p.norm(dim=1, keepdim=True) if normalize else p


@pytest.mark.parametrize("D", [384, 250, 1])
@pytest.mark.parametrize("mode", ["mean", "cls"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
def test_pool_normalize_reference(D, mode, normalize, dtype, tol):
    torch.manual_seed(2)
    hidden = torch.randn(sum(SEQ_LENS), D).to(dtype)
    out = pool_normalize(hidden, packed(SEQ_LENS), mode, normalize, backend="torch")
    ref = naive_pool(hidden, SEQ_LENS, mode, normalize)
    assert out.dtype == torch.float32 and out.shape == (len(SEQ_LENS), D)
    assert rel_err(out, ref) < tol


@pytest.mark.parametrize("precision", ["float16", "int8", "uint8", "binary", "ubinary"])
@pytest.mark.parametrize("D", [384, 250, 1])
def test_pool_normalize_reference_precisions(precision, D, reference_quantize, tie_mask):
    torch.manual_seed(3)
    hidden = torch.randn(sum(SEQ_LENS), D)
    x = naive_pool(hidden, SEQ_LENS, "mean", True).float().numpy()
    ranges = np.stack([x.min(0) - 0.01, x.max(0) + 0.01]).astype(np.float32)
    out = pool_normalize(hidden, packed(SEQ_LENS), "mean", True, precision, ranges, backend="torch").numpy()
    want = reference_quantize(x, precision, ranges)
    assert out.dtype == want.dtype and out.shape == want.shape
    if precision in ("int8", "uint8"):
        ok = ~tie_mask(x, ranges)
        np.testing.assert_array_equal(out[ok], want[ok])
    elif precision == "float16":
        np.testing.assert_allclose(out.astype(np.float32), want.astype(np.float32), rtol=1e-3, atol=1e-5)
    else:
        np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("N, H", [(1, 384), (7, 250), (129, 64)])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_add_layernorm_reference(N, H, dtype, tol):
    torch.manual_seed(4)
    x, r = torch.randn(N, H).to(dtype), torch.randn(N, H).to(dtype)
    w, b = torch.randn(H), torch.randn(H)
    out = add_layernorm(x, r, w.to(dtype), b.to(dtype), 1e-12, backend="torch")
    y = x.double() + r.double()
    ref = (y - y.mean(-1, keepdim=True)) / torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + 1e-12)
    ref = ref * w.to(dtype).double() + b.to(dtype).double()
    assert out.dtype == dtype and rel_err(out, ref) < tol


@pytest.mark.parametrize("N, F", [(1, 1536), (97, 250), (7, 1)])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float16, 1e-3)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_gelu_reference(N, F, dtype, tol, with_bias):
    torch.manual_seed(5)
    x = (torch.randn(N, F) * 3).to(dtype)
    bias = torch.randn(F).to(dtype) if with_bias else None
    out = bias_gelu(x, bias, backend="torch")
    y = x.double() + (bias.double() if with_bias else 0)
    ref = y * 0.5 * (1 + torch.special.erf(y / math.sqrt(2)))
    assert out.dtype == dtype and rel_err(out, ref) < tol


# ---- argument checks ---------------------------------------------------------------------
def test_cu_seqlens_is_checked():
    h = torch.randn(10, 8)
    for cu, match in [
        (torch.tensor([0, 4, 10], dtype=torch.int64), "int32"),
        (torch.tensor([0, 4, 9], dtype=torch.int32), "total_tokens"),
        (torch.tensor([1, 4, 10], dtype=torch.int32), r"cu_seqlens\[0\]"),
        (torch.tensor([0, 6, 6, 10], dtype=torch.int32), "strictly increasing"),
        (torch.tensor([0], dtype=torch.int32), "B\\+1"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            pool_normalize(h, cu)


def test_launcher_arguments_are_checked():
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    h = torch.randn(10, 8)
    with pytest.raises(ValueError, match="mean, cls"):
        pool_normalize(h, cu, mode="max")
    with pytest.raises(ValueError, match="binary"):
        pool_normalize(h, cu, precision="int4")
    with pytest.raises(ValueError, match=r"\(2, 8\)"):
        pool_normalize(h, cu, precision="int8", ranges=np.zeros((2, 7)))
    with pytest.raises(TypeError, match="float32"):
        pool_normalize(h.long(), cu)
    q = torch.randn(10, 2, 4)
    with pytest.raises(ValueError, match="longest"):
        varlen_attention(q, q, q, cu, max_seqlen=5)
    with pytest.raises(ValueError, match="shapes differ"):
        varlen_attention(q, q, q[:, :1], cu, 7)
    with pytest.raises(ValueError, match="stride"):
        varlen_attention(q.transpose(1, 2).contiguous().transpose(1, 2), q, q, cu, 7)
    with pytest.raises(ValueError, match="residual"):
        add_layernorm(h, h[:, :4], torch.ones(8), torch.zeros(8), 1e-5)
    with pytest.raises(ValueError, match="bias"):
        bias_gelu(h, torch.zeros(3))


# ---- dispatch -----------------------------------------------------------------------------
def test_dispatch_rules(monkeypatch):
    h, cu = torch.randn(4, 8), torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="'torch', 'triton', 'cpp'"):
        pool_normalize(h, cu, backend="cuda")
    # backend=None on CPU never picks the (testing-only) Triton interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fn = dispatch.choose("bias_gelu", torch.device("cpu"), None)
    assert fn is not dispatch._REGISTRY["bias_gelu"].get("triton", (None,))[0]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if dispatch.TRITON_IMPORT_ERROR is None:
        assert "TRITON_INTERPRET" in dispatch.unavailable_reason("triton", "cpu")
        if "triton" in dispatch._REGISTRY["bias_gelu"]:
            with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
                bias_gelu(h, None, backend="triton")
    # every op has its reference, and None falls back to something that works
    for op, backends in dispatch.implemented().items():
        assert "torch" in backends, op
    torch.testing.assert_close(pool_normalize(h, cu), pool_normalize(h, cu, backend="torch"))
