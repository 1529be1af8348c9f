//! The element types the CUDA kernels take, and what cuBLAS and the NVRTC kernels need to
//! know about each.

use candle_core::cuda_backend::cudarc::cublas::sys::{cublasComputeType_t, cudaDataType_t};
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use candle_core::cuda_backend::CudaDType;
use candle_core::WithDType;

/// A float type the CUDA path runs in. Half types (bf16, f16) are stored in 16 bits and
/// computed with f32 accumulation: cuBLAS `GemmEx` with a 32F compute type, f32 arithmetic
/// in the elementwise kernels.
pub(crate) trait CudaFloat: WithDType + CudaDType + DeviceRepr + ValidAsZeroBits {
    /// The suffix of this type's elementwise kernels (`lorakit_epilogue_<suffix>`).
    const SUFFIX: &'static str;
    /// cuBLAS's name for the storage type.
    const DATA: cudaDataType_t;
    /// The accumulation cuBLAS runs in (never TF32: f32 products stay exact f32).
    const COMPUTE: cublasComputeType_t;
    /// Whether cuBLAS's `alpha`/`beta` are f64 (else f32).
    const F64_SCALARS: bool;
}

impl CudaFloat for f32 {
    const SUFFIX: &'static str = "f32";
    const DATA: cudaDataType_t = cudaDataType_t::CUDA_R_32F;
    const COMPUTE: cublasComputeType_t = cublasComputeType_t::CUBLAS_COMPUTE_32F;
    const F64_SCALARS: bool = false;
}

impl CudaFloat for f64 {
    const SUFFIX: &'static str = "f64";
    const DATA: cudaDataType_t = cudaDataType_t::CUDA_R_64F;
    const COMPUTE: cublasComputeType_t = cublasComputeType_t::CUBLAS_COMPUTE_64F;
    const F64_SCALARS: bool = true;
}

impl CudaFloat for half::bf16 {
    const SUFFIX: &'static str = "bf16";
    const DATA: cudaDataType_t = cudaDataType_t::CUDA_R_16BF;
    const COMPUTE: cublasComputeType_t = cublasComputeType_t::CUBLAS_COMPUTE_32F;
    const F64_SCALARS: bool = false;
}

impl CudaFloat for half::f16 {
    const SUFFIX: &'static str = "f16";
    const DATA: cudaDataType_t = cudaDataType_t::CUDA_R_16F;
    const COMPUTE: cublasComputeType_t = cublasComputeType_t::CUBLAS_COMPUTE_32F;
    const F64_SCALARS: bool = false;
}

/// Runs `$f::<T>($args)` for the element type `T` of `$dtype` (f32, f64, bf16, f16), or
/// fails naming the dtype.
macro_rules! dispatch_float {
    ($dtype:expr, $what:literal, $f:ident ( $($arg:expr),* $(,)? )) => {
        match $dtype {
            candle_core::DType::F32 => $f::<f32>($($arg),*),
            candle_core::DType::F64 => $f::<f64>($($arg),*),
            candle_core::DType::BF16 => $f::<half::bf16>($($arg),*),
            candle_core::DType::F16 => $f::<half::f16>($($arg),*),
            d => candle_core::bail!("{} (cuda): unsupported dtype {d:?}", $what),
        }
    };
}
pub(crate) use dispatch_float;
