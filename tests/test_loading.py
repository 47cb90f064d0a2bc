"""Loading a model folder's tokenizer: transformers is the reference; tokenizer.json read directly by
`tokenizers` is used only once a load has found it identical to transformers' (a verdict cached per
folder content and transformers version), which cuts a process's model load by ~2.5 s (worker restarts)."""
from __future__ import annotations

import json
import shutil

import pytest

from postembed_fast import loading


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("POSTEMBED_CACHE_DIR", str(d))
    return d / "tokenizers"


@pytest.fixture
def model_copy(tmp_path):
    dst = tmp_path / "model"
    src = loading.default_model_folder()
    dst.mkdir()
    for f in loading._TOKENIZER_FILES + ("vocab.txt",):
        if (src / f).is_file():
            shutil.copy(src / f, dst / f)
    return dst


def reference(folder, max_len=256):
    tok = loading._via_transformers(folder)
    tok.no_padding()
    tok.enable_truncation(max_length=max_len)
    return tok


def test_verified_once_then_read_directly(model_copy, cache_dir, monkeypatch):
    want = reference(model_copy, 100)
    first = loading.load_tokenizer(model_copy, 256)
    assert first.to_str() == reference(model_copy).to_str()
    assert len(list(cache_dir.glob("*.same"))) == 1

    def no_transformers(folder):
        raise AssertionError("transformers was used although the folder was verified")

    monkeypatch.setattr(loading, "_via_transformers", no_transformers)
    again = loading.load_tokenizer(model_copy, 100)
    assert again.to_str() == want.to_str()
    text = "Hello WORLD, naïve café! " * 40  # over 100 tokens: truncated the same way
    assert again.encode(text).ids == want.encode(text).ids and len(want.encode(text).ids) == 100


def test_a_folder_transformers_reads_differently_is_never_read_directly(model_copy, cache_dir):
    cfg_path = model_copy / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["do_lower_case"] = False  # transformers rewrites the lowercasing normalizer of tokenizer.json
    cfg_path.write_text(json.dumps(cfg))
    for _ in range(2):
        tok = loading.load_tokenizer(model_copy, 256)
        assert tok.to_str() == reference(model_copy).to_str()
        assert tok.encode("Hello WORLD").tokens != reference(model_copy).encode("hello world").tokens
    assert not list(cache_dir.glob("*.same"))


def test_a_changed_file_is_verified_again(model_copy, cache_dir):
    loading.load_tokenizer(model_copy, 256)
    (verdict,) = cache_dir.glob("*.same")
    cfg_path = model_copy / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["do_lower_case"] = False
    cfg_path.write_text(json.dumps(cfg))
    tok = loading.load_tokenizer(model_copy, 256)  # a new key: not the old verdict
    assert tok.to_str() == reference(model_copy).to_str()
    assert json.loads(tok.to_str())["normalizer"]["lowercase"] is False
    assert list(cache_dir.glob("*.same")) == [verdict]


def test_unwritable_cache_still_loads(model_copy, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("POSTEMBED_CACHE_DIR", str(blocker))
    tok = loading.load_tokenizer(model_copy, 256)
    assert tok.to_str() == reference(model_copy).to_str()


# ---- the model tag: SHA-256 of the weights, cached by the files' identity --------------------------
@pytest.fixture
def weights_folder(tmp_path):
    d = tmp_path / "weights-model"
    d.mkdir()
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 4096)
    return d


def uncached_tag(folder, monkeypatch, tmp_path, name):
    monkeypatch.setenv("POSTEMBED_CACHE_DIR", str(tmp_path / name))  # an empty cache: hashed
    return loading.model_tag(folder, is_default=False)


def test_model_tag_is_cached_and_equals_the_hash(weights_folder, cache_dir, monkeypatch, tmp_path):
    first = loading.model_tag(weights_folder, is_default=False)
    entries = list((cache_dir.parent / "model_tags").iterdir())
    assert len(entries) == 1 and first.endswith(entries[0].read_text().strip())
    assert loading.model_tag(weights_folder, is_default=False) == first  # read from the cache
    assert uncached_tag(weights_folder, monkeypatch, tmp_path, "other-cache") == first


def test_rewritten_weights_get_a_new_tag(weights_folder, cache_dir, monkeypatch, tmp_path):
    import os

    first = loading.model_tag(weights_folder, is_default=False)
    w = weights_folder / "model.safetensors"
    st = w.stat()
    w.write_bytes(bytes(reversed(range(256))) * 4096)  # same size, other bytes
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # (a coarse clock could repeat the mtime)
    second = loading.model_tag(weights_folder, is_default=False)
    assert second != first and second == uncached_tag(weights_folder, monkeypatch, tmp_path, "fresh")


def test_a_garbled_cache_entry_is_recomputed(weights_folder, cache_dir):
    first = loading.model_tag(weights_folder, is_default=False)
    (entry,) = (cache_dir.parent / "model_tags").iterdir()
    entry.write_text("not a digest\n")
    assert loading.model_tag(weights_folder, is_default=False) == first
