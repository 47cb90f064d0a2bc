#!/usr/bin/env bash
# One-shot check on a CUDA machine that has only this repo plus the machine's own torch/triton
# (and no network):  bench/gpu_check.sh [WHEELS_DIR]
#   1. a venv on top of the system packages (their torch and triton are used as they are),
#   2. the project installed editable with its CUDA kernels (pip never goes online: --no-index;
#      scikit-build-core, pybind11 and any missing dependency come from WHEELS_DIR if given,
#      else they must already be installed),
#   3. the whole test suite on the GPU, then the quick benchmark -> bench/results/<gpu-name>.json
#      and the op micro-benchmarks -> bench/results/<gpu-name>-ops.json.
# Exits non-zero if the tests failed (the benchmark still runs, for the numbers).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${GPU_VENV:-build/gpu-venv}"  # build/ is git-ignored
python3 -m venv --system-site-packages "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"

PIP=(python -m pip install -q --no-index)
if [ -n "${1:-}" ]; then
    PIP+=(--find-links "$(cd "$1" && pwd)")
    "${PIP[@]}" scikit-build-core pybind11
fi
export POSTEMBED_CUDA=1  # fail the build rather than silently skip the CUDA kernels
"${PIP[@]}" --no-build-isolation -e ".[test]"
python -c "import json, postembed_fast; print(json.dumps(postembed_fast.info(), indent=1))"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

unset TRITON_INTERPRET  # the Triton tests must run compiled, on the GPU
status=0
python -m pytest tests -q || status=$?

gpu=$(python -c "import re, torch; print(re.sub(r'[^A-Za-z0-9._-]+', '-', torch.cuda.get_device_name()))")
mkdir -p bench/results
python -m bench --device cuda --quick --json "bench/results/$gpu.json"
# op backends side by side (triton vs cpp vs torch): the data for dispatch.PREFERENCE on CUDA
python -m pytest bench/bench_ops.py --benchmark-only --benchmark-group-by=group -q \
    --benchmark-max-time=0.2 --benchmark-json "bench/results/$gpu-ops.json" || true
echo "tests exit status: $status; benchmark: bench/results/$gpu.json, ops: bench/results/$gpu-ops.json"
exit "$status"
