"""postembed_fast.kernels: one public launcher per op, each with backend=None|"torch"|"triton"|"cpp".

"torch" is the pure-torch reference beside each kernel; None picks the fastest
available for the tensor's device (see dispatch.PREFERENCE).
"""
from . import cpp_ops  # noqa: F401  (registers the "cpp" backend)
from .attention import varlen_attention
from .float_topk import float_topk
from .hamming_topk import hamming_topk
from .hamming_kth_score import hamming_kth_score
from .int8_topk import int8_topk
from .sign_dot_topk import sign_dot_rerank, sign_dot_topk
from .gated_sign_dot_topk import gated_sign_dot_topk
from .float16_rerank import float16_rerank
from .rabitq_topk import rabitq_topk
from .dispatch import BACKENDS, implemented, unavailable_reason
from .gelu import bias_gelu
from .layernorm import add_layernorm
from .pooling import pool_normalize
from .quantize import quantize_embeddings

__all__ = [
    "varlen_attention",
    "pool_normalize",
    "add_layernorm",
    "bias_gelu",
    "quantize_embeddings",
    "hamming_topk",
    "hamming_kth_score",
    "int8_topk",
    "float_topk",
    "sign_dot_topk",
    "sign_dot_rerank",
    "gated_sign_dot_topk",
    "float16_rerank",
    "rabitq_topk",
    "BACKENDS",
    "implemented",
    "unavailable_reason",
]
