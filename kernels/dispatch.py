"""Every backend choice in one place.

Each op registers its implementations with @register(op, backend, devices,
supports); launchers call choose(op, device, backend, args). backend=None picks
the first entry of OP_PREFERENCE (or else PREFERENCE) for the device that is available here and, if it
has a `supports` check, accepts these arguments (e.g. the C++ attention takes
float32 or bfloat16 and head_dim 16/32/64/128 only); "torch" (the reference) always works,
so there is always a fallback.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Callable

import torch

from . import _ext

BACKENDS = ("torch", "triton", "cpp")

# Order tried by backend=None. Triton is never auto-picked on CPU: there it only
# runs under the (slow) interpreter, which is a testing tool.
PREFERENCE = {
    "cuda": ("triton", "cpp", "torch"),
    "cpu": ("cpp", "torch"),
}
# Per-op exceptions, each from a measurement. H200, bench/results/NVIDIA-H200-ops.json (4,096
# tokens x 384, median): the CUDA pool_normalize 30 us vs Triton's 42 us (float32 out), 29 vs
# 41 us (binary). There Triton's attention, add_layernorm and bias_gelu beat torch's (55 vs 318,
# 45 vs 76, 43 vs 62 us), as PREFERENCE has it.
OP_PREFERENCE = {
    ("pool_normalize", "cuda"): ("cpp", "triton", "torch"),
}

def _triton_import_error() -> str | None:
    """None when Triton is imported and its kernels could run here, else why not. Triton is optional, and
    it is not even imported where its kernels cannot run: a torch build without GPU support (the CPU
    wheel of serving images and near-line workers) outside TRITON_INTERPRET=1. That import costs
    0.2-0.4 s of every process start (issue 25: a worker restart is an outage)."""
    if importlib.util.find_spec("triton") is None:
        return "No module named 'triton'"
    if torch.version.cuda is None and torch.version.hip is None and not triton_interpret():
        return "not imported: this torch build has no GPU support and TRITON_INTERPRET is not 1"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


TRITON_IMPORT_ERROR = _triton_import_error()

_REGISTRY: dict[str, dict[str, tuple[Callable, frozenset, Callable | None]]] = {}


def register(op: str, backend: str, devices=("cpu", "cuda"), supports: Callable | None = None):
    """supports(*args) -> None if the implementation takes these call arguments, else why not."""
    assert backend in BACKENDS, backend

    def deco(fn):
        impl = _on_tensor_device(fn) if backend == "triton" else fn
        _REGISTRY.setdefault(op, {})[backend] = (impl, frozenset(devices), supports)
        return impl

    return deco


def _on_tensor_device(fn: Callable) -> Callable:
    """Triton launches on the *current* CUDA device: make that the first tensor argument's
    device, so tensors on cuda:1 work while cuda:0 is current."""

    @functools.wraps(fn)
    def launch(t, *args, **kwargs):
        if t.device.type == "cuda":
            with torch.cuda.device(t.device):
                return fn(t, *args, **kwargs)
        return fn(t, *args, **kwargs)

    return launch


def unavailable_reason(backend: str, device_type: str) -> str | None:
    """None if `backend` can run on `device_type` here, else why not."""
    if backend == "torch":
        return None
    if backend == "triton":
        if TRITON_IMPORT_ERROR is not None:
            return f"triton unavailable ({TRITON_IMPORT_ERROR})"
        if device_type == "cpu" and not triton_interpret():
            return "Triton kernels run on CPU tensors only under TRITON_INTERPRET=1"
        return None
    if backend == "cpp":
        if not _ext.has_cpu_ext():
            return _ext.UNAVAILABLE_REASON
        if device_type == "cuda" and not _ext.has_cuda_ext():
            return "postembed_fast._C was built without CUDA kernels, or no CUDA device is visible"
        return None
    raise ValueError(f"unknown backend {backend!r}; valid: None, " + ", ".join(map(repr, BACKENDS)))


def _refuses(entry, args) -> str | None:
    supports = entry[2]
    return None if supports is None or args is None else supports(*args)


def choose(op: str, device: torch.device, backend: str | None, args: tuple | None = None) -> Callable:
    """The implementation of `op` for tensors on `device`; `args` (the call's arguments) lets
    implementations with a `supports` check decline."""
    impls = _REGISTRY[op]
    dev = device.type
    if backend is None:
        for name in OP_PREFERENCE.get((op, dev)) or PREFERENCE.get(dev, ("torch",)):
            entry = impls.get(name)
            if entry and dev in entry[1] and unavailable_reason(name, dev) is None and _refuses(entry, args) is None:
                return entry[0]
        return impls["torch"][0]
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: None, " + ", ".join(map(repr, BACKENDS)))
    if backend not in impls or dev not in impls[backend][1]:
        raise RuntimeError(f"{op}: backend={backend!r} is not implemented for {dev} tensors")
    reason = unavailable_reason(backend, dev)
    if reason is not None:
        raise RuntimeError(f"{op}: backend={backend!r} is unavailable: {reason}")
    reason = _refuses(impls[backend], args)
    if reason is not None:
        raise ValueError(f"{op} ({backend}): {reason}")
    return impls[backend][0]


def implemented() -> dict[str, list[str]]:
    """{op: [backends implemented]} (for info() and tests)."""
    return {op: sorted(impls) for op, impls in _REGISTRY.items()}
