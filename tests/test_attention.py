"""varlen_attention (kernels/attention.py) on every backend (torch reference, C++ in each ISA build,
Triton) against softmax(q k^T * scale) v written from the definition in float64: odd lengths mixed in
one batch, one token, long and many short sequences, strided views of a fused QKV buffer as the encoder
passes them, NaN-poisoned outputs, any softmax scale, NaN propagation, the launcher's argument checks;
the C++ kernel's bfloat16 path (fp32 math: its output is its float32 result rounded once).

Which backend takes which arguments (the C++ kernel: float32 or bfloat16, head_dim 16/32/64/128) and what
backend=None picks is tests/test_dispatch.py; the raw C++ entry point, tests/test_extension.py.
"""
from __future__ import annotations

import functools
import math
from collections import defaultdict

import pytest
import torch

from postembed_fast.kernels import _ext, varlen_attention
from postembed_fast.kernels import cpu_isa as cpu_isa_table

# 1 and 2 are shorter than any block, 129 is one past a 128 block, 256 exact blocks
LENGTHS = {
    "mixed": [1, 2, 7, 97, 129, 256, 300],
    "one-token": [1],
    "one-300": [300],
    "129+2": [129, 2],
    "small": [5, 1, 3],
    "one-long": [513],
    "many-short": [1, 3, 2, 5, 1, 17] * 40,
}
HEAD_SHAPES = [(2, 16), (3, 16), (2, 32), (3, 32), (1, 64), (2, 64), (2, 128), (4, 16), (4, 32), (4, 64), (4, 128)]
FLOAT_TOLS = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}  # on ||out - ref|| / ||ref||
# The C++ kernel computes in fp32 for either storage type: a bf16 output differs from the float64 result
# of the same (bf16) inputs by its one rounding, < 2^-9 relative per element.
CPP_TOLS = {torch.float32: 1e-5, torch.bfloat16: 2 ** -8}
INTERPRETED_LENGTHS = ("mixed", "one-300", "one-token", "129+2")


def cu_of(lens, device="cpu"):
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    return cu.to(device)


def fused_qkv(T, heads, head_dim, seed=0, scale=1.0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(T, 3, heads, head_dim, generator=g) * scale).to(dtype).to(device)
    return qkv.unbind(1)  # strided views of one buffer, as the encoder passes them


def reference(q, k, v, lens, scale):
    """float64 softmax(q k^T * scale) v within each sequence (the sequences of one length batched)."""
    q, k, v = (t.detach().double().cpu() for t in (q, k, v))
    out = torch.empty(q.shape, dtype=torch.float64)
    starts = torch.cumsum(torch.tensor([0, *lens[:-1]]), 0).tolist()
    of_length = defaultdict(list)
    for s, n in zip(starts, lens):
        of_length[n].append(s)
    for n, ss in of_length.items():
        rows = torch.tensor(ss)[:, None] + torch.arange(n)  # [sequences, n]
        qs, ks, vs = (t[rows].transpose(1, 2) for t in (q, k, v))  # [sequences, heads, n, head_dim]
        p = torch.softmax(qs @ ks.transpose(-1, -2) * scale, dim=-1)
        out[rows] = (p @ vs).transpose(1, 2)
    return out


@functools.lru_cache(maxsize=2)  # the backends of one case run one after another
def reference_of_case(lengths, heads, head_dim, dtype):
    q, k, v = fused_qkv(sum(LENGTHS[lengths]), heads, head_dim, dtype=dtype)
    return reference(q, k, v, LENGTHS[lengths], 1 / math.sqrt(head_dim))


def rel_err(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    assert not torch.isnan(out).any(), "NaN in the output: an element was never written"
    return float((out - ref).norm() / ref.norm())


def nan_out(shape, dtype=torch.float32, device="cpu"):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def takes(backend, device, lengths, heads, head_dim, dtype):
    if backend == "cpp" and dtype not in CPP_TOLS:
        return False  # float32 and bfloat16 only (its refusal of float16: tests/test_dispatch.py)
    if interpreted(backend, device):  # the interpreter is slow: short batches, two heads, no 128
        return lengths in INTERPRETED_LENGTHS and heads == 2 and head_dim <= 64
    return heads != 4 or device == "cuda"  # four heads: the GPU's size


def interpreted(backend, device):
    return backend == "triton" and device == "cpu"


CASES = [(lens, heads, head_dim, dtype) for lens in LENGTHS for heads, head_dim in HEAD_SHAPES for dtype in FLOAT_TOLS]


@pytest.mark.backends("varlen_attention", "lengths, heads, head_dim, dtype", CASES, cpu_isa=True, keep=takes)
def test_matches_float64_reference(backend, device, lengths, heads, head_dim, dtype):
    lens = LENGTHS[lengths]
    T = sum(lens)
    q, k, v = fused_qkv(T, heads, head_dim, dtype=dtype, device=device)
    assert T == 1 or not q.is_contiguous()
    scale = 1 / math.sqrt(head_dim)
    ref = reference_of_case(lengths, heads, head_dim, dtype)
    out = nan_out((T, heads, head_dim), dtype, device)
    got = varlen_attention(q, k, v, cu_of(lens, device), max(lens), scale, backend=backend, out=out)
    assert got is out and out.dtype == dtype and not torch.isnan(out).any()
    tol = (CPP_TOLS if backend == "cpp" else FLOAT_TOLS)[dtype]
    assert rel_err(out, ref) < tol
    if backend != "triton":  # a fresh output: contiguous [T, heads, head_dim]
        fresh = varlen_attention(q, k, v, cu_of(lens, device), max(lens), scale, backend=backend)
        assert fresh.shape == (T, heads, head_dim) and fresh.is_contiguous() and fresh.dtype == dtype
        assert rel_err(fresh, ref) < tol


@pytest.mark.backends("varlen_attention", "lengths", [("mixed",), ("one-token",), ("129+2",), ("many-short",)],
                      cpu_isa=True, keep=lambda backend, device, lengths: backend == "cpp")
@pytest.mark.parametrize("heads, head_dim", [(12, 32), (2, 64), (3, 16), (1, 128)])
def test_cpp_bfloat16_is_its_float32_result_rounded_once(backend, device, lengths, heads, head_dim):
    """The AVX2 and baseline builds convert bf16 to fp32 exactly and run the float32 code: a bf16 output
    is bit for bit the float32 kernel's output on the same values, rounded to nearest even (torch's
    .to(bfloat16)). The AVX512-BF16 build takes its dot products in vdpbf16ps (probabilities rounded to
    bf16 for P V): there, within two roundings of the float64 result."""
    lens = LENGTHS[lengths]
    T = sum(lens)
    q, k, v = fused_qkv(T, heads, head_dim, seed=11, dtype=torch.bfloat16)
    cu = cu_of(lens)
    out = nan_out((T, heads, head_dim), torch.bfloat16)
    varlen_attention(q, k, v, cu, max(lens), backend=backend, out=out)
    want32 = varlen_attention(q.float(), k.float(), v.float(), cu, max(lens), backend=backend)
    if not cpu_isa_table.features().get("avx512_bf16", False):  # at this (capped) level
        assert torch.equal(out, want32.to(torch.bfloat16))
    assert rel_err(out, reference(q, k, v, lens, head_dim ** -0.5)) < CPP_TOLS[torch.bfloat16]


@pytest.fixture
def pair_dot_emulated():
    """bf16 attention through the portable emulation of the AVX512-BF16 build (its layouts: K^T as bf16
    pairs along head_dim, V as pairs of tokens, probabilities rounded to bf16; vdpbf16ps's operation order)."""
    if _ext._C is None:
        pytest.skip(f"compiled extension unavailable: {_ext.UNAVAILABLE_REASON}")
    prev = _ext._C._set_attention_pair_dot_emulated(True)
    try:
        yield
    finally:
        _ext._C._set_attention_pair_dot_emulated(prev)


@pytest.mark.parametrize("lengths", ["mixed", "one-token", "129+2", "small", "one-long", "many-short"])
@pytest.mark.parametrize("heads, head_dim", [(2, 16), (3, 32), (12, 32), (2, 64), (1, 128)])
def test_avx512_bf16_build_layouts_emulated(pair_dot_emulated, lengths, heads, head_dim):
    """The AVX512-BF16 build's code on any CPU (its instruction emulated): odd lengths (the last token
    pairs with zeros), one token, many short sequences, every head_dim; NaN-poisoned output fully written,
    within 2^-8 of float64 like the fp32 builds, and NaN keys poison only their own sequence."""
    lens = LENGTHS[lengths]
    T = sum(lens)
    q, k, v = fused_qkv(T, heads, head_dim, seed=13, dtype=torch.bfloat16)
    out = nan_out((T, heads, head_dim), torch.bfloat16)
    varlen_attention(q, k, v, cu_of(lens), max(lens), backend="cpp", out=out)
    assert rel_err(out, reference(q, k, v, lens, head_dim ** -0.5)) < CPP_TOLS[torch.bfloat16]
    if len(lens) > 1:
        k = k.clone()
        k[lens[0], 0, 1] = float("nan")  # first token of the second sequence, head 0
        got = varlen_attention(q, k, v, cu_of(lens), max(lens), backend="cpp")
        assert torch.isnan(got[lens[0]:lens[0] + lens[1], 0]).all()
        assert not torch.isnan(got[:lens[0]]).any() and not torch.isnan(got[lens[0]:, 1:]).any()


@pytest.mark.backends("varlen_attention", cpu_isa=True)
@pytest.mark.parametrize("scale", [-0.7, 0.0, 40.0])
def test_softmax_is_stable_for_any_scale(backend, device, scale):
    # 40 * (scores ~ +-100) spans thousands: the row max must be subtracted before exp;
    # a negative scale flips which score is largest.
    lens = [5, 64, 33]
    q, k, v = fused_qkv(sum(lens), 2, 32, seed=3, scale=2.0, device=device)
    out = varlen_attention(q, k, v, cu_of(lens, device), 64, scale=scale, backend=backend)
    assert torch.isfinite(out).all()
    assert rel_err(out, reference(q, k, v, lens, scale)) < 1e-5


@pytest.mark.backends("varlen_attention", "dtype", [(torch.float32,), (torch.float16,), (torch.bfloat16,)],
                      keep=lambda backend, device, dtype: backend != "cpp" or dtype in CPP_TOLS)
def test_contiguous_inputs_and_the_default_scale(backend, device, dtype):
    """Separate contiguous q, k, v (not views of one buffer), scale left to the launcher (head_dim ** -0.5)."""
    g = torch.Generator().manual_seed(1)
    lens = [5, 40, 17]
    q, k, v = (torch.randn(sum(lens), 2, 64, generator=g).to(dtype).to(device) for _ in range(3))
    out = varlen_attention(q, k, v, cu_of(lens, device), max(lens), backend=backend)
    assert rel_err(out, reference(q, k, v, lens, 64 ** -0.5)) < FLOAT_TOLS[dtype]


@pytest.mark.backends("varlen_attention")
def test_output_rows_may_be_strided_and_contiguous_inputs_work(backend, device):
    lens = [9, 4, 31]
    T = sum(lens)
    q, k, v = (t.contiguous() for t in fused_qkv(T, 4, 16, seed=5, device=device))
    wide = nan_out((T, 4, 24), device=device)
    out = varlen_attention(q, k, v, cu_of(lens, device), 31, 0.25, backend=backend, out=wide[:, :, :16])
    assert rel_err(out, reference(q, k, v, lens, 0.25)) < 1e-5
    assert torch.isnan(wide[:, :, 16:]).all()  # nothing written outside the view


@pytest.mark.backends("varlen_attention")
def test_single_token_output_may_have_any_token_stride(backend, device):
    q, k, v = fused_qkv(1, 3, 64, seed=4, device=device)
    out = nan_out((3, 1, 64), device=device).transpose(0, 1)  # token stride 64 < 3 heads x 64
    varlen_attention(q, k, v, cu_of([1], device), 1, 0.125, backend=backend, out=out)
    assert rel_err(out, reference(q, k, v, [1], 0.125)) < 1e-6


@pytest.mark.backends("varlen_attention")
def test_out_is_written_whole(backend, device):
    lens = [3, 1, 12]
    cu = cu_of(lens, device)
    q, k, v = torch.randn(16, 3, 2, 16).to(device).unbind(1)
    out = nan_out((16, 2, 16), device=device)
    assert varlen_attention(q, k, v, cu, max(lens), backend=backend, out=out) is out
    torch.testing.assert_close(out, varlen_attention(q, k, v, cu, max(lens), backend="torch"))
    with pytest.raises(ValueError, match="out must be"):
        varlen_attention(q, k, v, cu, 12, backend=backend, out=torch.empty(16, 2, 15, device=device))


@pytest.mark.backends("varlen_attention")
def test_nan_in_keys_poisons_the_rows_that_see_it_like_torch(backend, device):
    lens = [4, 6]
    q, k, v = (t.clone() for t in fused_qkv(10, 1, 16, seed=9, device=device))
    k[5, 0, 3] = float("nan")  # inside the second sequence only
    out = varlen_attention(q, k, v, cu_of(lens, device), 6, backend=backend)
    ref = varlen_attention(q, k, v, cu_of(lens, device), 6, backend="torch")
    assert torch.isnan(out[4:]).all() and torch.isnan(ref[4:]).all()
    assert torch.isfinite(out[:4]).all()


@pytest.mark.skipif(_ext._C is None, reason=f"compiled extension unavailable: {_ext.UNAVAILABLE_REASON}")
def test_thread_count_does_not_change_the_cpp_results():
    lens = LENGTHS["mixed"]
    q, k, v = fused_qkv(sum(lens), 2, 32, seed=7)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = varlen_attention(q, k, v, cu_of(lens), 300, backend="cpp")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, varlen_attention(q, k, v, cu_of(lens), 300, backend="cpp"))


def test_default_backend_explicit_scale_and_fp16():
    torch.manual_seed(1)
    lens = [7, 33]
    q, k, v = (torch.randn(40, 2, 16) for _ in range(3))
    ref = reference(q, k, v, lens, 0.3)
    assert rel_err(varlen_attention(q, k, v, cu_of(lens), 33, scale=0.3), ref) < 1e-5
    out16 = varlen_attention(q.half(), k.half(), v.half(), cu_of(lens), 33, scale=0.3)
    assert out16.dtype == torch.float16 and rel_err(out16, ref) < 5e-3


def test_launcher_arguments_are_checked():
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    q = torch.randn(10, 2, 4)
    with pytest.raises(ValueError, match="longest"):
        varlen_attention(q, q, q, cu, max_seqlen=5)
    with pytest.raises(ValueError, match="shapes differ"):
        varlen_attention(q, q, q[:, :1], cu, 7)
    with pytest.raises(ValueError, match="stride"):
        varlen_attention(q.transpose(1, 2).contiguous().transpose(1, 2), q, q, cu, 7)
    q, k, v = fused_qkv(4, 1, 16)
    with pytest.raises(ValueError, match="different devices"):
        varlen_attention(q, k.to("meta"), v, cu_of([4]), 4)
