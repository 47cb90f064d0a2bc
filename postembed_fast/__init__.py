"""postembed_fast: high-throughput post embeddings.

    from postembed_fast import fast_embed
    emb = fast_embed(["Excited to share our new paper!", "We are hiring"])  # numpy (2, 384), L2-normalized

Importing this package never touches a GPU and works without CUDA or Triton.
"""
from __future__ import annotations

__version__ = "0.1.0"

import importlib.util as _util

if _util.find_spec(__name__ + ".kernels") is None:
    # The wheel ships kernels/ as postembed_fast.kernels, next to the compiled _C; the source
    # folder has neither. Without this message a source-tree import would fail deep inside.
    raise ImportError(
        f"postembed_fast was imported from its source folder ({__path__[0]}), which is not an installed "
        "package (kernels/ and the compiled _C are mapped in by the build). Install it for development "
        "with `pip install -e .` (from the repository root), or run Python from another directory."
    )

from postembed_fast.embedder import DeviceUnavailableError, Embedder, fast_embed  # noqa: E402
from postembed_fast.kernels import quantize_embeddings  # noqa: E402
from postembed_fast.kernels.precision import PRECISIONS  # noqa: E402
from postembed_fast.tokenization import TokenizedTexts  # noqa: E402


def info() -> dict:
    """What this installation can run: version, compiled extension, CUDA, Triton, backends per op."""
    import torch

    from postembed_fast import tokenization
    from postembed_fast.kernels import _ext, cpu_isa, dispatch

    return {
        "version": __version__,
        "torch": torch.__version__,
        "cpu_ext": _ext.has_cpu_ext(),
        "cpu_ext_error": _ext.UNAVAILABLE_REASON,
        "cuda_ext": _ext.has_cuda_ext(),
        "cuda_ext_compiled": bool(_ext._C is not None and _ext._C.cuda_compiled()),
        "cpu_avx2": bool(_ext._C is not None and _ext._C.cpu_avx2()),  # C++ attention/LayerNorm build
        "cpu": cpu_isa.info(),  # model, flags, ISA build of the C++ kernels, default CPU compute dtype + why
        "scans": cpu_isa.scans(),  # the build each CPU search scan runs (binary, int8, float32, sign-dot, rabitq)
        "triton": dispatch.TRITON_IMPORT_ERROR is None,
        "triton_error": dispatch.TRITON_IMPORT_ERROR,
        "triton_interpret": dispatch.triton_interpret(),
        "cuda_available": torch.cuda.is_available(),
        "backends": dispatch.implemented(),
        "tokenizer": tokenization.status(),  # the flat fast tokenizer, and any fallback to Hugging Face
    }


def __getattr__(name):  # EmbeddingIndex is a system part: imported on first use, never by the engine
    if name in ("EmbeddingIndex", "itq_rotation"):
        from postembed_fast import search

        return getattr(search, name)
    raise AttributeError(f"module 'postembed_fast' has no attribute {name!r}")


__all__ = ["fast_embed", "Embedder", "TokenizedTexts", "EmbeddingIndex", "itq_rotation", "info", "quantize_embeddings", "PRECISIONS",
           "DeviceUnavailableError",
           "__version__"]
