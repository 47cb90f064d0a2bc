"""C++ CPU varlen attention (csrc/attention_cpu.cpp, backend="cpp") against a float64
softmax reference: odd lengths mixed in one batch, strided views of a fused QKV buffer,
NaN-poisoned outputs, both builds (AVX2+FMA and baseline ISA), and the dispatch rules
that send what it does not take (fp16/bf16, other head dims) to the torch reference."""
from __future__ import annotations

import math

import pytest
import torch

from postembed_fast.kernels import _ext
from postembed_fast.kernels import cpp_ops, dispatch, varlen_attention
from postembed_fast.kernels.attention import varlen_attention_torch

pytestmark = pytest.mark.skipif(_ext._C is None, reason=f"compiled extension unavailable: {_ext.UNAVAILABLE_REASON}")
C = _ext._C

LENGTH_SETS = {
    "mixed": [1, 2, 7, 97, 129, 256, 300],
    "one-token": [1],
    "one-long": [513],
    "many-short": [1, 3, 2, 5, 1, 17] * 40,
}


def cu_of(lens):
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    return cu


def fused_qkv(T, heads, head_dim, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(T, 3, heads, head_dim, generator=g) * scale
    return qkv.unbind(1)  # strided views, as the encoder passes them


def ref64(q, k, v, lens, scale):
    out, start = [], 0
    for n in lens:
        qs, ks, vs = (t[start:start + n].double().transpose(0, 1) for t in (q, k, v))
        p = torch.softmax(qs @ ks.transpose(1, 2) * scale, dim=-1)
        out.append((p @ vs).transpose(0, 1))
        start += n
    return torch.cat(out)


def rel_err(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("lengths", list(LENGTH_SETS))
@pytest.mark.parametrize("heads, head_dim", [(3, 16), (2, 32), (1, 64), (2, 128)])
def test_matches_float64_reference(lengths, heads, head_dim, cpu_isa):
    lens = LENGTH_SETS[lengths]
    T = sum(lens)
    q, k, v = fused_qkv(T, heads, head_dim)
    scale = 1 / math.sqrt(head_dim)
    out = torch.full((T, heads, head_dim), float("nan"))
    got = cpp_ops.varlen_attention_cpp(q, k, v, cu_of(lens), max(lens), scale, out=out)
    assert got is out and not torch.isnan(out).any()
    assert rel_err(out, ref64(q, k, v, lens, scale)) < 1e-5


@pytest.mark.parametrize("scale", [-0.7, 0.0, 40.0])
def test_softmax_is_stable_for_any_scale(scale, cpu_isa):
    # 40 * (scores ~ +-100) spans thousands: the row max must be subtracted before exp;
    # a negative scale flips which score is largest.
    lens = [5, 64, 33]
    q, k, v = fused_qkv(sum(lens), 2, 32, seed=3, scale=2.0)
    out = varlen_attention(q, k, v, cu_of(lens), 64, scale=scale, backend="cpp")
    assert torch.isfinite(out).all()
    assert rel_err(out, ref64(q, k, v, lens, scale)) < 1e-5


def test_output_rows_may_be_strided_and_contiguous_inputs_work():
    lens = [9, 4, 31]
    T = sum(lens)
    q, k, v = (t.contiguous() for t in fused_qkv(T, 4, 16, seed=5))
    wide = torch.full((T, 4, 24), float("nan"))
    out = cpp_ops.varlen_attention_cpp(q, k, v, cu_of(lens), 31, 0.25, out=wide[:, :, :16])
    assert rel_err(out, ref64(q, k, v, lens, 0.25)) < 1e-5
    assert torch.isnan(wide[:, :, 16:]).all()  # nothing written outside the view


def test_thread_count_does_not_change_results():
    lens = LENGTH_SETS["mixed"]
    q, k, v = fused_qkv(sum(lens), 2, 32, seed=7)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = varlen_attention(q, k, v, cu_of(lens), 300, backend="cpp")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, varlen_attention(q, k, v, cu_of(lens), 300, backend="cpp"))


def test_dispatch_picks_cpp_for_float32_and_falls_back_otherwise():
    cpu = torch.device("cpu")
    q, k, v = fused_qkv(10, 2, 32)
    args = (q, k, v, cu_of([10]), 10, 0.2)
    assert dispatch.choose("varlen_attention", cpu, None, args) is cpp_ops.varlen_attention_cpp
    half = (q.half(), k.half(), v.half(), cu_of([10]), 10, 0.2)
    assert dispatch.choose("varlen_attention", cpu, None, half) is varlen_attention_torch
    q48, k48, v48 = fused_qkv(10, 2, 48)
    odd = (q48, k48, v48, cu_of([10]), 10, 0.2)
    assert dispatch.choose("varlen_attention", cpu, None, odd) is varlen_attention_torch
    # the fallbacks still compute the right thing through the public launcher
    out = varlen_attention(q48, k48, v48, cu_of([10]), 10)
    assert rel_err(out, ref64(q48, k48, v48, [10], 48 ** -0.5)) < 1e-5
    with pytest.raises(ValueError, match="float32 only"):
        varlen_attention(*half[:5], backend="cpp")
    with pytest.raises(ValueError, match="head_dim must be 16, 32, 64 or 128"):
        varlen_attention(*odd[:5], backend="cpp")


def test_raw_extension_rejects_bad_arguments():
    q, k, v = fused_qkv(6, 1, 32)
    out = torch.empty(6, 1, 32)
    good = dict(q=q.data_ptr(), sqt=q.stride(0), sqh=q.stride(1), k=k.data_ptr(), skt=k.stride(0), skh=k.stride(1),
                v=v.data_ptr(), svt=v.stride(0), svh=v.stride(1), out=out.data_ptr(), sot=32, soh=32,
                total_tokens=6, B=2, H=1, D=32, scale=0.1, num_threads=1)
    cu = cu_of([2, 4])
    C.varlen_attention_cpu(cu_seqlens=cu.data_ptr(), **good)
    assert torch.isfinite(out).all()
    cases = [
        (dict(D=48), "head_dim must be 16, 32, 64 or 128"),
        (dict(q=0), "q is a null pointer"),
        (dict(total_tokens=7), r"cu_seqlens\[-1\]=6 must equal total_tokens=7"),
        (dict(sot=16), "out rows overlap"),
        (dict(scale=float("nan")), "scale must be finite"),
        (dict(num_threads=0), "num_threads must be >= 1"),
    ]
    for override, match in cases:
        with pytest.raises(ValueError, match=match):
            C.varlen_attention_cpu(cu_seqlens=cu.data_ptr(), **{**good, **override})
    bad_cu = torch.tensor([0, 4, 4, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="strictly increasing"):
        C.varlen_attention_cpu(cu_seqlens=bad_cu.data_ptr(), **{**good, "B": 3})


def test_nan_in_keys_poisons_the_rows_that_see_it_like_torch():
    lens = [4, 6]
    q, k, v = (t.clone() for t in fused_qkv(10, 1, 16, seed=9))
    k[5, 0, 3] = float("nan")  # inside the second sequence only
    out = varlen_attention(q, k, v, cu_of(lens), 6, backend="cpp")
    ref = varlen_attention(q, k, v, cu_of(lens), 6, backend="torch")
    assert torch.isnan(out[4:]).all() and torch.isnan(ref[4:]).all()
    assert torch.isfinite(out[:4]).all()


def test_inputs_on_different_devices_are_refused():
    q, k, v = fused_qkv(4, 1, 16)
    with pytest.raises(ValueError, match="different devices"):
        varlen_attention(q, k.to("meta"), v, cu_of([4]), 4)


def test_single_token_output_may_have_any_token_stride():
    q, k, v = fused_qkv(1, 3, 64, seed=4)
    out = torch.full((3, 1, 64), float("nan")).transpose(0, 1)  # token stride 64 < 3 heads x 64
    cpp_ops.varlen_attention_cpp(q, k, v, cu_of([1]), 1, 0.125, out=out)
    assert rel_err(out, ref64(q, k, v, [1], 0.125)) < 1e-6
