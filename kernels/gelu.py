"""bias_gelu: exact (erf) GELU(x + bias), as BERT's "gelu" activation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_float
from .dispatch import choose, register


@register("bias_gelu", "torch")
def bias_gelu_torch(x, bias):
    """Reference: fp32 math, cast once to x's dtype."""
    y = x.float() if bias is None else x.float() + bias.float()
    return F.gelu(y).to(x.dtype)


def bias_gelu(x, bias, backend=None):
    """x: [N, F]; bias: [F] or None -> gelu(x + bias), shape and dtype of x."""
    check_float("x", x)
    if bias is not None and bias.shape != (x.shape[-1],):
        raise ValueError(f"bias must be [{x.shape[-1]}], got {tuple(bias.shape)}")
    return choose("bias_gelu", x.device, backend)(x, bias)
