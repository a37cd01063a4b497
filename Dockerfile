# syntax=docker/dockerfile:1.7
# wmtp training image: torchrun over 4x A100 (sm_80), torch and every CUDA library pinned by uv.lock.
#
# Why this base: torch 2.13.0's Linux x86_64 wheel on PyPI is the CUDA 13.0 build and brings its CUDA
# user-space libraries (cuBLAS, cuDNN 9, NCCL, nvJitLink, ...) as hash-pinned wheels in uv.lock. The image
# therefore needs only CUDA 13.0's base layer (cudart + the NVIDIA container env); the -runtime and
# -cudnn-runtime variants would ship a second, unused copy of those libraries (several GB).
# The torch the base is meant for is stated once, in ARG TORCH_VERSION / CUDA_VERSION below;
# tests/test_packaging.py checks them against pyproject.toml, uv.lock and the FROM tag, and the build
# itself asserts them against the installed torch.
#
# Host requirement: NVIDIA driver >= 580 (the CUDA 13.0 driver branch) and the NVIDIA Container Toolkit.
# A100 nodes still on R535/R550/R570 cannot run this image as-is: see docs/DEPLOY.md.
#
#   docker build -t wmtp:0.1.0 .
#   docker run --rm --gpus all --ipc=host -v "$PWD/../shared/data:/data:ro" wmtp:0.1.0
#   (default command: torchrun --nproc_per_node=4 train.py configs/rho1_mbpp.toml)

# uv comes from PyPI, pinned; this throwaway stage exists only to pip-install it.
FROM python:3.11-slim-bookworm AS uv
ARG UV_VERSION=0.13.9
RUN pip install --no-cache-dir "uv==${UV_VERSION}"

FROM nvidia/cuda:13.0.2-base-ubuntu22.04
ARG TORCH_VERSION=2.13.0
ARG CUDA_VERSION=13.0
ARG PYTHON_VERSION=3.11.18
LABEL org.opencontainers.image.title="wmtp" \
      org.opencontainers.image.description="Weighted Multi-Token Prediction fine-tuning (torchrun, 4x A100)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      wmtp.torch.version="${TORCH_VERSION}" \
      wmtp.cuda.version="${CUDA_VERSION}" \
      wmtp.nvidia.driver.min="580"

# Python is uv-managed (pinned patch) so the venv does not depend on Ubuntu's python3 (3.10 on 22.04).
# The venv lives outside /app and stays root-owned: the training user can run it but not modify it.
ENV PYTHONUNBUFFERED=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    WMTP_DATA_DIR=/data

COPY --from=uv /usr/local/bin/uv /usr/local/bin/uv

# The training user owns only what training writes: /app (runs/, .cache/, mlruns/) and /data.
RUN groupadd --gid 1000 wmtp \
 && useradd --create-home --uid 1000 --gid 1000 --shell /bin/bash wmtp \
 && install -d -o wmtp -g wmtp /app /data

WORKDIR /app

# Dependencies first (they change rarely): this layer is reused until pyproject.toml or uv.lock change.
COPY pyproject.toml uv.lock ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv python install "${PYTHON_VERSION}" \
 && uv sync --frozen --no-install-project --python "${PYTHON_VERSION}" \
 && python -c "import torch; v = torch.__version__.split('+')[0]; c = torch.version.cuda or ''; \
assert v == '${TORCH_VERSION}' and c.startswith('${CUDA_VERSION}'), f'torch {v} CUDA {c} != ARGs'"

# Code last: editing a .py file rebuilds only this layer. The scripts run from /app (no install step).
COPY --chown=1000:1000 . .

# Numeric uid:gid (the wmtp user above), so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 1000:1000
ENTRYPOINT ["torchrun"]
CMD ["--nproc_per_node=4", "train.py", "configs/rho1_mbpp.toml"]
