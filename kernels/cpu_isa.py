"""The CPU capability table: which ISA build the C++ kernels run and which dtype the encoder computes in.

One table (TEI's way: detect, choose, fall back). The C++ side (csrc/cpu_isa.h) detects the level with
__builtin_cpu_supports and caps it; this module is its Python mirror, applies POSTEMBED_CPU_ISA once when
the extension loads, and chooses the CPU compute dtype:

    explicit dtype argument  >  POSTEMBED_CPU_DTYPE  >  COMPUTE_DTYPES (first row this CPU admits)

Nothing here touches a GPU; without the compiled extension the level is "baseline" (torch ops only).
"""
from __future__ import annotations

import functools
import os
import platform

import torch

# Lowest first, index = the C++ enum value. The flags each level needs (as /proc/cpuinfo spells them).
ISA_LEVELS = ("baseline", "avx2", "avx512", "amx")
LEVEL_FLAGS = {
    "baseline": (),
    "avx2": ("avx2", "fma", "popcnt"),
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq"),
    "amx": ("amx_tile", "amx_bf16", "avx512_bf16"),
}
ISA_ENV = "POSTEMBED_CPU_ISA"
DTYPE_ENV = "POSTEMBED_CPU_DTYPE"
CPU_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# The CPU compute dtype: the first row whose feature the kernels may use at the current level wins.
# Why bf16 there: with AMX-BF16 (or AVX512-BF16) oneDNN runs the encoder's bf16 GEMMs 7-10x faster than
# float32 (issue 20: 2.2-3.2 vs 0.29-0.33 TFLOP/s on a 2-core Xeon with AMX) at min cosine >= 0.9999 vs
# float32; without them torch converts bf16 in software and float32 is both faster and exact.
COMPUTE_DTYPES = (
    ("amx_bf16", torch.bfloat16, "AMX-BF16 tiles: bf16 GEMMs at several times the float32 rate"),
    ("avx512_bf16", torch.bfloat16, "AVX512-BF16 (vdpbf16ps): native bf16 dot products"),
    (None, torch.float32, "no native bf16 at this ISA level: float32 is faster and exact"),
)


def _ext():
    from postembed_fast.kernels import _ext as ext

    return ext._C


def parse_isa(value: str) -> str:
    if value not in ISA_LEVELS:
        raise ValueError(f"{ISA_ENV}={value!r}: expected one of {', '.join(ISA_LEVELS)}")
    return value


def apply_isa_env(C) -> None:
    """Cap every C++ kernel at POSTEMBED_CPU_ISA (called once, when the extension loads)."""
    value = os.environ.get(ISA_ENV, "").strip().lower()
    if value:
        C._set_cpu_isa_cap(ISA_LEVELS.index(parse_isa(value)))


def detected_level() -> str:
    """The best level this CPU and OS support (what the kernels would use uncapped)."""
    C = _ext()
    return ISA_LEVELS[C.cpu_isa_detected()] if C is not None else "baseline"


def current_level() -> str:
    """The level the C++ kernels use now (detected, capped by POSTEMBED_CPU_ISA or a test)."""
    C = _ext()
    return ISA_LEVELS[C.cpu_isa()] if C is not None else "baseline"


def features() -> dict[str, bool]:
    """Sub-features the kernels may use at the current level (avx512_bf16, avx512_vnni, amx_bf16, ...)."""
    C = _ext()
    return dict(C.cpu_features()) if C is not None else {}


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, tuple[str, ...]]:
    model, flags = platform.processor() or platform.machine(), ()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = tuple(value.split())
                if flags and key == "model name":
                    break
    except OSError:  # not Linux: the model from platform, no flags
        pass
    return model, flags


def compute_dtype() -> tuple[torch.dtype, str]:
    """The CPU compute dtype when the caller gave none, and why: POSTEMBED_CPU_DTYPE, else the table."""
    value = os.environ.get(DTYPE_ENV, "").strip().lower()
    if value:
        if value not in CPU_DTYPES:
            raise ValueError(f"{DTYPE_ENV}={value!r}: expected one of {', '.join(CPU_DTYPES)}")
        return CPU_DTYPES[value], f"{DTYPE_ENV}={value}"
    have = features()
    for feature, dtype, why in COMPUTE_DTYPES:
        if feature is None or have.get(feature):
            return dtype, why
    raise AssertionError("COMPUTE_DTYPES ends with a row that always matches")


def info() -> dict:
    """info()["cpu"]: the CPU, its flags, the ISA build the kernels use and the default compute dtype."""
    model, flags = _cpuinfo()
    dtype, reason = compute_dtype()
    return {
        "model": model,
        "flags": " ".join(flags),
        "isa": current_level(),
        "isa_detected": detected_level(),
        "isa_env": os.environ.get(ISA_ENV) or None,
        "features": features(),
        "compute_dtype": str(dtype).removeprefix("torch."),
        "reason": reason,
    }


# The CPU scans' builds (csrc/topk_cpu.cpp, picked by _C.topk_cpu_level()) and the instructions each
# scan's inner loop runs on in each. The AVX-512 build needs VPOPCNTDQ and VNNI besides F/BW/VL/DQ
# (Ice Lake, Sapphire Rapids, Zen 4 and newer); a CPU with AVX-512 but without either runs the AVX2 one.
SCAN_LEVELS = ("baseline", "avx2", "avx512")
SCAN_AVX512_FEATURES = ("avx512_vpopcntdq", "avx512_vnni")
SCAN_BUILDS = {
    "baseline": {"binary": "scalar popcount", "int8": "scalar int32 dot", "float32": "vector-extension dot",
                 "sign_dot": "8 bit-plane AND + popcount", "rabitq": "sign-dot (bit planes) + float64 factors"},
    "avx2": {"binary": "vpshufb nibble counts on a transposed tile (>= 4 queries), else popcnt",
             "int8": "vpmovsxbw + vpmaddwd", "float32": "8-wide FMA",
             "sign_dot": "byte expansion + vpmaddubsw", "rabitq": "sign-dot (vpmaddubsw) + float64 factors"},
    "avx512": {"binary": "vpopcntq on a transposed tile (>= 4 queries), else popcnt",
               "int8": "vpdpbusd (VNNI, q + 128 against signed codes)", "float32": "16-wide FMA",
               "sign_dot": "mask expansion + vpdpbusd", "rabitq": "sign-dot (vpdpbusd) + float64 factors"},
}


def scan_level() -> str:
    """The build the CPU scans run now (follows the ISA level and its cap)."""
    C = _ext()
    return SCAN_LEVELS[C.topk_cpu_level()] if C is not None else "torch"


def scans() -> dict:
    """info()["scans"]: per CPU scan, its build and the instructions it runs on; why not AVX-512 when
    the level would allow it but a scan feature is missing."""
    level = scan_level()
    if level == "torch":
        return {"build": "torch", "reason": "compiled extension unavailable: the torch reference scans"}
    out = {"build": level, **{scan: {"build": level, "uses": how} for scan, how in SCAN_BUILDS[level].items()}}
    if level != "avx512" and current_level() in ("avx512", "amx"):
        missing = [f for f in SCAN_AVX512_FEATURES if not features().get(f)]
        out["reason"] = f"the AVX-512 scan build needs {' and '.join(missing)}"
    return out
