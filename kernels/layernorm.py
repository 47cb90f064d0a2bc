"""add_layernorm: LayerNorm(x + residual) over the last dimension (BERT's post-LN)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_float
from .dispatch import choose, register


@register("add_layernorm", "torch")
def add_layernorm_torch(x, residual, weight, bias, eps):
    """Reference: fp32 statistics, cast once to x's dtype."""
    if x.dtype == torch.float32:  # CPU hot path: no extra copies
        return F.layer_norm(x + residual, (x.shape[-1],), weight, bias, eps)
    y = x.float() + residual.float()
    return F.layer_norm(y, (x.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)


def add_layernorm(x, residual, weight, bias, eps, backend=None):
    """x, residual: [N, H]; weight, bias: [H] -> LayerNorm(x + residual), shape and dtype of x."""
    check_float("x", x)
    check_float("residual", residual)
    if x.shape != residual.shape:
        raise ValueError(f"x {tuple(x.shape)} and residual {tuple(residual.shape)} differ in shape")
    H = x.shape[-1]
    if weight.shape != (H,) or bias.shape != (H,):
        raise ValueError(f"weight and bias must be [{H}], got {tuple(weight.shape)} and {tuple(bias.shape)}")
    return choose("add_layernorm", x.device, backend)(x, residual, weight, bias, float(eps))
