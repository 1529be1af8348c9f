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

source scripts/cuda-env.sh

start=$(date +%s)
cargo "${CHECK_CUDA_CMD:-build}" --features cuda --lib --target-dir target-cuda "$@"
echo "check-cuda: --features cuda built in $(( $(date +%s) - start )) s"
