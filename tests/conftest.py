"""Shared fixtures: the committed real-post sample, sentence-transformers on the default
model, and small randomly initialized models of other shapes saved as local folders."""
from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import sys

import pytest

# `python -m pytest` from the repo root puts the source tree first on sys.path, where
# postembed_fast has neither the compiled _C nor kernels/ inside it (the wheel maps
# kernels/ to postembed_fast.kernels). Test the installed package instead.
_ROOT = str(Path(__file__).resolve().parents[1])
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: nothing here may reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DATA = Path(__file__).resolve().parent / "data" / "posts.jsonl.gz"


def load_posts(n: int | None = None) -> list[dict]:
    with gzip.open(DATA, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return rows if n is None else rows[:n]


@pytest.fixture(scope="session")
def posts() -> list[str]:
    return [r["text"] for r in load_posts()]


@pytest.fixture(scope="session")
def default_folder() -> Path:
    from postembed_fast.loading import default_model_folder

    return default_model_folder()


@pytest.fixture(scope="session")
def st_model(default_folder):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(default_folder), device="cpu")


@pytest.fixture(scope="session")
def embedder():
    from postembed_fast import Embedder

    return Embedder(device="cpu")


def _st_modules():
    try:
        from sentence_transformers.sentence_transformer import modules as m

        return m.Transformer, m.Pooling, m.Dense, m.Normalize
    except (ImportError, AttributeError):
        from sentence_transformers import models as m

        return m.Transformer, m.Pooling, m.Dense, m.Normalize


def make_random_st_folder(root: Path, default_folder: Path, *, model_type="bert", hidden=256, heads=4, layers=3,
                          intermediate=512, pooling="cls", dense_out=None, max_seq_length=128, seed=0) -> Path:
    """A randomly initialized encoder saved with transformers (safetensors) plus sentence-transformers
    modules saved by sentence-transformers itself, reusing the default model's tokenizer files."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

    torch.manual_seed(seed)
    enc_dir = root / "hf"
    kw = dict(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers, intermediate_size=intermediate,
              vocab_size=30522, max_position_embeddings=max_seq_length + 2 + (model_type != "bert"))
    if model_type == "bert":
        model = BertModel(BertConfig(**kw), add_pooling_layer=False)
    else:
        model = RobertaModel(RobertaConfig(**kw, pad_token_id=1, type_vocab_size=1), add_pooling_layer=False)
    model.save_pretrained(enc_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(default_folder / name, enc_dir / name)
    Transformer, Pooling, Dense, Normalize = _st_modules()
    mods = [Transformer(str(enc_dir), max_seq_length=max_seq_length), Pooling(hidden, pooling_mode=pooling)]
    if dense_out:
        mods.append(Dense(hidden, dense_out))
    mods.append(Normalize())
    out = root / "st"
    SentenceTransformer(modules=mods, device="cpu").save(str(out))
    return out


def np_quantize(x, precision, ranges=None):
    """The formulas of the precision contract, in numpy float32 (independent of the package)."""
    import numpy as np

    x = np.asarray(x, dtype=np.float32)
    if precision == "float32":
        return x
    if precision == "float16":
        return x.astype(np.float16)
    if precision in ("uint8", "int8"):
        lo, hi = ranges[0].astype(np.float32), ranges[1].astype(np.float32)
        q = np.clip(np.floor((x - lo) / ((hi - lo) / np.float32(255)) + np.float32(0.5)), 0, 255)
        return q.astype(np.uint8) if precision == "uint8" else (q - 128).astype(np.int8)
    packed = np.packbits(x > 0, axis=-1)
    return packed if precision == "ubinary" else (packed.astype(np.int16) - 128).astype(np.int8)


def quantize_ties(x, ranges):
    """Mask of elements whose uint8 code sits at an exact rounding tie (within float32 noise)."""
    import numpy as np

    lo, hi = ranges[0], ranges[1]
    t = (np.asarray(x, np.float64) - lo) / ((hi - lo) / 255.0) + 0.5
    return np.abs(t - np.round(t)) < 1e-4


@pytest.fixture
def reference_quantize():
    return np_quantize


@pytest.fixture
def tie_mask():
    return quantize_ties


@pytest.fixture
def make_random_model(tmp_path, default_folder):
    def make(**kw):
        return make_random_st_folder(tmp_path, default_folder, **kw)

    return make


def cosines(a, b):
    import numpy as np

    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture
def cos():
    return cosines


@pytest.fixture(params=[True, False], ids=["avx2-if-cpu-has-it", "baseline-isa"])
def cpu_isa(request):
    """Run a C++ CPU kernel test with its AVX2+FMA build (where the CPU has it) and its baseline build."""
    from postembed_fast import _ext

    if _ext._C is None:
        pytest.skip(f"compiled extension unavailable: {_ext.UNAVAILABLE_REASON}")
    prev = _ext._C._set_cpu_avx2_allowed(request.param)
    yield request.param
    _ext._C._set_cpu_avx2_allowed(prev)
