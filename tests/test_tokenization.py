"""FlatTokenizer: flat (ids, offsets) identical to Hugging Face tokenizers' encode_batch (special tokens
added, truncated at max_seq_length) on every backend (the compiled ASCII WordPiece with nanotoken or
with Hugging Face for the other texts, nanotoken alone, Hugging Face alone), for the committed real
posts and the hostile texts; refusals, fallbacks and their reasons."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from postembed_fast import tokenization
from postembed_fast.tokenization import FastTokenizerFallbackWarning, FlatTokenizer, probe_texts

DATA = Path(__file__).resolve().parent / "data"
_spec = importlib.util.spec_from_file_location("hostile_texts", DATA / "hostile_texts.py")
hostile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hostile)

try:
    import nanotoken  # noqa: F401

    NANOTOKEN_MISSING = None
except ImportError as exc:  # the optional extra postembed_fast[fast-tokenizer]
    NANOTOKEN_MISSING = f"nanotoken not installed ({exc}): pip install 'postembed_fast[fast-tokenizer]'"
needs_nanotoken = pytest.mark.skipif(NANOTOKEN_MISSING is not None, reason=NANOTOKEN_MISSING or "")


# ---- reference: Hugging Face tokenizers' encode_batch, one list of ids per text -------------------
def hf_reference(hf, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in hf.encode_batch(texts, add_special_tokens=True)]


def assert_identical(ids: np.ndarray, offsets: np.ndarray, ref: list[list[int]], texts: list[str]) -> None:
    assert ids.dtype == np.int32 and offsets.dtype == np.int64
    assert ids.ndim == 1 and offsets.shape == (len(ref) + 1,) and offsets[0] == 0 and offsets[-1] == len(ids)
    lens = np.array([len(r) for r in ref], dtype=np.int64)
    flat = np.fromiter((t for r in ref for t in r), dtype=np.int64, count=int(lens.sum()))
    if np.array_equal(np.diff(offsets), lens) and np.array_equal(ids, flat):
        return
    for i, r in enumerate(ref):  # name the first text that differs
        got = ids[offsets[i] : offsets[i + 1]].tolist()
        assert got == r, f"texts[{i}] {texts[i][:80]!r}: got {got[:20]}..., Hugging Face {r[:20]}..."
    raise AssertionError("flat arrays differ from the reference")


# ---- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spec(default_folder):
    from postembed_fast.loading import read_model_folder

    return read_model_folder(default_folder)


@pytest.fixture(scope="module")
def hf(spec):
    from postembed_fast.loading import load_tokenizer

    return load_tokenizer(spec.encoder_folder, spec.max_seq_length)


@pytest.fixture(scope="module")
def fast(hf):
    if NANOTOKEN_MISSING is not None:
        pytest.skip(NANOTOKEN_MISSING)
    return FlatTokenizer(hf, backend="fast")


@pytest.fixture(scope="module")
def fallback(hf):
    return FlatTokenizer(hf, backend="hf")


def _ascii_wp(hf, max_length=256):
    wp, why = tokenization._ascii_wordpiece(json.loads(hf.to_str()), max_length, hf.truncation)
    assert wp is not None, why
    return wp


def _hf_flat(hf):
    return FlatTokenizer(hf, backend="hf")._hf_flat


# Each backend the package can run, built as FlatTokenizer would (and verified on the probes by it).
BUILDERS = {
    "fast": lambda hf: FlatTokenizer(hf, backend="fast"),  # ascii-wordpiece + nanotoken
    "ascii+hf": lambda hf: FlatTokenizer(hf, fast_encoder=tokenization._ascii_first(_ascii_wp(hf), _hf_flat(hf))),
    "nanotoken": lambda hf: FlatTokenizer(hf, fast_encoder=_nanotoken_alone(hf)),
    "hf": lambda hf: FlatTokenizer(hf, backend="hf"),
}


def _nanotoken_alone(hf):
    import nanotoken

    return tokenization._nanotoken_encoder(nanotoken.Tokenizer.from_json(hf.to_str()), 256, hf.truncation)


@pytest.fixture(scope="module", params=list(BUILDERS))
def flat(request, hf):
    if request.param in ("fast", "nanotoken") and NANOTOKEN_MISSING is not None:
        pytest.skip(NANOTOKEN_MISSING)
    tok = BUILDERS[request.param](hf)
    assert tok.fallback_reason is None or request.param == "hf"
    return tok


@pytest.fixture(scope="module")
def hostile_set(hf):
    texts = hostile.hostile_texts()
    return texts, hf_reference(hf, texts)


@pytest.fixture(scope="module")
def posts_set(hf, posts):
    return posts, hf_reference(hf, posts)


@pytest.fixture(scope="module")
def code_point_set(hf):
    texts = hostile.code_point_texts()[: 2 * 27_802]  # every code point, in runs (with and without spaces)
    return texts, hf_reference(hf, texts)


# ---- identity ---------------------------------------------------------------------------------------
def test_default_model_setup(spec, hf):
    assert spec.max_seq_length == 256 and not spec.do_lower_case
    assert hf.truncation["max_length"] == 256 and hf.padding is None
    tok = FlatTokenizer(hf, backend="hf")
    assert tok.backend.startswith("tokenizers ") and tok.max_length == 256


def test_fast_backend_setup(fast):
    assert fast.backend == "ascii-wordpiece + nanotoken 0.1.0" and fast.fallback_reason is None
    assert fast.max_length == 256


def test_auto_picks_the_fast_backend_when_installed(hf):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastTokenizerFallbackWarning)
        if NANOTOKEN_MISSING is not None:
            with pytest.raises(FastTokenizerFallbackWarning, match="nanotoken is not installed"):
                FlatTokenizer(hf)
            return
        tok = FlatTokenizer(hf)
    assert tok.backend.startswith("ascii-wordpiece + nanotoken ") and tok.fallback_reason is None


def test_posts_identical(flat, posts_set):
    texts, ref = posts_set
    assert len(texts) == 10_000
    ids, offsets = flat.encode(texts)
    assert_identical(ids, offsets, ref, texts)
    assert np.diff(offsets).max() == 256  # some committed posts reach the truncation limit


def test_hostile_identical(flat, hostile_set):
    texts, ref = hostile_set
    assert len(texts) > 200 and max(map(len, texts)) >= 200_000
    ids, offsets = flat.encode(texts)
    assert_identical(ids, offsets, ref, texts)


def test_every_code_point_identical(flat, code_point_set):
    texts, ref = code_point_set
    ids, offsets = flat.encode(texts)
    assert_identical(ids, offsets, ref, texts)


def test_probe_texts_identical(flat, hf):
    texts = probe_texts(hf, 256)
    assert 250 <= len(texts) <= 1000
    assert_identical(*flat.encode(texts), hf_reference(hf, texts), texts)


def test_batches_and_single_texts_agree(flat, posts_set):
    texts, ref = posts_set
    for i in (0, 1, 17, 4095):
        ids, offsets = flat.encode([texts[i]])
        assert ids.tolist() == ref[i] and offsets.tolist() == [0, len(ref[i])]
    ids, offsets = flat.encode(tuple(texts[:50]))  # any sequence of str
    assert_identical(ids, offsets, ref[:50], texts[:50])


def test_truncation_at_256_matches_sentence_transformers(flat, st_model):
    long = ["word " * 1000, "x " * 100_000, "\u4e2d" * 300, " ".join(["tok"] * 254), " ".join(["tok"] * 255),
            "x" * 200_000]  # the last: one word over 100 characters, [UNK]
    ids, offsets = flat.encode(long)
    assert np.diff(offsets).tolist() == [256, 256, 256, 256, 256, 3]
    assert st_model.max_seq_length == 256
    feats = st_model.tokenize(long)
    for i in range(len(long)):
        mask = feats["attention_mask"][i].bool()
        assert ids[offsets[i] : offsets[i + 1]].tolist() == feats["input_ids"][i][mask].tolist()
    assert all(ids[offsets[i + 1] - 1] == 102 for i in range(len(long)))  # [SEP] kept after truncation


def test_lowercase_like_sentence_transformers(hf, request):
    """do_lower_case models: str.lower() in Python, then the tokenizer (as sentence-transformers does)."""
    texts = ["\u0130stanbul CAF\u00c9", "\u039f\u0394\u039f\u03a3 \u03a3", "HeLLo [MASK] [mask]", "STRASSE \u1e9e"]
    ref = hf_reference(hf, [t.lower() for t in texts])
    for backend in ("fast", "hf"):
        if backend == "fast" and NANOTOKEN_MISSING is not None:
            continue
        tok = FlatTokenizer(hf, lowercase=True, backend=backend)
        assert_identical(*tok.encode(texts), ref, texts)
        with pytest.raises(ValueError, match=r"texts\[1\] is not valid Unicode \(lone surrogate at position 2\)"):
            tok.encode(["\u0130\u0130\u0130", "\u0130\u0130\ud800"])  # position in the text as given


def test_empty_list(flat):
    ids, offsets = flat.encode([])
    assert ids.shape == (0,) and ids.dtype == np.int32
    assert offsets.tolist() == [0] and offsets.dtype == np.int64


@pytest.mark.parametrize("text,pos", hostile.INVALID_TEXTS)
def test_lone_surrogate_names_the_index(flat, text, pos):
    batch = ["fine", "also fine", "", text, "after"]
    with pytest.raises(ValueError, match=rf"texts\[3\] is not valid Unicode \(lone surrogate at position {pos}\)"):
        flat.encode(batch)
    assert flat.encode(["fine"])[1].tolist() == [0, 3]  # the tokenizer still works afterwards


def test_non_str_is_a_type_error(flat):
    for bad in (b"bytes", None, 3):
        with pytest.raises(TypeError, match=r"texts\[1\] must be str"):
            flat.encode(["ok", bad])


def test_concurrent_calls(flat, posts_set):
    texts, ref = posts_set
    chunks = [(i, texts[i : i + 1000]) for i in range(0, 8000, 1000)]
    results, errors = {}, []

    def work(part):
        try:
            for start, chunk in part:
                results[start] = flat.encode(chunk)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(chunks[k::4],)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for start, chunk in chunks:
        assert_identical(*results[start], ref[start : start + 1000], chunk)


# ---- fallback rules ---------------------------------------------------------------------------------
def _flat_from_lists(seqs):
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in seqs], out=offsets[1:])
    return np.array([t for s in seqs for t in s], dtype=np.int32), offsets


def _wrong_encoders(hf):
    """Deliberately wrong 'fast' encoders: each differs from Hugging Face on some probe texts only."""

    def truncates_one_early(texts):
        return _flat_from_lists([s if len(s) < 256 else s[:254] + s[-1:] for s in hf_reference(hf, texts)])

    def drops_sep(texts):
        return _flat_from_lists([s[:-1] for s in hf_reference(hf, texts)])

    def no_unk(texts):
        return _flat_from_lists([[t for t in s if t != 100] for s in hf_reference(hf, texts)])

    def accepts_surrogates(texts):
        return _flat_from_lists(hf_reference(hf, [t.encode("utf-8", "replace").decode() for t in texts]))

    return {"truncates_one_early": truncates_one_early, "drops_sep": drops_sep, "no_unk": no_unk,
            "accepts_surrogates": accepts_surrogates}


@pytest.mark.parametrize("name", ["truncates_one_early", "drops_sep", "no_unk", "accepts_surrogates"])
def test_probe_mismatch_falls_back(hf, name, hostile_set):
    wrong = _wrong_encoders(hf)[name]
    with pytest.warns(FastTokenizerFallbackWarning) as rec:
        tok = FlatTokenizer(hf, fast_encoder=wrong)
    assert tok.backend.startswith("tokenizers ")
    expected = "lone surrogate" if name == "accepts_surrogates" else "different token ids"
    assert expected in tok.fallback_reason and name in tok.fallback_reason
    assert tok.fallback_reason in str(rec[0].message)
    import postembed_fast

    assert tok.fallback_reason in postembed_fast.info()["tokenizer"]["fallbacks"]  # info() tells why
    texts, ref = hostile_set
    assert_identical(*tok.encode(texts[:150]), ref[:150], texts[:150])  # the fallback serves the right ids
    with pytest.raises(ValueError, match="the fast tokenizer cannot serve this model: .*" + expected):
        FlatTokenizer(hf, fast_encoder=wrong, backend="fast")


@needs_nanotoken
@pytest.mark.parametrize("field,value", [("lowercase", False), ("strip_accents", False),
                                         ("handle_chinese_chars", False)])
def test_misconfigured_nanotoken_is_caught(hf, field, value):
    """A real nanotoken built from a subtly different tokenizer.json: the probes see the difference."""
    import json

    import nanotoken

    cfg = json.loads(hf.to_str())
    cfg["normalizer"][field] = value
    nt = nanotoken.Tokenizer.from_json(json.dumps(cfg))

    def misconfigured(texts):
        r = nt.encode_batch(texts, add_special_tokens=True, max_length=256)
        return r.ids, r.offsets

    with pytest.warns(FastTokenizerFallbackWarning, match="different token ids"):
        tok = FlatTokenizer(hf, fast_encoder=misconfigured)
    assert tok.backend.startswith("tokenizers ")


def test_correct_injected_encoder_is_used(hf):
    def right(texts):
        return _flat_from_lists(hf_reference(hf, texts))

    with warnings.catch_warnings():
        warnings.simplefilter("error", FastTokenizerFallbackWarning)
        tok = FlatTokenizer(hf, fast_encoder=right)
    assert tok.fallback_reason is None and tok.backend.startswith("custom (")


def test_runtime_failure_falls_back_for_good(hf, hostile_set):
    def fragile(texts):
        if any("TRIGGER" in t for t in texts):
            raise RuntimeError("simulated crash")
        return _flat_from_lists(hf_reference(hf, texts))

    tok = FlatTokenizer(hf, fast_encoder=fragile)
    assert tok.fallback_reason is None
    texts = ["a TRIGGER b", "plain"]
    with pytest.warns(FastTokenizerFallbackWarning, match="simulated crash"):
        ids, offsets = tok.encode(texts)
    assert_identical(ids, offsets, hf_reference(hf, texts), texts)
    assert tok.backend.startswith("tokenizers ") and "simulated crash" in tok.fallback_reason


def test_nanotoken_absent_ascii_path_serves_with_hugging_face(hf, monkeypatch, posts_set, hostile_set):
    """Without the extra, ASCII texts still take the compiled path and the others Hugging Face."""
    monkeypatch.setitem(sys.modules, "nanotoken", None)  # import nanotoken -> ImportError
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastTokenizerFallbackWarning)
        tok = FlatTokenizer(hf)
    assert tok.backend.startswith("ascii-wordpiece + tokenizers ") and tok.fallback_reason is None
    import postembed_fast

    assert any("nanotoken is not installed" in r for r in postembed_fast.info()["tokenizer"]["fallbacks"])
    for texts, ref in (posts_set, hostile_set):
        assert_identical(*tok.encode(texts[:500]), ref[:500], texts[:500])


def test_no_fast_backend_at_all_falls_back(hf, monkeypatch, posts_set):
    from postembed_fast.kernels import _ext

    monkeypatch.setitem(sys.modules, "nanotoken", None)
    monkeypatch.setattr(_ext, "_C", None)
    with pytest.warns(FastTokenizerFallbackWarning, match="nanotoken is not installed"):
        tok = FlatTokenizer(hf)
    assert tok.backend.startswith("tokenizers ") and "pip install" in tok.fallback_reason
    texts, ref = posts_set
    assert_identical(*tok.encode(texts[:500]), ref[:500], texts[:500])
    with pytest.raises(ValueError, match="nanotoken is not installed"):
        FlatTokenizer(hf, backend="fast")


def test_unsupported_config_falls_back(spec):
    from tokenizers import normalizers

    from postembed_fast.loading import load_tokenizer

    hf = load_tokenizer(spec.encoder_folder, spec.max_seq_length)
    hf.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    with pytest.warns(FastTokenizerFallbackWarning, match="normalizer is 'Sequence'"):
        tok = FlatTokenizer(hf)
    assert tok.backend.startswith("tokenizers ")
    texts = ["\uff21\uff22\uff23 \ufb01", "Hello"]
    assert_identical(*tok.encode(texts), hf_reference(hf, texts), texts)

    padded = load_tokenizer(spec.encoder_folder, spec.max_seq_length)
    padded.enable_padding(length=8)
    with pytest.warns(FastTokenizerFallbackWarning, match="padding is enabled"):
        assert FlatTokenizer(padded).backend.startswith("tokenizers ")


def test_other_max_length(spec):
    """A model folder's own max_seq_length (here 32) is what both backends truncate at."""
    from postembed_fast.loading import load_tokenizer

    hf = load_tokenizer(spec.encoder_folder, 32)
    texts = ["word " * 100, "short", " ".join(["tok"] * 30), " ".join(["tok"] * 31)]
    ref = hf_reference(hf, texts)
    assert [len(r) for r in ref] == [32, 3, 32, 32]
    for backend in ("fast", "hf"):
        if backend == "fast" and NANOTOKEN_MISSING is not None:
            continue
        assert_identical(*FlatTokenizer(hf, backend=backend).encode(texts), ref, texts)


def test_bad_backend_name(hf):
    with pytest.raises(ValueError, match="unknown backend 'rust'"):
        FlatTokenizer(hf, backend="rust")


def test_package_import_does_not_import_nanotoken():
    code = ("import sys, postembed_fast, postembed_fast.tokenization; "
            "assert 'nanotoken' not in sys.modules, 'nanotoken imported at package import'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent)


# ---- the compiled ASCII WordPiece ---------------------------------------------------------------------
def test_ascii_path_takes_ascii_texts_only(hf):
    """lens = -1 exactly for the texts left to the general tokenizer: non-ASCII ones and those holding
    an added token (Hugging Face splits those out of the raw text first)."""
    wp = _ascii_wp(hf)
    texts = ["plain ascii", "caf\u00e9", "", "a [MASK] b", "[mask] lower case is ordinary text", "x[SEP]",
             "\x00\x01 ctrl", "emoji \U0001f600", "[CLS"]
    lens, ids = wp.encode(texts)
    assert lens.dtype == np.int64 and ids.dtype == np.int32
    assert (lens < 0).tolist() == [False, True, False, True, False, True, False, True, False]
    ref = hf_reference(hf, texts)
    handled = [r for r, n in zip(ref, lens) if n >= 0]
    assert lens[lens >= 0].tolist() == [len(r) for r in handled]
    assert ids.tolist() == [t for r in handled for t in r]


def test_ascii_mixed_batch_keeps_order(hf, posts_set, hostile_set):
    """ASCII and non-ASCII texts interleaved: the merge puts every text's ids back in its place."""
    posts, posts_ref = posts_set
    hostile_texts, hostile_ref = hostile_set
    texts, ref = [], []
    for i in range(300):
        texts += [posts[i], hostile_texts[i % len(hostile_texts)]]
        ref += [posts_ref[i], hostile_ref[i % len(hostile_texts)]]
    enc = tokenization._ascii_first(_ascii_wp(hf), _hf_flat(hf))
    assert_identical(*enc(texts), ref, texts)
    assert_identical(*enc(texts[1::2]), ref[1::2], texts[1::2])  # nothing for the ASCII path
    assert_identical(*enc(texts[:1]), ref[:1], texts[:1])  # nothing for the general tokenizer


def _variant(hf, edit, max_length=256, direction="right"):
    """A Hugging Face tokenizer built from an edited tokenizer.json."""
    from tokenizers import Tokenizer

    cfg = json.loads(hf.to_str())
    edit(cfg)
    tok = Tokenizer.from_str(json.dumps(cfg))
    tok.enable_truncation(max_length, direction=direction)
    return tok


ASCII_TEXTS = ["Hello, WORLD! It's 3.14 o'clock.", "UPPER lower MiXeD", "don't\tstop\nthe\rline",
               "a\x01b c\x0bd e\x0cf g\x7fh \x00", "supercalifragilistic " * 40, "x" * 99, "x" * 100,
               "y" * 101, "state-of-the-art $100 (approx.) ~tilde~ `code` {json: [1, 2]}", "", "   ",
               "unaffable unbelievably tokenization"]


@pytest.mark.parametrize("name,edit,max_length,direction", [
    ("cased", lambda c: c["normalizer"].update(lowercase=False), 256, "right"),
    ("short words", lambda c: c["model"].update(max_input_chars_per_word=5), 256, "right"),
    ("left truncation", lambda c: None, 16, "left"),
    ("right truncation at 5", lambda c: None, 5, "right"),
    ("BertProcessing", lambda c: c.update(post_processor={"type": "BertProcessing", "sep": ["[SEP]", 102],
                                                          "cls": ["[CLS]", 101]}), 256, "right"),
])
def test_ascii_path_follows_the_config(hf, name, edit, max_length, direction):
    variant = _variant(hf, edit, max_length, direction)
    wp = _ascii_wp(variant, max_length)
    lens, ids = wp.encode(ASCII_TEXTS)
    assert (lens >= 0).all()
    offsets = np.concatenate([[0], np.cumsum(lens)])
    assert_identical(ids, offsets, hf_reference(variant, ASCII_TEXTS), ASCII_TEXTS)
    # and FlatTokenizer verifies and picks the ASCII path for it
    tok = FlatTokenizer(variant, backend="fast")
    assert tok.backend.startswith("ascii-wordpiece + ")
    assert_identical(*tok.encode(ASCII_TEXTS), hf_reference(variant, ASCII_TEXTS), ASCII_TEXTS)


@pytest.mark.parametrize("edit,why", [
    (lambda c: c["normalizer"].update(clean_text=False), "clean_text=false"),
    (lambda c: c["added_tokens"].append({"id": 7, "content": "hello", "single_word": False, "lstrip": False,
                                         "rstrip": False, "normalized": True, "special": False}), "normalized=true"),
    (lambda c: c.update(post_processor={"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}},
                                        {"Sequence": {"id": "A", "type_id": 0}}], "pair": [], "special_tokens": {}}),
     "fixed special tokens"),
])
def test_ascii_path_declines_what_it_does_not_implement(hf, edit, why):
    variant = _variant(hf, edit)
    wp, reason = tokenization._ascii_wordpiece(json.loads(variant.to_str()), 256, variant.truncation)
    assert wp is None and why in reason


@needs_nanotoken
def test_wrong_ascii_path_is_caught_and_nanotoken_serves(hf, monkeypatch, posts_set):
    """A broken compiled path (here: one id off for every ASCII text) fails the probes; nanotoken
    alone takes over, with the reason in the warning and in info()."""
    real = tokenization._ascii_wordpiece

    class OffByOne:
        def __init__(self, wp):
            self.wp = wp

        def encode(self, texts):
            lens, ids = self.wp.encode(texts)
            return lens, np.where(ids == 2003, 2004, ids).astype(np.int32)  # "is" -> "it"

    monkeypatch.setattr(tokenization, "_ascii_wordpiece", lambda *a: (OffByOne(real(*a)[0]), None))
    monkeypatch.setattr(tokenization, "_VERIFIED", {})
    with pytest.warns(FastTokenizerFallbackWarning, match="ascii-wordpiece .*different token ids"):
        tok = FlatTokenizer(hf)
    assert tok.backend.startswith("nanotoken ") and tok.fallback_reason is None
    texts, ref = posts_set
    assert_identical(*tok.encode(texts[:300]), ref[:300], texts[:300])


def test_ascii_path_bad_arguments(hf):
    from postembed_fast.kernels import _ext

    wp = _ascii_wp(hf)
    with pytest.raises(ValueError, match=r"texts\[1\] must be str"):
        wp.encode(["ok", b"bytes"])
    with pytest.raises(ValueError, match="no room for text"):
        _ext._C.AsciiWordPiece(vocab=["[UNK]"], unk_id=0, continuing_prefix="##", max_input_chars_per_word=100,
                               lowercase=True, prefix_ids=[0], suffix_ids=[0], max_length=2, truncate_left=False,
                               added_tokens=[])
    with pytest.raises(ValueError, match="unk_id"):
        _ext._C.AsciiWordPiece(vocab=["a"], unk_id=5, continuing_prefix="##", max_input_chars_per_word=100,
                               lowercase=True, prefix_ids=[], suffix_ids=[], max_length=0, truncate_left=False,
                               added_tokens=[])


def test_ascii_path_random_strings(hf):
    """Seeded random ASCII strings built from the byte classes the compiled path distinguishes (word
    characters in both cases, punctuation, \t\n\r and space, dropped controls, added-token fragments,
    long runs): every one identical to Hugging Face, and most taken by the ASCII path itself."""
    import random

    rng = random.Random(20261126)
    pieces = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
              + list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + [" ", "  ", "\t", "\n", "\r\n"]
              + [chr(c) for c in (0, 1, 8, 11, 12, 14, 27, 31, 127)]
              + ["the", "ing", "##", "un", "[MASK]", "[SEP", "CLS]", "[UNK]", "x" * 99, "y" * 101, "token"])
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 60))) for _ in range(3000)]
    wp = _ascii_wp(hf)
    lens, _ = wp.encode(texts)
    assert (lens >= 0).mean() > 0.5  # the texts without an added token
    enc = tokenization._ascii_first(wp, _hf_flat(hf))
    assert_identical(*enc(texts), hf_reference(hf, texts), texts)
