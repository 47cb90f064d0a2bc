"""Argument checks shared by the launchers: bad input gets a ValueError/TypeError
naming the problem, before any kernel can read out of bounds."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_out(out, shape, like: torch.Tensor) -> None:
    """A caller-provided output buffer: the result's shape, dtype and device, unit stride in the last dim."""
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"out must be a {like.dtype} tensor of shape {tuple(shape)} on {like.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    if out.numel() > 1 and out.stride(-1) != 1:
        raise ValueError("out must be contiguous in its last dimension")


def check_cu_seqlens(cu_seqlens: torch.Tensor, total_tokens: int, device: torch.device) -> int:
    """Validate cu_seqlens (int32, [B+1], 0 = cu[0] < cu[1] < ... = total_tokens). Returns B.

    Content checks read the tensor, so they run only for CPU tensors: on a GPU
    they would force a device sync on the hot path (the encoder builds
    cu_seqlens on the host and checks it there)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with B+1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the data is on {device}")
    if cu_seqlens.device.type == "cpu":
        cu = cu_seqlens.numpy()  # numpy: a few microseconds where three torch ops cost ~100 (once per batch)
        if cu[0] != 0:
            raise ValueError(f"cu_seqlens[0] must be 0, got {int(cu[0])}")
        if cu[-1] != total_tokens:
            raise ValueError(f"cu_seqlens[-1] must equal total_tokens={total_tokens}, got {int(cu[-1])}")
        if not (cu[1:] > cu[:-1]).all():
            raise ValueError("cu_seqlens must be strictly increasing (every sequence needs >= 1 token)")
    return cu_seqlens.numel() - 1


class QuantRanges:
    """Quantization ranges checked once: float32 [2, dim] (row 0 = per-dimension min, row 1 =
    max, finite, max > min), contiguous, on `device`. Launchers take one as it is, so a caller
    that embeds batch after batch (the Embedder) validates and copies its ranges only once."""

    __slots__ = ("tensor",)

    def __init__(self, ranges, dim: int, device: torch.device):
        if ranges is None:
            raise ValueError("this precision needs quantization ranges ([2, D]: per-dimension min and max)")
        if isinstance(ranges, QuantRanges):  # checked already, on another device
            ranges = ranges.tensor
        r = torch.as_tensor(ranges, dtype=torch.float32)
        if r.shape != (2, dim):
            raise ValueError(f"ranges must have shape (2, {dim}) (min row, max row), got {tuple(r.shape)}")
        if not bool(torch.isfinite(r).all()):
            raise ValueError("ranges must be finite")
        if not bool((r[1] > r[0]).all()):
            raise ValueError("ranges: every max (row 1) must be greater than its min (row 0)")
        self.tensor = r.to(device).contiguous()


def check_ranges(ranges, dim: int, device: torch.device) -> torch.Tensor:
    """ranges (array-like [2, dim], or QuantRanges) -> the validated float32 tensor on device."""
    if not (isinstance(ranges, QuantRanges) and ranges.tensor.shape == (2, dim) and ranges.tensor.device == device):
        ranges = QuantRanges(ranges, dim, device)
    return ranges.tensor
