#!/usr/bin/env bash
# Checks that lorakit compiles with `--features cuda` on a machine without a GPU or a
# system CUDA toolkit, using CUDA's compiler from PyPI.
#
# - installs nvidia-cuda-nvcc, nvidia-cuda-crt, nvidia-cuda-cccl, nvidia-cuda-runtime into
#   target-cuda/cuda-pip (once; set CUDA_PIP_DIR to reuse another copy);
# - builds the library only (no linking, so no libcuda/libcublas is needed) into its own
#   target dir, target-cuda/, so the normal CPU build cache is untouched;
# - CUDARC_CUDA_VERSION (default 13000) tells cudarc which CUDA API to bind, and
#   CUDA_COMPUTE_CAP (default 90) which architecture candle-kernels compiles its PTX for.
#
# Runtime: the first build took 22 min (1337 s) on 2 shared cores at low priority, most of
# it candle-kernels (nvcc over all of candle's .cu files), cudarc and candle-core; later
# builds are incremental (seconds). Too slow for CI: run it by hand. Extra arguments go to
# `cargo build`; CHECK_CUDA_CMD=clippy runs clippy instead, e.g.
# `CHECK_CUDA_CMD=clippy scripts/check-cuda.sh -- -D warnings`.
set -euo pipefail
cd "$(dirname "$0")/.."

PIP_DIR=${CUDA_PIP_DIR:-target-cuda/cuda-pip}
if [ ! -x "$PIP_DIR/nvidia/cu13/bin/nvcc" ]; then
    python3 -m pip install --quiet --target "$PIP_DIR" \
        nvidia-cuda-nvcc nvidia-cuda-crt nvidia-cuda-cccl nvidia-cuda-runtime
fi
CUDA_ROOT=$(cd "$PIP_DIR/nvidia/cu13" && pwd)
export CUDA_ROOT CUDA_PATH="$CUDA_ROOT" CUDA_HOME="$CUDA_ROOT" CUDA_TOOLKIT_ROOT_DIR="$CUDA_ROOT"
export PATH="$CUDA_ROOT/bin:$PATH"
# The PyPI wheels ship CCCL (cub/thrust/cuda::std) in include/cccl.
export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} -I$CUDA_ROOT/include/cccl"
export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

start=$(date +%s)
cargo "${CHECK_CUDA_CMD:-build}" --features cuda --lib --target-dir target-cuda "$@"
echo "check-cuda: --features cuda built in $(( $(date +%s) - start )) s"
