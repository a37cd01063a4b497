#!/usr/bin/env bash
# docker_smoke.sh: build the training image and run the tiny smoke inside it, on one GPU.
#
# For a machine with Docker (BuildKit), the NVIDIA Container Toolkit, an NVIDIA driver >= 580 (the image's
# torch is the CUDA 13.0 build) and the benchmark data. Not run in CI: GitHub's runners have no GPU and no data.
#
#   scripts/docker_smoke.sh [TAG]            default TAG: wmtp:smoke
#   env: WMTP_DATA_DIR  benchmark data on the host (default: ../shared/data), mounted read-only at /data
#        STEPS          training steps for the tiny run (default: 20)
#
# What a pass proves: the image builds from uv.lock alone; torch inside sees the GPU; the container runs as a
# non-root user; tiny.py (what `make tiny` runs; the image has no make) builds the tiny models, and
# `torchrun --nproc_per_node=1 train.py configs/tiny_mbpp.toml` trains on them through the image's entrypoint.
set -euo pipefail
cd "$(dirname "$0")/.."

tag="${1:-wmtp:smoke}"
data="${WMTP_DATA_DIR:-$(cd .. && pwd)/shared/data}"
steps="${STEPS:-20}"

command -v docker >/dev/null || { echo "docker_smoke: docker is not installed" >&2; exit 2; }
[ -d "$data" ] || { echo "docker_smoke: data dir '$data' not found: set WMTP_DATA_DIR" >&2; exit 2; }
[[ "$steps" =~ ^[0-9]+$ ]] || { echo "docker_smoke: STEPS='$steps' is not a whole number" >&2; exit 2; }

echo "== build $tag"
DOCKER_BUILDKIT=1 docker build -t "$tag" .

run=(docker run --rm --gpus all --ipc=host -v "$data:/data:ro" -e HF_HUB_OFFLINE=1 -e WMTP_DATA_DIR=/data)

echo "== checks: non-root user, GPU visible to torch"
"${run[@]}" --entrypoint bash "$tag" -c '
  set -euo pipefail
  [ "$(id -u)" != 0 ] || { echo "container runs as root" >&2; exit 1; }
  python -c "import torch; assert torch.cuda.is_available(), \"torch sees no GPU\"; \
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0))"
'

echo "== tiny models + $steps training steps"
"${run[@]}" --entrypoint bash "$tag" -c "
  set -euo pipefail
  python tiny.py --out .cache/tiny
  torchrun --nproc_per_node=1 train.py configs/tiny_mbpp.toml --train.steps=$steps
"
echo "docker_smoke: OK ($tag)"
