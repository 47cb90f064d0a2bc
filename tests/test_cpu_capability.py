"""The CPU capability table (kernels/cpu_isa.py + csrc/cpu_isa.h): which ISA build the C++ kernels run,
POSTEMBED_CPU_ISA capping it, and the default CPU compute dtype (explicit dtype > POSTEMBED_CPU_DTYPE >
the table). Env-variable cases run in a fresh interpreter: the ISA cap applies when the extension loads."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from postembed_fast.kernels import _ext, cpu_isa

pytestmark = pytest.mark.skipif(_ext._C is None, reason=f"compiled extension unavailable: {_ext.UNAVAILABLE_REASON}")


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in (cpu_isa.ISA_ENV, cpu_isa.DTYPE_ENV)}
    return subprocess.run([sys.executable, "-c", code], env={**full, **env}, capture_output=True, text=True,
                          timeout=120)


def cpu_info_under(**env) -> dict:
    r = run_python("import json, postembed_fast as p; print(json.dumps(p.info()['cpu']))", **env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_detected_level_matches_the_cpus_flags():
    """The C++ detection (__builtin_cpu_supports) agrees with /proc/cpuinfo's flags for each level."""
    info = cpu_isa.info()
    flags = set(info["flags"].split())
    if not flags:
        pytest.skip("no /proc/cpuinfo flags on this OS")
    best = "baseline"
    for level in cpu_isa.ISA_LEVELS[1:]:
        if not set(cpu_isa.LEVEL_FLAGS[level]) <= flags:
            break
        best = level
    # AMX also needs the OS to grant the tile state, so flags can promise more than the kernels get.
    detected = info["isa_detected"]
    assert detected == best or (best == "amx" and detected == "avx512"), (detected, best)


def test_cap_lowers_every_kernel_build_and_its_features():
    C = _ext._C
    detected = C.cpu_isa_detected()
    prev = C._set_cpu_isa_cap(0)
    try:
        assert C.cpu_isa() == 0 and cpu_isa.current_level() == "baseline"
        assert not C.cpu_avx2()  # the older kernels ask the same switch
        assert not any(cpu_isa.features().values())  # no sub-feature above the level
        assert cpu_isa.compute_dtype()[0] == torch.float32 or os.environ.get(cpu_isa.DTYPE_ENV)
        C._set_cpu_isa_cap(3)  # a cap above the CPU's best leaves the detected level
        assert C.cpu_isa() == detected
    finally:
        C._set_cpu_isa_cap(prev)
    with pytest.raises(ValueError, match="ISA cap"):
        C._set_cpu_isa_cap(4)


@pytest.mark.parametrize("cap", cpu_isa.ISA_LEVELS)
def test_scan_build_follows_the_level_and_its_features(cap):
    """info()["scans"]: AVX-512 exactly when the level admits it and the CPU has VPOPCNTDQ and VNNI,
    AVX2 at the AVX2 level (or AVX-512 without them), baseline below; every scan names its build."""
    C = _ext._C
    prev = C._set_cpu_isa_cap(cpu_isa.ISA_LEVELS.index(cap))
    try:
        level, f = cpu_isa.current_level(), cpu_isa.features()
        if level in ("avx512", "amx") and all(f.get(x) for x in cpu_isa.SCAN_AVX512_FEATURES):
            want = "avx512"
        else:
            want = "baseline" if level == "baseline" else "avx2"
        got = cpu_isa.scans()
        assert got["build"] == want == cpu_isa.scan_level()
        assert {s: got[s]["build"] for s in ("binary", "int8", "float32", "sign_dot", "rabitq")} == dict.fromkeys(
            ("binary", "int8", "float32", "sign_dot", "rabitq"), want)
        assert ("reason" in got) == (want == "avx2" and level in ("avx512", "amx"))
    finally:
        C._set_cpu_isa_cap(prev)


def test_compute_dtype_follows_the_table():
    """bfloat16 exactly when the kernels may use AMX-BF16 or AVX512-BF16 at the current level."""
    if os.environ.get(cpu_isa.DTYPE_ENV):
        pytest.skip(f"{cpu_isa.DTYPE_ENV} is set in this environment")
    f = cpu_isa.features()
    want = torch.bfloat16 if f["amx_bf16"] or f["avx512_bf16"] else torch.float32
    dtype, reason = cpu_isa.compute_dtype()
    assert dtype == want and reason


@pytest.mark.parametrize("level", cpu_isa.ISA_LEVELS)
def test_env_caps_the_level_from_the_first_call(level):
    info = cpu_info_under(POSTEMBED_CPU_ISA=level)
    want = min(cpu_isa.ISA_LEVELS.index(level), _ext._C.cpu_isa_detected())
    assert info["isa"] == cpu_isa.ISA_LEVELS[want]
    assert info["isa_env"] == level
    if want < cpu_isa.ISA_LEVELS.index("avx512"):  # no native bf16 below AVX-512: the float32 row
        assert info["compute_dtype"] == "float32"


@pytest.mark.parametrize("var, value", [("POSTEMBED_CPU_ISA", "sse9"), ("POSTEMBED_CPU_DTYPE", "float16")])
def test_bad_env_values_are_refused_by_name(var, value):
    r = run_python("import postembed_fast as p; p.Embedder(device='cpu')", **{var: value})
    assert r.returncode != 0
    assert "ValueError" in r.stderr and var in r.stderr and repr(value) in r.stderr, r.stderr[-2000:]


def test_explicit_dtype_beats_env_beats_table():
    code = ("import postembed_fast as p, torch;"
            "print(p.Embedder(device='cpu').dtype, p.Embedder(device='cpu', dtype=torch.float32).dtype)")
    r = run_python(code, POSTEMBED_CPU_DTYPE="bfloat16")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-2:] == ["torch.bfloat16", "torch.float32"]
    info = cpu_info_under(POSTEMBED_CPU_DTYPE="bfloat16")
    assert info["compute_dtype"] == "bfloat16" and "POSTEMBED_CPU_DTYPE" in info["reason"]


def test_info_names_the_cpu():
    info = cpu_isa.info()
    assert set(info) >= {"model", "flags", "isa", "isa_detected", "compute_dtype", "reason"}
    assert info["model"] and info["isa"] in cpu_isa.ISA_LEVELS
