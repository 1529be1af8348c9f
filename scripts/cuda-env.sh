# Sourced by scripts/check-cuda.sh and scripts/gpu-check.sh: CUDA's compiler from PyPI
# (installed once into $CUDA_PIP_DIR, default target-cuda/cuda-pip) and the variables
# cudarc and candle-kernels read. CUDARC_CUDA_VERSION (default 13000) is the CUDA API
# cudarc binds; CUDA_COMPUTE_CAP (default 90, Hopper) the architecture candle-kernels
# compiles its PTX for.
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
