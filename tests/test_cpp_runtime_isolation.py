"""postembed_fast._C keeps its C++ runtime to itself (issue 9).

A toolchain that links libstdc++ statically into _C (e.g. a GCC configured that way,
reproduced here with LDFLAGS=-static-libstdc++) used to EXPORT that copy's symbols
(__cxa_throw, std::...). With torch's shared libstdc++ already loaded, the dynamic
loader bound part of _C's C++ runtime calls to torch's copy: every ValueError from _C
crashed the interpreter (SIGSEGV) on one machine and lost the value from its message
("got ") on another. The build now exports PyInit__C only (csrc/_C.map,
--exclude-libs,ALL, checked after the link by csrc/check_exports.cmake) and builds
error messages without iostreams.

test_static_libstdcxx_build_* builds the extension that way (a separate build dir under
tmp, CUDA off, ~15-30 s) and calls raw error paths of _C in a fresh interpreter that
imported torch first; the same calls run against the installed _C.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: argv[1] is the _C shared library to load. torch is
# imported FIRST, so its shared libstdc++ is in the process before _C.
RUNNER = textwrap.dedent(
    r'''
    import importlib.util, json, sys
    import torch

    so = sys.argv[1]
    spec = importlib.util.spec_from_file_location("postembed_fast._C", so)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)

    buf = torch.zeros(4096)             # float32 scratch: every pointer below is valid
    p = buf.data_ptr()
    cu = torch.tensor([0, 2, 4], dtype=torch.int32)
    cu_flat = torch.tensor([0, 2, 2], dtype=torch.int32)
    ranges = torch.tensor([[0.1] * 16, [float("inf")] * 16])  # [2, D=16] float32: max not finite
    inf, nan = float("inf"), float("nan")
    F32, U8 = m.PRECISION_CODES["float32"], m.PRECISION_CODES["uint8"]
    DF32 = m.DTYPE_CODES["float32"]
    MEAN = m.MODE_CODES["mean"]

    def pool(fn, *, precision=F32, dtype=DF32, out_cols=16, itemsize=4, cu_ptr=cu.data_ptr(), rng=0, device=None):
        args = [p, cu_ptr, 4, 2, 16, 16, dtype, MEAN, True, precision, rng, p, 2, out_cols, itemsize]
        return fn(*args) if device is None else fn(*args, device, 0)

    def quant(fn, *, precision=F32, dtype=DF32, itemsize=4, rng=0, device=None):
        args = [p, 2, 16, 16, dtype, precision, rng, p, 2, 16, itemsize]
        return fn(*args) if device is None else fn(*args, device, 0)

    def attn(D, scale=0.25):
        # q, sqt, sqh, k, skt, skh, v, svt, svh, out, sot, soh, cu, total, B, H, D, scale, threads
        return m.varlen_attention_cpu(p, D, D, p, D, D, p, D, D, p, D, D, cu.data_ptr(), 4, 2, 1, D, scale, 1)

    def ln(eps):
        return m.add_layernorm_cpu(p, 16, p, 16, p, p, p, 16, 4, 16, eps, 1)

    cases = {
        "ln-eps-inf": lambda: ln(inf),
        "ln-eps-negative": lambda: ln(-1e-5),
        "ln-eps-nan": lambda: ln(nan),
        "attn-head-dim-24": lambda: attn(24),
        "attn-scale-inf": lambda: attn(16, inf),
        "pool-cpu-precision": lambda: pool(m.pool_normalize_cpu, precision=9),
        "pool-cpu-out-shape": lambda: pool(m.pool_normalize_cpu, out_cols=15),
        "pool-cpu-cu-seqlens": lambda: pool(m.pool_normalize_cpu, cu_ptr=cu_flat.data_ptr()),
        "quant-cpu-dtype": lambda: quant(m.quantize_cpu, dtype=7),
        "quant-cpu-ranges": lambda: quant(m.quantize_cpu, precision=U8, itemsize=1, rng=ranges.data_ptr()),
        "pool-cuda-precision": lambda: pool(m.pool_normalize_cuda, precision=9, device=0),
        "pool-cuda-device": lambda: pool(m.pool_normalize_cuda, device=-1),
        "quant-cuda-itemsize": lambda: quant(m.quantize_cuda, precision=U8, itemsize=4, rng=ranges.data_ptr(),
                                             device=0),
    }
    if not m.cuda_compiled():  # valid arguments reach the "no CUDA" error (never a launch on host pointers)
        cases["pool-cuda-not-compiled"] = lambda: pool(m.pool_normalize_cuda, device=0)

    results = {}
    for _ in range(50):  # repeatedly: a broken runtime need not fail the first throw
        for name, call in cases.items():
            try:
                call()
                results[name] = ["no exception", ""]
            except Exception as exc:
                results[name] = [type(exc).__name__, str(exc)]
    print(json.dumps(results))
    '''
)

EXPECTED = {
    "ln-eps-inf": ("ValueError", "add_layernorm_cpu: eps must be finite and >= 0, got inf"),
    "ln-eps-negative": ("ValueError", "add_layernorm_cpu: eps must be finite and >= 0, got -1e-05"),
    "ln-eps-nan": ("ValueError", "add_layernorm_cpu: eps must be finite and >= 0, got nan"),
    "attn-head-dim-24": ("ValueError", "varlen_attention_cpu: head_dim must be 16, 32, 64 or 128, got 24"),
    "attn-scale-inf": ("ValueError", "varlen_attention_cpu: scale must be finite, got inf"),
    "pool-cpu-precision": ("ValueError", "pool_normalize_cpu: invalid precision code 9 (0=float32,"),
    "pool-cpu-out-shape": (
        "ValueError",
        "pool_normalize_cpu: out must be [2, 16] for D=16 and precision code 0, got [2, 15]",
    ),
    "pool-cpu-cu-seqlens": (
        "ValueError",
        "pool_normalize_cpu: cu_seqlens must be strictly increasing, but cu_seqlens[2]=2 <= cu_seqlens[1]=2",
    ),
    "quant-cpu-dtype": ("ValueError", "quantize_cpu: invalid dtype code 7 (0=float32,"),
    "quant-cpu-ranges": ("ValueError", "quantize_cpu: ranges[:, 0] = (0.1, inf) must be finite with max > min"),
    "pool-cuda-precision": ("ValueError", "pool_normalize_cuda: invalid precision code 9 (0=float32,"),
    "pool-cuda-device": ("ValueError", "pool_normalize_cuda: device index must be >= 0, got -1"),
    "quant-cuda-itemsize": (
        "ValueError",
        "quantize_cuda: out element size must be 1 bytes for precision code 3, got 4",
    ),
    "pool-cuda-not-compiled": ("RuntimeError", "pool_normalize_cuda: postembed_fast._C was built without CUDA"),
}


def _run_error_paths(so: Path, tmp_path: Path) -> None:
    script = tmp_path / "run_error_paths.py"
    script.write_text(RUNNER)
    proc = subprocess.run([sys.executable, str(script), str(so)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (
        f"{so.name} in a process with torch loaded first died with returncode {proc.returncode} "
        f"(negative: killed by that signal, -11 == SIGSEGV)\nstdout:\n{proc.stdout[-3000:]}\n"
        f"stderr:\n{proc.stderr[-3000:]}"
    )
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results, "no error path ran"
    for name, (etype, message) in results.items():
        want_type, want = EXPECTED[name]
        assert (etype, want) == (want_type, message[: len(want)]), f"{name}: got {etype}: {message!r}"


def _defined_dynamic_symbols(so: Path) -> list[str]:
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) not found: cannot list the module's dynamic symbols")
    out = subprocess.run([nm, "-D", "--defined-only", str(so)], capture_output=True, text=True, check=True).stdout
    return [line.split()[-1] for line in out.splitlines() if len(line.split()) >= 2]


def _installed_c() -> Path:
    try:
        mod = importlib.import_module("postembed_fast._C")
    except ImportError as exc:
        pytest.skip(f"compiled extension unavailable: {exc}")
    return Path(mod.__file__)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF dynamic symbol table (Linux only)")
def test_installed_module_exports_only_its_init_function():
    so = _installed_c()
    assert _defined_dynamic_symbols(so) == ["PyInit__C"], f"{so} exports more than PyInit__C"


def test_installed_module_error_paths_raise_full_messages(tmp_path):
    _run_error_paths(_installed_c(), tmp_path)


# ---- the reproduction: libstdc++ linked statically into _C ------------------------------


def _cxx() -> str | None:
    cxx = os.environ.get("CXX")
    return shutil.which(cxx.split()[0]) if cxx else (shutil.which("g++") or shutil.which("c++"))


@pytest.fixture(scope="module")
def static_libstdcxx_module(tmp_path_factory) -> Path:
    """_C built from this checkout with LDFLAGS=-static-libstdc++ (CUDA off) in a private build dir."""
    if not sys.platform.startswith("linux"):
        pytest.skip("-static-libstdc++ reproduction is Linux/ELF only")
    cxx = _cxx()
    if cxx is None:
        pytest.skip("no C++ compiler (g++ / c++ / $CXX) on PATH")
    have_backend = all(importlib.util.find_spec(n) is not None for n in ("scikit_build_core", "pybind11"))
    if have_backend and shutil.which("cmake") is None and importlib.util.find_spec("cmake") is None:
        pytest.skip("cmake not found (and scikit-build-core is installed, so pip would not fetch one)")
    tmp = tmp_path_factory.mktemp("static_libstdcxx")

    # Can this toolchain link libstdc++ statically at all (is libstdc++.a installed)?
    probe = tmp / "probe.cpp"
    probe.write_text('#include <string>\nstd::string f(int i) { return std::to_string(i); }\n')
    r = subprocess.run([cxx, "-shared", "-fPIC", "-static-libstdc++", str(probe), "-o", str(tmp / "probe.so")],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"{cxx} cannot link libstdc++ statically (libstdc++.a missing?): {r.stderr.strip()[-300:]}")

    env = dict(os.environ)
    env["LDFLAGS"] = ("-static-libstdc++ " + env.get("LDFLAGS", "")).strip()
    env["POSTEMBED_CUDA"] = "0"
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    cmd = [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-w", str(tmp / "wheel"),
           f"--config-settings=build-dir={tmp / 'build'}"]
    if have_backend:  # else pip fetches scikit-build-core + pybind11 (+ cmake if needed) as for `pip install .`
        cmd.append("--no-build-isolation")
    r = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"static-libstdc++ build failed:\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"

    (whl,) = (tmp / "wheel").glob("postembed_fast-*.whl")
    with zipfile.ZipFile(whl) as z:
        (member,) = [n for n in z.namelist() if n.startswith("postembed_fast/_C.") and n.endswith(".so")]
        z.extractall(tmp / "unpacked")  # the whole wheel: test_wheel_imports_as_a_package uses it
    so = tmp / "unpacked" / member

    # It really is the crashing configuration: no shared libstdc++ among its needed libraries.
    readelf = shutil.which("readelf")
    if readelf:
        dyn = subprocess.run([readelf, "-d", str(so)], capture_output=True, text=True, check=True).stdout
        assert "libstdc++" not in dyn, f"LDFLAGS=-static-libstdc++ was not applied:\n{dyn}"
    return so


def test_static_libstdcxx_build_exports_only_its_init_function(static_libstdcxx_module):
    assert _defined_dynamic_symbols(static_libstdcxx_module) == ["PyInit__C"]


def test_static_libstdcxx_build_raises_full_value_errors_after_torch(static_libstdcxx_module, tmp_path):
    _run_error_paths(static_libstdcxx_module, tmp_path)


def test_wheel_imports_as_a_package(static_libstdcxx_module, tmp_path):
    """The development install is editable (README); this is the wheel a serving image gets:
    kernels/ mapped in as postembed_fast.kernels beside _C, and it embeds."""
    site = static_libstdcxx_module.parent.parent
    code = (
        # -S: no .pth files, so an editable install of this checkout (its import hook) is not in the way
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
        "import torch, postembed_fast as p\n"
        "assert p.__file__.startswith(sys.argv[1]), p.__file__\n"
        "import postembed_fast.kernels as k; assert k.__file__.startswith(sys.argv[1]), k.__file__\n"
        "info = p.info(); assert info['cpu_ext'] and info['cpu_ext_error'] is None, info\n"
        "e = p.fast_embed(['hello world', 'we are hiring'], device='cpu', precision='int8')\n"
        "assert e.shape == (2, 384) and str(e.dtype) == 'int8', (e.shape, e.dtype)\n"
        "print('ok')\n"
    )
    import sysconfig

    r = subprocess.run([sys.executable, "-P", "-S", "-c", code, str(site), sysconfig.get_paths()["purelib"]], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-3000:] + r.stderr[-3000:]
