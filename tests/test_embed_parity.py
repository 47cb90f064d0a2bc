"""Parity with sentence-transformers / transformers: real posts, and random models of other shapes."""
from __future__ import annotations

import numpy as np
import pytest
import torch


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_parity_with_sentence_transformers_on_500_real_posts(embedder, st_model, posts):
    texts = posts[:500]
    ours = embedder.embed(texts)
    ref = st_model.encode(texts, batch_size=32, convert_to_numpy=True)
    assert ours.shape == ref.shape == (500, 384)
    assert ours.dtype == np.float32
    cos = cosines(ours, ref)
    assert cos.min() >= 0.99999, f"worst text {cos.argmin()}: cosine {cos.min()}"
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_every_device_and_dtype_is_within_its_tolerance(each_device, dtype, embedder, st_model, posts,
                                                        embeddings_close):
    """The tolerance table in conftest.py, which tests of the default device apply to whatever the
    default dtype is (float16 on a GPU), checked here for each dtype on each device of this machine
    against sentence-transformers in float32."""
    import torch

    from postembed_fast import Embedder

    dt = getattr(torch, dtype)
    texts = posts[:10] + ["", "We are hiring", "日本語のテキスト 🚀"]  # few: float16 on a CPU is slow
    e = embedder if (each_device, dt) == ("cpu", torch.float32) else Embedder(device=each_device, dtype=dt)
    assert e.device.type == each_device and e.dtype == dt
    ours = e.embed(texts)
    assert ours.dtype == np.float32 and np.isfinite(ours).all()
    embeddings_close(ours, st_model.encode(texts, batch_size=32), dt)
    if dt != torch.float32:  # the dtype is really used: not the float32 numbers
        assert not np.array_equal(ours, embedder.embed(texts))


def test_one_text_alone_equals_it_inside_a_large_mixed_batch(embedder, posts):
    batch = posts[:300] + ["", "   ", "We are hiring", "x " * 600]
    together = embedder.embed(batch)
    probe = [0, 7, 97, 129, 299, 300, 301, 302, 303]
    for i in probe:
        alone = embedder.embed(batch[i])
        assert alone.shape == (1, 384)
        cos = cosines(alone, together[i : i + 1])[0]
        assert cos >= 0.999999, (i, cos)


def test_output_order_is_input_order(embedder, posts):
    texts = posts[:60]
    fwd = embedder.embed(texts, batch_tokens=512)
    rev = embedder.embed(texts[::-1], batch_tokens=512)
    np.testing.assert_allclose(fwd, rev[::-1], atol=1e-5)
    # and the rows are not all the same vector (a constant output would pass the line above)
    assert cosines(fwd[:-1], fwd[1:]).min() < 0.99


def test_embed_iter_equals_embed(embedder, posts):
    texts = posts[:101]
    whole = embedder.embed(texts, batch_tokens=1000)
    chunks = list(embedder.embed_iter(iter(texts), chunk_size=37, batch_tokens=1000))
    assert [len(c) for c in chunks] == [37, 37, 27]
    np.testing.assert_allclose(np.concatenate(chunks), whole, atol=1e-5)


@pytest.mark.parametrize(
    "shape",
    [
        dict(model_type="bert", hidden=256, heads=4, layers=3, intermediate=512, pooling="cls", dense_out=64),
        dict(model_type="bert", hidden=128, heads=2, layers=2, intermediate=256, pooling="mean", dense_out=None),
        dict(model_type="roberta", hidden=96, heads=3, layers=2, intermediate=192, pooling="mean", dense_out=None),
    ],
    ids=["bert256-cls-dense64", "bert128-mean", "roberta96-mean"],
)
def test_parity_on_random_models_of_other_shapes(make_random_model, posts, shape):
    from sentence_transformers import SentenceTransformer

    from postembed_fast import Embedder

    folder = make_random_model(max_seq_length=64, **shape)
    texts = posts[:40] + ["", "short", "日本語のテキスト 🚀"]
    ref = SentenceTransformer(str(folder), device="cpu").encode(texts, batch_size=8)
    emb = Embedder(folder, device="cpu", dtype=torch.float32)  # exactness: float32 on every CPU
    assert emb.dim == (shape["dense_out"] or shape["hidden"])
    assert emb.max_seq_length == 64
    ours = emb.embed(texts)
    assert ours.shape == ref.shape
    cos = cosines(ours, ref)
    assert cos.min() >= 0.99999, cos.min()


def test_chunked_tokenization_keeps_order_and_values(embedder, posts, monkeypatch):
    import postembed_fast.pipeline as mod

    texts = posts[:23]
    want = embedder.embed(texts)
    monkeypatch.setattr(mod, "TOKENIZE_CHUNK", 5)  # 5 chunks, the next tokenized on a thread
    got = embedder.embed(texts, batch_tokens=300)
    assert cosines(got, want).min() >= 0.999999
