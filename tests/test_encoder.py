"""The padding-free encoder (postembed_fast/model.py) through the kernels: its forward pass on each
backend that runs every op it uses (Triton; backend=None, the default choice per op) against the torch
reference, and the per-thread activation workspace reused over batches of different sizes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()


def rel_err(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    assert not torch.isnan(out).any()
    return float((out - ref).norm() / ref.norm())


# Triton on a GPU in float32 and float16; on CPU tensors (the interpreter) in float32 only.
ENCODER_CASES = [pytest.param("triton", torch.float32, 1e-5, id="triton-float32"),
                 pytest.param("triton", torch.float16, 3e-3, id="triton-float16",
                              marks=pytest.mark.skipif(not CUDA, reason="float16 Triton runs on a GPU only here")),
                 pytest.param(None, torch.float32, 1e-5, id="default-float32")]


@pytest.mark.parametrize("backend, dtype, tol", ENCODER_CASES)
def test_encoder_matches_the_torch_reference(backend, dtype, tol, encoder_inputs, kernel_backends):
    from transformers import BertConfig, BertModel

    from postembed_fast.model import Encoder, EncoderConfig

    device = "cuda" if CUDA and backend == "triton" else "cpu"
    if backend is not None and backend not in kernel_backends("bias_gelu", device):  # the op Triton and torch have
        pytest.skip(f"backend={backend} does not run on {device} here")
    torch.manual_seed(0)
    hf = BertConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
                    vocab_size=100, max_position_embeddings=64)
    state = BertModel(hf).state_dict()
    cfg = EncoderConfig(model_type="bert", hidden=64, heads=4, layers=2, intermediate=128, vocab_size=100,
                        eps=hf.layer_norm_eps, position_offset=0)
    enc = Encoder(cfg, state, device, dtype, Path("."))
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 100, (n,), generator=g).tolist() for n in (1, 2, 7, 33, 64, 20)]
    packed = encoder_inputs(seqs, device)
    out = enc.forward(*packed, backend=backend)
    ref = enc.forward(*packed, backend="torch")
    assert out.shape == (sum(map(len, seqs)), 64)
    assert rel_err(out, ref.float()) < tol


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
