"""The public API: fast_embed / Embedder arguments, precisions, dimensions, bad input, threads."""
from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import postembed_fast
from postembed_fast import Embedder, fast_embed

TEXTS = [
    "Excited to share our new paper on post embeddings!",
    "We are hiring",
    "",
    "   \t\n ",
    "emoji 🚀🔥👩‍💻 and RTL שלום עולם مرحبا",
    "CJK 日本語のテキスト 中文 한국어",
    "zero\u200bwidth\u200djoiner and control \x07\x1b chars",
    "NUL \x00 inside",
    "accents: café naïve Ångström",
]


# ---- basics ------------------------------------------------------------------------------
# `embedder` is the CPU float32 reference; fast_embed() without device= runs on this machine's
# default device and dtype (CUDA float16 where there is a GPU), hence the dtype's tolerance.
def test_fast_embed_returns_normalized_float32_in_input_order(embedder, default_dtype, embeddings_close):
    emb = fast_embed(TEXTS[:2])  # default device
    assert isinstance(emb, np.ndarray) and emb.shape == (2, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    embeddings_close(emb, embedder.embed(TEXTS[:2]), default_dtype)
    assert float(emb[0] @ emb[1]) < 0.9  # two different posts are different vectors


def test_fast_embed_on_the_cpu_equals_a_cpu_embedder(embedder):
    # another Embedder (the cached one), the same float32 math: float32 spelled out, as the CPU's default
    # compute dtype may be bfloat16 (kernels/cpu_isa.py's table)
    emb = fast_embed(TEXTS[:2], device="cpu", dtype=torch.float32)
    assert emb.dtype == np.float32
    np.testing.assert_allclose(emb, embedder.embed(TEXTS[:2]), atol=1e-6)


def test_fast_embed_reuses_one_cached_embedder(default_device, default_dtype):
    from postembed_fast.embedder import get_embedder
    from postembed_fast.kernels import cpu_isa

    default = get_embedder()
    assert default.device.type == default_device and default.dtype == default_dtype
    # device=None and the default spelled out ("cuda" = "cuda:N") are one cached Embedder, not two
    assert default is get_embedder(None, default_device, default_dtype)
    # the model's name and the CPU's default dtype (the capability table's) spelled out: one Embedder too
    cpu_default = get_embedder("all-MiniLM-L6-v2", "cpu")
    assert cpu_default.dtype == cpu_isa.compute_dtype()[0]
    assert cpu_default is get_embedder(None, "cpu", cpu_isa.compute_dtype()[0])
    assert (get_embedder(None, "cpu", torch.float32) is cpu_default) == (cpu_default.dtype == torch.float32)


def test_a_single_str_gives_one_row(embedder, default_dtype, embeddings_close):
    one = fast_embed("We are hiring")  # default device
    assert one.shape == (1, 384)
    embeddings_close(one, embedder.embed(["We are hiring"]), default_dtype)


def test_empty_list_gives_zero_rows(embedder):
    for precision, cols, dtype in [("float32", 384, np.float32), ("int8", 384, np.int8), ("binary", 48, np.int8)]:
        out = embedder.embed([], precision=precision)
        assert out.shape == (0, cols) and out.dtype == dtype
    out = fast_embed([], output="torch")  # default device; zero texts: no forward pass, the same everywhere
    assert out.shape == (0, 384) and out.dtype == torch.float32


def test_output_torch(embedder):
    out = embedder.embed(TEXTS[:3], output="torch")
    assert isinstance(out, torch.Tensor) and out.shape == (3, 384) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), embedder.embed(TEXTS[:3]), atol=1e-6)


def test_properties(embedder):
    assert embedder.dim == 384
    assert embedder.max_seq_length == 256
    r = embedder.quantization_ranges
    assert r.shape == (2, 384) and r.dtype == np.float32 and (r[1] > r[0]).all()
    r[:] = 0  # a copy: the embedder's ranges are not writable through it
    assert (embedder.quantization_ranges[1] > embedder.quantization_ranges[0]).all()


def test_info():
    info = postembed_fast.info()
    for key in ("version", "cpu_ext", "cuda_ext", "triton", "cuda_available"):
        assert key in info
    assert info["version"] == postembed_fast.__version__
    assert info["cuda_available"] == torch.cuda.is_available()
    assert info["cpu_ext"] is True, info["cpu_ext_error"]  # the wheel always builds the C++ part


def test_import_does_not_touch_the_gpu(tmp_path):
    code = "import torch, postembed_fast; postembed_fast.info(); print(torch.cuda.is_initialized())"
    # cwd away from the repo root, so the installed package is imported, not the source tree
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "False"


# ---- unicode, empty and long texts: like sentence-transformers ---------------------------
def test_unicode_empty_and_whitespace_texts_match_sentence_transformers(embedder, st_model, cos):
    ours = embedder.embed(TEXTS)
    ref = st_model.encode(TEXTS, batch_size=32)
    assert np.isfinite(ours).all()
    assert cos(ours, ref).min() >= 0.99999


def test_long_texts_are_truncated_like_sentence_transformers(embedder, st_model, posts, cos):
    long = " ".join(posts[:40])  # thousands of tokens
    ids = embedder.tokenize([long])[0]
    assert len(ids) == embedder.max_seq_length
    ours = embedder.embed([long, long[:200]])
    ref = st_model.encode([long, long[:200]])
    assert cos(ours, ref).min() >= 0.99999
    assert cos(ours[:1], ours[1:])[0] < 0.9999  # truncation kept 256 tokens, not 200 characters


# ---- precisions: against numpy references of the contract formulas ------------------------
@pytest.mark.parametrize("precision", ["float16", "int8", "uint8", "binary", "ubinary"])
def test_every_precision_matches_the_numpy_reference(embedder, posts, precision, reference_quantize, tie_mask):
    texts = posts[:64] + TEXTS
    x = embedder.embed(texts)
    ranges = embedder.quantization_ranges
    got = embedder.embed(texts, precision=precision)
    want = reference_quantize(x, precision, ranges)
    assert got.dtype == want.dtype and got.shape == want.shape
    if precision in ("int8", "uint8"):
        # Codes are computed from the same float32 math; only exact rounding ties may differ (by 1).
        diff = got.astype(np.int32) - want.astype(np.int32)
        assert (np.abs(diff) <= 1).all()
        assert (diff[~tie_mask(x, ranges)] == 0).all()
        assert len(np.unique(got)) > 50  # real spread over the code range, not a constant
    elif precision == "float16":
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=1e-3, atol=1e-4)
    else:
        np.testing.assert_array_equal(got, want)


def test_binary_bits_follow_numpy_packbits_msb_first(embedder):
    x = embedder.embed(TEXTS[:4])
    ub = embedder.embed(TEXTS[:4], precision="ubinary")
    assert ub.shape == (4, 48)
    bits = np.unpackbits(ub, axis=1)  # MSB first
    np.testing.assert_array_equal(bits.astype(bool), x > 0)
    b = embedder.embed(TEXTS[:4], precision="binary")
    np.testing.assert_array_equal(b.astype(np.int16) + 128, ub.astype(np.int16))


def test_codes_of_a_text_do_not_depend_on_the_rest_of_the_call(embedder, posts):
    alone = embedder.embed(posts[3], precision="int8")
    with_others = embedder.embed(posts[:50], precision="int8")
    assert np.abs(alone[0].astype(int) - with_others[3].astype(int)).max() <= 1


def test_dimensions_truncates_and_renormalizes(embedder, posts):
    full = embedder.embed(posts[:20])
    for k in (1, 64, 383):
        got = embedder.embed(posts[:20], dimensions=k)
        want = full[:, :k] / np.linalg.norm(full[:, :k], axis=1, keepdims=True)
        assert got.shape == (20, k)
        np.testing.assert_allclose(got, want, atol=2e-6)
    np.testing.assert_allclose(embedder.embed(posts[:5], dimensions=384), full[:5], atol=1e-6)
    packed = embedder.embed(posts[:20], dimensions=12, precision="ubinary")
    np.testing.assert_array_equal(packed, np.packbits(full[:, :12] > 0, axis=1))


def test_truncate_dim_of_the_folder_or_the_call_sets_the_served_width(embedder, posts, tmp_path):
    """A folder whose config_sentence_transformers.json says truncate_dim=k (no Dense here) serves the
    first k dimensions re-normalized, as dimensions=k does; truncate_dim= at construction overrides it;
    the default model's shipped ranges apply only at its own width; a bad value is named."""
    import json
    import shutil

    from postembed_fast.loading import default_model_folder

    src = default_model_folder()
    folder = tmp_path / "truncated"
    shutil.copytree(src, folder)
    cfg = json.loads((folder / "config_sentence_transformers.json").read_text())
    (folder / "config_sentence_transformers.json").write_text(json.dumps({**cfg, "truncate_dim": 96}))
    e = Embedder(folder, device="cpu", dtype=embedder.dtype)
    assert (e.dim, e.full_dim) == (96, 384) and e.quantization_ranges is None
    want = embedder.embed(posts[:12], dimensions=96)
    np.testing.assert_allclose(e.embed(posts[:12]), want, atol=2e-6)
    np.testing.assert_allclose(e.embed(posts[:12], dimensions=40), embedder.embed(posts[:12], dimensions=40), atol=2e-6)
    wide = Embedder(folder, device="cpu", dtype=embedder.dtype, truncate_dim=384)
    np.testing.assert_allclose(wide.embed(posts[:12]), embedder.embed(posts[:12]), atol=2e-6)
    assert Embedder(device="cpu", dtype=embedder.dtype, truncate_dim=200).quantization_ranges is None
    assert Embedder(device="cpu", dtype=embedder.dtype, truncate_dim=384).quantization_ranges is not None
    with pytest.raises(ValueError, match=r"truncate_dim must be None or an int in \[1, 384\], got 385"):
        Embedder(folder, device="cpu", truncate_dim=385)
    (folder / "config_sentence_transformers.json").write_text(json.dumps({**cfg, "truncate_dim": "50"}))
    with pytest.raises(ValueError, match="truncate_dim must be a positive integer or null, got '50'"):
        Embedder(folder, device="cpu")


def test_normalize_false_returns_the_raw_pooled_vector(embedder, posts):
    raw = embedder.embed(posts[:5], normalize=False)
    norms = np.linalg.norm(raw, axis=1)
    assert (np.abs(norms - 1) > 1e-3).all()
    np.testing.assert_allclose(raw / norms[:, None], embedder.embed(posts[:5]), atol=1e-5)


def test_other_models_need_calibration_or_ranges_for_int8(make_random_model, posts, reference_quantize, each_device):
    folder = make_random_model(hidden=64, heads=2, layers=1, intermediate=128, pooling="mean", max_seq_length=32)
    emb = Embedder(folder, device=each_device)  # its default dtype; codes are compared with its own floats
    assert emb.quantization_ranges is None
    with pytest.raises(ValueError, match="calibrate"):
        emb.embed(["a post"], precision="int8")
    with pytest.raises(ValueError, match="calibrate"):
        fast_embed(["a post"], model=folder, device=each_device, precision="uint8")
    assert emb.embed(["a post"], precision="binary").shape == (1, 8)  # binary needs no ranges
    x = emb.embed(posts[:30])
    r = emb.calibrate(posts[100:300])
    np.testing.assert_array_equal(r, emb.quantization_ranges)
    assert r.shape == (2, 64) and (r[1] > r[0]).all()
    got = emb.embed(posts[:30], precision="uint8")
    assert np.abs(got.astype(int) - reference_quantize(x, "uint8", r).astype(int)).max() <= 1
    # ranges= overrides, and truncated dimensions get their own ranges from the calibration set
    explicit = np.stack([np.full(64, -1.0), np.full(64, 1.0)]).astype(np.float32)
    got = emb.embed(posts[:30], precision="uint8", ranges=explicit)
    assert np.abs(got.astype(int) - reference_quantize(x, "uint8", explicit).astype(int)).max() <= 1
    assert emb.embed(posts[:3], precision="int8", dimensions=16).shape == (3, 16)


# ---- bad input: clear exceptions ---------------------------------------------------------
@pytest.mark.parametrize(
    "texts, match",
    [
        (["ok", 3, "ok"], r"texts\[1\]"),
        (["ok", None], r"texts\[1\]"),
        (["ok", b"bytes"], r"texts\[1\]"),
        ([["nested"]], r"texts\[0\]"),
        (42, "str or a sequence"),
        (None, "str or a sequence"),
        (b"bytes", "str or a sequence"),
        ((t for t in ["a generator"]), "embed_iter"),
    ],
)
def test_non_text_input_raises_type_error_naming_the_problem(texts, match):
    with pytest.raises(TypeError, match=match):
        fast_embed(texts)  # checked before any model loads: no device involved


def test_embed_iter_names_the_bad_index(embedder):
    with pytest.raises(TypeError, match=r"texts\[5\]"):
        list(embedder.embed_iter(["a"] * 5 + [7], chunk_size=2))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(precision="int4"), "float32, float16, int8, uint8, binary, ubinary"),
        (dict(output="list"), "numpy, torch"),
        (dict(dimensions=0), "dimensions"),
        (dict(dimensions=385), "dimensions"),
        (dict(dimensions=2.5), "dimensions"),
        (dict(batch_tokens=0), "batch_tokens"),
        (dict(device="tpu"), "'cpu', 'cuda'"),
        (dict(device="not a device"), "'cpu', 'cuda'"),
        (dict(dtype="int8"), "torch.float32"),
        (dict(model="no-such-model"), "all-MiniLM-L6-v2"),
        (dict(precision="int8", normalize=False), "normalize=False"),
        (dict(precision="int8", ranges=np.zeros((2, 10))), r"\(2, 384\)"),
        (dict(precision="int8", dimensions=64), "calibrate"),
    ],
)
def test_bad_arguments_raise_value_error_listing_valid_choices(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fast_embed(["a post"], **{"device": "cpu", **kwargs})  # the checks do not depend on the device


def test_bad_ranges_values_are_rejected(embedder):
    flat = np.zeros((2, 384), np.float32)
    with pytest.raises(ValueError, match="greater than"):
        embedder.embed(["a post"], precision="uint8", ranges=flat)
    nan = np.stack([np.full(384, -1.0), np.full(384, np.nan)])
    with pytest.raises(ValueError, match="finite"):
        embedder.embed(["a post"], precision="uint8", ranges=nan)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_raises_a_clear_error():
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        fast_embed(["a post"], device="cuda")


def test_model_folder_missing_pieces(tmp_path, default_folder):
    import shutil

    with pytest.raises(ValueError, match="config.json"):
        Embedder(tmp_path, device="cpu")  # an empty folder
    broken = tmp_path / "m"
    shutil.copytree(default_folder, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="model.safetensors"):
        Embedder(broken, device="cpu")
    cfg = (broken / "config.json").read_text().replace('"bert"', '"gpt2"')
    (broken / "config.json").write_text(cfg)
    with pytest.raises(ValueError, match="model_type"):
        Embedder(broken, device="cpu")


# ---- the tokenized seam: tokenize_flat -> TokenizedTexts -> embed ---------------------------
def test_tokenize_flat_round_trip_equals_embed_of_the_texts(embedder, posts):
    from postembed_fast.tokenization import TokenizedTexts

    texts = posts[:64] + TEXTS
    tok = embedder.tokenize_flat(texts)
    assert isinstance(tok, TokenizedTexts) and len(tok) == len(texts) and tok.model_tag == embedder.model_tag
    assert tok.ids.dtype == np.int32 and tok.offsets.dtype == np.int64 and tok.offsets.shape == (len(texts) + 1,)
    lists = embedder.tokenize(texts)
    assert tok.tolist() == lists and tok.lengths.tolist() == [len(x) for x in lists]
    assert tok.tokens == sum(map(len, lists)) and tok.lengths.max() <= embedder.max_seq_length
    for kwargs in ({}, dict(precision="int8"), dict(precision="binary"), dict(dimensions=64, normalize=False),
                   dict(batch_tokens=300)):  # exactly the same rows: one path, the same batches
        np.testing.assert_array_equal(embedder.embed(tok, **kwargs), embedder.embed(texts, **kwargs))
    assert embedder.tokenize_flat("one post").tolist() == embedder.tokenize(["one post"])


def test_tokenized_texts_slice_and_concat_without_tokenizing_again(embedder, posts):
    from postembed_fast.tokenization import TokenizedTexts

    texts = posts[:30]
    tok = embedder.tokenize_flat(texts)
    parts = [tok[:7], tok[7:7], tok[7:19], tok[19:]]
    assert [len(p) for p in parts] == [7, 0, 12, 11]
    assert parts[2].tolist() == embedder.tokenize(texts[7:19]) and parts[2].offsets[0] == 0
    joined = TokenizedTexts.concat(parts)
    np.testing.assert_array_equal(joined.ids, tok.ids)
    np.testing.assert_array_equal(joined.offsets, tok.offsets)
    with pytest.raises(ValueError, match="step"):
        tok[::2]
    with pytest.raises(ValueError, match="offsets"):  # the constructor checks the layout
        TokenizedTexts(tok.ids, tok.offsets[:-1], tok.model_tag)
    with pytest.raises(ValueError, match="at least one"):
        TokenizedTexts.concat([])


def test_tokenized_texts_of_another_model_are_refused(embedder, make_random_model):
    from postembed_fast.tokenization import TokenizedTexts

    other = Embedder(make_random_model(), device="cpu")
    theirs = other.tokenize_flat(["a post", "another post"])
    assert theirs.model_tag == other.model_tag != embedder.model_tag
    with pytest.raises(ValueError, match=f"model {theirs.model_tag!r}.*tokenize_flat"):
        embedder.embed(theirs)
    with pytest.raises(ValueError, match=f"model {theirs.model_tag!r}.*tokenize_flat"):
        list(embedder.embed_iter(theirs))
    with pytest.raises(ValueError, match=r"parts\[1\]"):
        TokenizedTexts.concat([embedder.tokenize_flat(["a post"]), theirs])
    assert other.embed(theirs).shape == (2, other.dim)  # its own model takes it


def test_tokenize_flat_of_no_texts(embedder):
    tok = embedder.tokenize_flat([])
    assert len(tok) == 0 and tok.tokens == 0 and tok.offsets.tolist() == [0] and tok.tolist() == []
    assert embedder.embed(tok).shape == (0, 384) and embedder.embed(tok, precision="binary").shape == (0, 48)
    assert list(embedder.embed_iter(tok)) == []


def test_embed_iter_over_tokenized_texts_keeps_order(embedder, posts):
    texts = posts[200:250][::-1]
    tok = embedder.tokenize_flat(texts)
    chunks = list(embedder.embed_iter(tok, chunk_size=7))
    assert [len(c) for c in chunks] == [7] * 7 + [1]
    # the same chunks as embed_iter of the texts, row for row, and each row is its own text's
    np.testing.assert_array_equal(np.concatenate(chunks), np.concatenate(list(embedder.embed_iter(texts, chunk_size=7))))
    np.testing.assert_allclose(np.concatenate(chunks), embedder.embed(texts), atol=1e-5)
    for i in (0, 13, 49):
        np.testing.assert_allclose(np.concatenate(chunks)[i], embedder.embed(texts[i])[0], atol=1e-5)


def test_tokenized_path_over_several_chunks(make_random_model):
    """More texts than one pipeline chunk (the producer thread runs ahead): still one path, and a text
    the tokenizer refuses is named by its index in the whole input."""
    from postembed_fast import pipeline

    e = Embedder(make_random_model(hidden=32, heads=2, layers=1, intermediate=64, max_seq_length=16), device="cpu")
    texts = [f"post number {i} about {'rust' if i % 3 else 'python'}" for i in range(pipeline.TOKENIZE_CHUNK + 900)]
    tok = e.tokenize_flat(texts)
    np.testing.assert_array_equal(e.embed(tok), e.embed(texts))
    bad = list(texts)
    bad[pipeline.TOKENIZE_CHUNK + 500] = "lone \ud800"
    with pytest.raises(ValueError, match=rf"texts\[{pipeline.TOKENIZE_CHUNK + 500}\]"):
        e.embed(bad)
    with pytest.raises(ValueError, match=rf"texts\[{pipeline.TOKENIZE_CHUNK + 500}\]"):
        e.tokenize_flat(bad)


# ---- progress and threads ----------------------------------------------------------------
def test_show_progress_draws_a_tqdm_bar(embedder, capsys):
    embedder.embed(TEXTS, show_progress=True, batch_tokens=16)
    assert "9/9" in capsys.readouterr().err


def test_an_embedder_is_safe_to_call_from_several_threads(embedder_on, each_device, posts, embeddings_close):
    embedder = embedder_on(each_device)
    chunks = [posts[i * 20 : (i + 1) * 20] for i in range(4)]
    want = [embedder.embed(c) for c in chunks]
    got = [None] * 4
    errors = []

    def work(i):
        try:
            got[i] = embedder.embed(chunks[i], batch_tokens=700)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for g, w in zip(got, want):  # other batch sizes than `want`: equal within the dtype's rounding
        embeddings_close(g, w, embedder.dtype)


# ---- small requests on a GPU: CUDA graphs over padded buckets (postembed_fast/graphs.py) --------
@pytest.mark.parametrize("n_posts", [1, 3, 8])
def test_graph_bucket_padding_leaves_the_real_posts_unchanged(embedder, posts, n_posts, cos):
    """The padding the CUDA graph path uses (one filler sequence up to a power-of-two token count),
    run eagerly on CPU: the real posts' embeddings are those of plain packing."""
    from postembed_fast.graphs import token_bucket
    from postembed_fast.packing import flatten, pack, padded

    texts = posts[100:100 + n_posts]
    flat = flatten(embedder.tokenize(texts))
    batch = pack(*flat, np.arange(n_posts))
    total = batch.tokens
    bucket = token_bucket(total)
    assert bucket > total and bucket & (bucket - 1) == 0
    p = padded(batch, bucket)
    ids, positions, cu = (torch.from_numpy(a) for a in (p.input_ids, p.positions, p.cu_seqlens))
    assert int(cu[-2]) == total and int(cu[-1]) == bucket and not positions[total:].any()
    hidden = embedder.encoder.forward(ids, positions, cu, bucket)
    opts, _ = embedder._options("float32", True, None, None, "numpy", None)
    got = embedder.head(hidden[:total], cu[: n_posts + 1], opts).numpy()
    assert cos(got, embedder.embed(texts)).min() >= 0.999999


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


@needs_gpu
def test_cuda_graph_path_matches_eager(posts, cos, monkeypatch):
    monkeypatch.delenv("POSTEMBED_CUDA_GRAPHS", raising=False)  # on, whatever the environment says
    e = Embedder(device="cuda")
    assert e._graphs is not None
    for n in (1, 2, 8):
        texts = posts[200:200 + n]
        graphed = e.embed(texts)
        assert np.array_equal(graphed, e.embed(texts))  # a replay repeats the first run exactly
        runner, e._graphs = e._graphs, None
        try:
            eager = e.embed(texts)
        finally:
            e._graphs = runner
        assert cos(graphed, eager).min() >= 0.999
    assert e.embed(posts[:9]).shape == (9, 384)  # 9 posts: the eager path


def test_model_tag_names_the_model_and_its_weights(embedder, make_random_model):
    tag = embedder.model_tag
    assert tag.startswith("all-MiniLM-L6-v2-") and len(tag.rsplit("-", 1)[1]) == 12
    assert Embedder(device="cpu").model_tag == tag  # same weights, same tag
    other = Embedder(make_random_model(), device="cpu")
    assert other.model_tag != tag and other.model_tag.startswith(other.model_folder.name + "-")


def test_source_folder_import_without_an_install_says_what_to_do(tmp_path):
    """The repo's postembed_fast/ folder alone (no editable install on the path: -S) lacks kernels/
    and _C: the import must say so, not fail deep inside or fall back to slow backends."""
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    r = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path.insert(0, {root!r}); import postembed_fast"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "pip install -e ." in r.stderr and "source folder" in r.stderr, r.stderr
