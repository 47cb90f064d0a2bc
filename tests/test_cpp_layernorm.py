"""C++ CPU add_layernorm (csrc/layernorm_cpu.cpp, backend="cpp") against a float64
reference, in place and out of place, with NaN-poisoned outputs; the launchers' `out=`
(which the encoder uses to keep its activations in a reused workspace) on every backend
that runs here; and the workspace itself."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from postembed_fast.kernels import _ext
from postembed_fast.kernels import add_layernorm, bias_gelu, cpp_ops, dispatch, varlen_attention
from postembed_fast.kernels.layernorm import add_layernorm_torch

needs_c = pytest.mark.skipif(_ext._C is None, reason=f"compiled extension unavailable: {_ext.UNAVAILABLE_REASON}")


def inputs(rows, H, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, r = torch.randn(rows, H, generator=g) * 3, torch.randn(rows, H, generator=g) + 0.5
    w, b = torch.randn(H, generator=g), torch.randn(H, generator=g)
    return x, r, w, b


def ref64(x, r, w, b, eps):
    return F.layer_norm(x.double() + r.double(), (x.shape[-1],), w.double(), b.double(), eps)


@needs_c
@pytest.mark.parametrize("rows", [1, 7, 97, 4097])
@pytest.mark.parametrize("H", [384, 250, 768, 1])
@pytest.mark.parametrize("where", ["fresh", "into-x", "into-residual", "poisoned-buffer"])
def test_cpp_add_layernorm_matches_float64(rows, H, where, cpu_isa):
    x, r, w, b = inputs(rows, H)
    ref = ref64(x, r, w, b, 1e-12)
    out = {"fresh": None, "into-x": x, "into-residual": r,
           "poisoned-buffer": torch.full((rows, H), float("nan"))}[where]
    got = cpp_ops.add_layernorm_cpp(x, r, w, b, 1e-12, out=out)
    assert out is None or got is out
    assert not torch.isnan(got).any()
    assert float((got.double() - ref).abs().max()) < 1e-5


@needs_c
def test_cpp_add_layernorm_broadcast_and_strided_rows():
    x, r, w, b = inputs(33, 64, seed=1)
    row = torch.randn(64)
    got = cpp_ops.add_layernorm_cpp(x, row.expand(33, 64), w, b, 1e-5)  # stride-0 residual rows
    assert float((got.double() - ref64(x, row.expand(33, 64), w, b, 1e-5)).abs().max()) < 1e-5
    wide = torch.randn(33, 100)
    got = cpp_ops.add_layernorm_cpp(wide[:, 10:74], r[:, :64].contiguous(), w, b, 1e-5)  # row pitch 100
    assert float((got.double() - ref64(wide[:, 10:74], r[:, :64], w, b, 1e-5)).abs().max()) < 1e-5


@needs_c
def test_cpp_add_layernorm_dispatch_and_refusals():
    cpu = torch.device("cpu")
    x, r, w, b = inputs(4, 16)
    assert dispatch.choose("add_layernorm", cpu, None, (x, r, w, b, 1e-5)) is cpp_ops.add_layernorm_cpp
    half = (x.half(), r.half(), w.half(), b.half(), 1e-5)
    assert dispatch.choose("add_layernorm", cpu, None, half) is add_layernorm_torch
    with pytest.raises(ValueError, match="float32 only"):
        add_layernorm(*half, backend="cpp")
    big = torch.zeros(8, 16)
    with pytest.raises(ValueError, match="out must be x itself or not overlap it"):
        cpp_ops.add_layernorm_cpp(big[:4], r, w, b, 1e-5, out=big[2:6])
    with pytest.raises(ValueError, match="eps must be finite"):
        _ext._C.add_layernorm_cpu(x.data_ptr(), 16, r.data_ptr(), 16, w.data_ptr(), b.data_ptr(), x.data_ptr(), 16,
                                  4, 16, float("inf"), 1)
    with pytest.raises(ValueError, match="row pitches must be >= H"):
        _ext._C.add_layernorm_cpu(x.data_ptr(), 8, r.data_ptr(), 16, w.data_ptr(), b.data_ptr(), x.data_ptr(), 16,
                                  4, 16, 1e-5, 1)


BACKENDS_HERE = ["torch"] + (["cpp"] if _ext._C is not None else []) + (
    ["triton"] if dispatch.unavailable_reason("triton", "cpu") is None else [])  # under TRITON_INTERPRET=1


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_launcher_out_in_place(backend):
    x, r, w, b = inputs(9, 32, seed=2)
    ref = add_layernorm(x, r, w, b, 1e-6, backend="torch")
    xi = x.clone()
    assert add_layernorm(xi, r, w, b, 1e-6, backend=backend, out=xi) is xi
    torch.testing.assert_close(xi, ref, rtol=1e-5, atol=1e-5)
    ri = r.clone()
    assert add_layernorm(x, ri, w, b, 1e-6, backend=backend, out=ri) is ri
    torch.testing.assert_close(ri, ref, rtol=1e-5, atol=1e-5)
    gelu_backend = "torch" if backend == "cpp" else backend  # no C++ GELU: torch's in-place gelu_ is used
    h = x.clone()
    assert bias_gelu(h, None, backend=gelu_backend, out=h) is h
    torch.testing.assert_close(h, F.gelu(x.double()).float(), rtol=1e-5, atol=1e-5)
    h = x.clone()
    assert bias_gelu(h, torch.ones(32), backend=gelu_backend, out=h) is h
    torch.testing.assert_close(h, F.gelu(x.double() + 1).float(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="out must be a torch.float32 tensor of shape"):
        add_layernorm(x, r, w, b, 1e-6, backend=backend, out=torch.empty(9, 31))


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_attention_out_is_written_whole(backend):
    lens = [3, 1, 12]
    cu = torch.tensor([0, 3, 4, 16], dtype=torch.int32)
    q, k, v = torch.randn(16, 3, 2, 16).unbind(1)
    out = torch.full((16, 2, 16), float("nan"))
    assert varlen_attention(q, k, v, cu, max(lens), backend=backend, out=out) is out
    torch.testing.assert_close(out, varlen_attention(q, k, v, cu, max(lens), backend="torch"))
    with pytest.raises(ValueError, match="out must be"):
        varlen_attention(q, k, v, cu, 12, backend=backend, out=torch.empty(16, 2, 15))


def test_workspace_reuse_matches_fresh_buffers(make_random_model, encoder_inputs):
    """One workspace over batches of different sizes (grow, then shrink) = fresh buffers each time."""
    from postembed_fast import Embedder
    from postembed_fast.model import Workspace

    e = Embedder(make_random_model(), device="cpu")
    ws = Workspace()
    g = torch.Generator().manual_seed(0)
    for lens in ([5, 17, 3], [e.max_seq_length] * 40 + [20, 1, 9], [2]):  # grows past 256 rows
        seqs = [torch.randint(0, e.encoder.config.vocab_size, (n,), generator=g).tolist() for n in lens]
        args = encoder_inputs(seqs)
        fresh = e.encoder.forward(*args)
        reused = e.encoder.forward(*args, workspace=ws)
        assert torch.equal(fresh, reused)


@needs_c
def test_cpp_add_layernorm_broadcast_x_and_device_mismatch():
    x, r, w, b = inputs(5, 32, seed=6)
    row = torch.randn(32)
    got = add_layernorm(row.expand(5, 32), r, w, b, 1e-5, backend="cpp")  # x with row stride 0
    assert float((got.double() - ref64(row.expand(5, 32), r, w, b, 1e-5)).abs().max()) < 1e-5
    with pytest.raises(ValueError, match="weight is on meta"):
        add_layernorm(x, r, w.to("meta"), b, 1e-5)
