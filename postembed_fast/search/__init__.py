"""Search: exact top-k over the engine's output codes (a system part).

`EmbeddingIndex` keeps codes (binary, int8, float16, float32, and rabitq: 1-bit RaBitQ codes with
per-vector factors, rabitq.py) with ids, scans them with the launchers of `postembed_fast.kernels`
(`*_topk.py`: C++ on CPU, Triton on GPU, a torch reference), pre-filters, rescores and saves. It uses the engine's public API only; the engine never imports it.
"""
from postembed_fast.search.index import INDEX_PRECISIONS, EmbeddingIndex, itq_rotation

__all__ = ["EmbeddingIndex", "itq_rotation", "INDEX_PRECISIONS"]
