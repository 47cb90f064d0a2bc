"""The compiled module postembed_fast._C (csrc/), or the reason it is unavailable.

Importing this never touches a GPU: cuda_device_count() is only called on demand.
"""
from __future__ import annotations

import importlib

try:
    _C = importlib.import_module("postembed_fast._C")
    UNAVAILABLE_REASON = None
    from postembed_fast.kernels import cpu_isa as _cpu_isa

    _cpu_isa.apply_isa_env(_C)  # POSTEMBED_CPU_ISA caps every C++ kernel from the first call on
except ImportError as exc:  # a source checkout without a build, or a broken wheel
    _C = None
    UNAVAILABLE_REASON = f"postembed_fast._C could not be imported: {exc}"


def has_cpu_ext() -> bool:
    return _C is not None


def has_cuda_ext() -> bool:
    """CUDA kernels compiled in AND a device visible to the driver."""
    return _C is not None and _C.cuda_compiled() and _C.cuda_device_count() > 0
