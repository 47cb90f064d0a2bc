"""The backend choice (kernels/dispatch.py): what backend=None picks per device and op, the calls each
implementation refuses (its `supports` check) and where those go instead, unknown and unavailable
backends, the testing-only Triton interpreter; and the test suite's own list of backends per op
(tests/conftest.py), built on the same rules."""
from __future__ import annotations

import importlib

import pytest
import torch

from postembed_fast.kernels import _ext, add_layernorm, bias_gelu, cpp_ops, dispatch, pool_normalize, varlen_attention
from postembed_fast.kernels.attention import varlen_attention_torch
from postembed_fast.kernels.gelu import bias_gelu_torch
from postembed_fast.kernels.layernorm import add_layernorm_torch

needs_c = pytest.mark.skipif(_ext._C is None, reason=f"compiled extension unavailable: {_ext.UNAVAILABLE_REASON}")
needs_triton = pytest.mark.skipif(dispatch.TRITON_IMPORT_ERROR is not None,
                                  reason=f"triton is not importable: {dispatch.TRITON_IMPORT_ERROR}")
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU tensors: the interpreter


def cu_of(lens):
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    return cu


def fused_qkv(T, heads, head_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, 3, heads, head_dim, generator=g).unbind(1)


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


@needs_triton
def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in dispatch.unavailable_reason("triton", "cpu")
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        bias_gelu(x, None, backend="triton")


@needs_triton
def test_dispatch_picks_the_triton_kernels():
    from postembed_fast.kernels import attention, gelu, layernorm, pooling, quantize

    dev = torch.device(TRITON_DEVICE)
    assert dispatch.choose("varlen_attention", dev, "triton") is attention.varlen_attention_triton
    assert dispatch.choose("pool_normalize", dev, "triton") is pooling.pool_normalize_triton
    assert dispatch.choose("add_layernorm", dev, "triton") is layernorm.add_layernorm_triton
    assert dispatch.choose("bias_gelu", dev, "triton") is gelu.bias_gelu_triton
    assert dispatch.choose("quantize_embeddings", dev, "triton") is quantize.quantize_triton
    if dev.type == "cuda":  # backend=None on a GPU prefers Triton
        assert dispatch.choose("varlen_attention", dev, None) is attention.varlen_attention_triton


@needs_triton
def test_triton_attention_refuses_other_head_dims():
    q = torch.randn(3, 1, 48, device=TRITON_DEVICE)
    cu = cu_of([3]).to(TRITON_DEVICE)
    with pytest.raises(ValueError, match="head_dim"):
        varlen_attention(q, q, q, cu, 3, backend="triton")


@needs_c
def test_attention_picks_cpp_for_float32_and_bfloat16_and_falls_back_otherwise():
    cpu = torch.device("cpu")
    q, k, v = fused_qkv(10, 2, 32)
    args = (q, k, v, cu_of([10]), 10, 0.2)
    assert dispatch.choose("varlen_attention", cpu, None, args) is cpp_ops.varlen_attention_cpp
    bf16 = (q.bfloat16(), k.bfloat16(), v.bfloat16(), cu_of([10]), 10, 0.2)
    assert dispatch.choose("varlen_attention", cpu, None, bf16) is cpp_ops.varlen_attention_cpp
    half = (q.half(), k.half(), v.half(), cu_of([10]), 10, 0.2)
    assert dispatch.choose("varlen_attention", cpu, None, half) is varlen_attention_torch
    q48, k48, v48 = fused_qkv(10, 2, 48)
    odd = (q48, k48, v48, cu_of([10]), 10, 0.2)
    assert dispatch.choose("varlen_attention", cpu, None, odd) is varlen_attention_torch
    # the fallbacks still compute the right thing through the public launcher
    out = varlen_attention(q48, k48, v48, cu_of([10]), 10)
    qs, ks, vs = (t.double().transpose(0, 1) for t in (q48, k48, v48))  # one sequence: [heads, 10, 48]
    ref = (torch.softmax(qs @ ks.transpose(1, 2) * 48 ** -0.5, dim=-1) @ vs).transpose(0, 1)
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-5
    with pytest.raises(ValueError, match="float32 or bfloat16 only, got torch.float16"):
        varlen_attention(*half[:5], backend="cpp")
    with pytest.raises(ValueError, match="head_dim must be 16, 32, 64 or 128"):
        varlen_attention(*odd[:5], backend="cpp")


@needs_c
def test_add_layernorm_picks_cpp_for_float32_and_bfloat16_and_falls_back_otherwise():
    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(4, 16, generator=g) * 3, torch.randn(4, 16, generator=g) + 0.5
    w, b = torch.randn(16, generator=g), torch.randn(16, generator=g)
    assert dispatch.choose("add_layernorm", cpu, None, (x, r, w, b, 1e-5)) is cpp_ops.add_layernorm_cpp
    bf16 = tuple(t.bfloat16() for t in (x, r, w, b)) + (1e-5,)
    assert dispatch.choose("add_layernorm", cpu, None, bf16) is cpp_ops.add_layernorm_cpp
    half = (x.half(), r.half(), w.half(), b.half(), 1e-5)
    assert dispatch.choose("add_layernorm", cpu, None, half) is add_layernorm_torch
    with pytest.raises(ValueError, match="float32 or bfloat16 only, got torch.float16"):
        add_layernorm(*half, backend="cpp")
    # bf16 activations with float32 weights: one dtype for all four, or the torch reference
    mixed = (*bf16[:2], w, b, 1e-5)
    assert dispatch.choose("add_layernorm", cpu, None, mixed) is add_layernorm_torch
    with pytest.raises(ValueError, match="must share one dtype"):
        add_layernorm(*mixed, backend="cpp")
    torch.testing.assert_close(add_layernorm(*mixed), add_layernorm(*mixed, backend="torch"), rtol=0, atol=0)


@needs_c
def test_bias_gelu_picks_cpp_for_float32_and_bfloat16_and_falls_back_otherwise():
    cpu = torch.device("cpu")
    x, bias = torch.randn(4, 16), torch.randn(16)
    for args in ((x, bias), (x, None), (x.bfloat16(), bias.bfloat16()), (x.bfloat16(), None)):
        assert dispatch.choose("bias_gelu", cpu, None, args) is cpp_ops.bias_gelu_cpp
    for args in ((x.half(), None), (x.bfloat16(), bias)):
        assert dispatch.choose("bias_gelu", cpu, None, args) is bias_gelu_torch
    with pytest.raises(ValueError, match="float32 or bfloat16 only, got torch.float16"):
        bias_gelu(x.half(), None, backend="cpp")
    with pytest.raises(ValueError, match="bias must have x's dtype torch.bfloat16, got torch.float32"):
        bias_gelu(x.bfloat16(), bias, backend="cpp")
    # the fallback computes the same thing through the public launcher
    torch.testing.assert_close(bias_gelu(x.half(), None), bias_gelu(x.half(), None, backend="torch"), rtol=0, atol=0)


def test_sign_dot_gpu_dispatch():
    """CUDA tensors get the Triton kernel where Triton imports, else the torch reference (never the CPU-only C++)."""
    sd = importlib.import_module("postembed_fast.kernels.sign_dot_topk")  # the module (the package has the function)

    want = sd.sign_dot_topk_torch if dispatch.TRITON_IMPORT_ERROR else sd.sign_dot_topk_triton
    assert dispatch.choose("sign_dot_topk", torch.device("cuda"), None) is want
    with pytest.raises(RuntimeError, match="not implemented"):
        dispatch.choose("sign_dot_topk", torch.device("cuda"), "cpp")


def test_the_suites_backend_list_follows_dispatch(kernel_backends):
    """Every op's tests run at least the torch reference here, and the compiled backend wherever
    dispatch says it is available (conftest.backends_for skips only what dispatch refuses)."""
    for op, backends in dispatch.implemented().items():
        here = kernel_backends(op, "cpu")
        assert "torch" in here, op
        for backend in backends:
            assert (backend in here) == (dispatch.unavailable_reason(backend, "cpu") is None), (op, backend)
