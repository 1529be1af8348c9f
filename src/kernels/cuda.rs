//! CUDA forward of the fused op (feature `cuda`): three cuBLAS GEMMs into one output buffer
//! — `Y = X Wᵀ` (β = 0), `XA = X Aᵀ`, `Y += s · XA Bᵀ` (β = 1) — then one small epilogue
//! kernel (row scale, bias), compiled with NVRTC on first use. f32 and f64; inputs must be
//! contiguous (`FusedLinear::forward` makes them so). The backward on CUDA is the op's
//! composed backward (candle ops through cuBLAS): still no gradient for `W`.
//!
//! Compiled by `scripts/check-cuda.sh`; not run in this crate's tests (no GPU there).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::{
    sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig,
};
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, Layout, Shape, Storage, Tensor, WithDType};

/// What the forward needs besides its inputs `x`, `A` and `[B|c]`: the fused op's frozen
/// tensors and settings (the CPU side's counterpart is `cpu::Forward`).
pub(crate) struct Forward<'a> {
    /// Frozen `W`, `(d_out, d_in)`, of `x`'s dtype, on the GPU.
    pub weight: &'a Tensor,
    /// Frozen bias, `(d_out,)`.
    pub bias: Option<&'a Tensor>,
    /// The scale `s`.
    pub scale: f64,
    /// The rank `r` (0: no low-rank term).
    pub rank: usize,
    /// Whether `[B|c]` carries the row scale as its last column.
    pub row_scale: bool,
}

/// The epilogue `y[i, j] = (has_c ? c[j * cs] : 1) · y[i, j] + (has_b ? b[j] : 0)`.
const EPILOGUE_SRC: &str = r#"
template <typename T>
__device__ void epilogue(T* y, const T* c, long cs, const T* b, long total, long d_out,
                         int has_c, int has_b) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long)blockDim.x * gridDim.x) {
        long j = i % d_out;
        T v = y[i];
        if (has_c) v *= c[j * cs];
        if (has_b) v += b[j];
        y[i] = v;
    }
}
extern "C" __global__ void lorakit_epilogue_f32(float* y, const float* c, long cs,
    const float* b, long total, long d_out, int has_c, int has_b) {
    epilogue<float>(y, c, cs, b, total, d_out, has_c, has_b);
}
extern "C" __global__ void lorakit_epilogue_f64(double* y, const double* c, long cs,
    const double* b, long total, long d_out, int has_c, int has_b) {
    epilogue<double>(y, c, cs, b, total, d_out, has_c, has_b);
}
"#;

const MODULE: &str = "lorakit_fused_epilogue";

/// The epilogue's PTX, compiled once per process.
fn epilogue_ptx() -> candle_core::Result<&'static str> {
    static PTX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    if let Some(p) = PTX.get() {
        return Ok(p);
    }
    let ptx = candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(EPILOGUE_SRC).w()?;
    Ok(PTX.get_or_init(|| ptx.to_src()))
}

/// A dtype the CUDA path handles.
pub(crate) trait CudaFloat: WithDType + CudaDType + DeviceRepr + ValidAsZeroBits {
    /// The epilogue kernel's name for this dtype.
    const EPILOGUE: &'static str;
}

impl CudaFloat for f32 {
    const EPILOGUE: &'static str = "lorakit_epilogue_f32";
}

impl CudaFloat for f64 {
    const EPILOGUE: &'static str = "lorakit_epilogue_f64";
}

/// A contiguous input's view from its start offset.
fn view<'a, T: CudaFloat>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<CudaView<'a, T>> {
    if !l.is_contiguous() {
        candle_core::bail!("fused linear (cuda): {what} must be contiguous");
    }
    let slice: &CudaSlice<T> = s.as_cuda_slice::<T>()?;
    let start = l.start_offset();
    match slice.try_slice(start..start + l.shape().elem_count()) {
        Some(v) => Ok(v),
        None => candle_core::bail!("fused linear (cuda): {what} overruns its buffer"),
    }
}

fn int(v: usize) -> candle_core::Result<i32> {
    i32::try_from(v)
        .map_err(|_| candle_core::Error::Msg(format!("fused linear (cuda): {v} exceeds i32")))
}

/// `C (col-major m × n, ldc) = alpha · op(A) op(B) + beta · C` with `op = T` for `A`.
#[allow(clippy::too_many_arguments)]
fn gemm_tn<T: CudaFloat>(
    blas: &CudaBlas,
    (m, n, k): (usize, usize, usize),
    alpha: T,
    a: &CudaView<T>,
    lda: usize,
    b: &CudaView<T>,
    ldb: usize,
    beta: T,
    c: &mut CudaSlice<T>,
    ldc: usize,
) -> candle_core::Result<()>
where
    CudaBlas: Gemm<T>,
{
    if m == 0 || n == 0 {
        return Ok(());
    }
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_T,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: int(m)?,
        n: int(n)?,
        k: int(k)?,
        alpha,
        lda: int(lda)?,
        ldb: int(ldb)?,
        beta,
        ldc: int(ldc)?,
    };
    // SAFETY: the views hold at least the elements the dimensions and leading dimensions
    // describe (checked by the op's shape check and `view`), and `c` is `m × n` with
    // `ldc = m`.
    unsafe { blas.gemm(cfg, a, b, c) }.w()
}

/// The forward for one dtype; row-major `Y (n × d_out)` is the column-major `Yᵀ` cuBLAS
/// writes.
fn forward_t<T: CudaFloat>(
    op: &Forward<'_>,
    x: (&CudaStorage, &Layout),
    a: (&CudaStorage, &Layout),
    bc: (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)>
where
    CudaBlas: Gemm<T>,
{
    let dev = x.0.device.clone();
    let (d_out, d_in) = op.weight.dims2()?;
    let n = x.1.shape().elem_count() / d_in.max(1);
    let r = op.rank;
    let width = r + usize::from(op.row_scale);
    let blas = dev.cublas_handle();
    let xv = view::<T>(x.0, x.1, "x")?;
    let (w_guard, w_layout) = op.weight.storage_and_layout();
    let Storage::Cuda(w_storage) = &*w_guard else {
        candle_core::bail!("fused linear (cuda): W is not on the GPU");
    };
    let wv = view::<T>(w_storage, w_layout, "W")?;
    let mut y = dev.alloc_zeros::<T>(n * d_out)?;
    let (zero, one) = (T::from_f64(0.0), T::from_f64(1.0));
    gemm_tn(
        &blas,
        (d_out, n, d_in),
        one,
        &wv,
        d_in,
        &xv,
        d_in,
        zero,
        &mut y,
        d_out,
    )?;
    let bcv = view::<T>(bc.0, bc.1, "[B|c]")?;
    if r > 0 {
        let av = view::<T>(a.0, a.1, "A")?;
        let mut xa = dev.alloc_zeros::<T>(n * r)?;
        gemm_tn(
            &blas,
            (r, n, d_in),
            one,
            &av,
            d_in,
            &xv,
            d_in,
            zero,
            &mut xa,
            r,
        )?;
        let xav = xa.slice(..);
        let s = T::from_f64(op.scale);
        gemm_tn(
            &blas,
            (d_out, n, r),
            s,
            &bcv,
            width,
            &xav,
            r,
            one,
            &mut y,
            d_out,
        )?;
    }
    let bias = op.bias.as_ref().map(|b| b.storage_and_layout());
    let bias_view = match &bias {
        Some((guard, layout)) => match &**guard {
            Storage::Cuda(s) => Some(view::<T>(s, layout, "bias")?),
            _ => candle_core::bail!("fused linear (cuda): the bias is not on the GPU"),
        },
        None => None,
    };
    if op.row_scale || bias_view.is_some() {
        let func = dev.get_or_load_custom_func(T::EPILOGUE, MODULE, epilogue_ptx()?)?;
        // The row scale is column r of [B|c]; absent pointers are replaced by any valid one.
        let (Some(c_view), Some(any_view)) = (bcv.try_slice(r.min(bcv.len())..), bcv.try_slice(..))
        else {
            candle_core::bail!("fused linear (cuda): cannot view [B|c]");
        };
        let b_view = bias_view.unwrap_or(any_view);
        let total = (n * d_out) as i64;
        let (cs, d_out_l) = (width as i64, d_out as i64);
        let (has_c, has_b) = (i32::from(op.row_scale), i32::from(op.bias.is_some()));
        let blocks = u32::try_from(((n * d_out).div_ceil(256)).clamp(1, 65_535)).unwrap_or(65_535);
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut builder = func.builder();
        builder.arg(&mut y);
        builder.arg(&c_view);
        builder.arg(&cs);
        builder.arg(&b_view);
        builder.arg(&total);
        builder.arg(&d_out_l);
        builder.arg(&has_c);
        builder.arg(&has_b);
        // SAFETY: the kernel reads `c` at `j * cs` (`j < d_out`, inside column r of the
        // `d_out × width` packed input) and `b` at `j < d_out`, and writes `y` below `total`.
        unsafe { builder.launch(cfg) }.w()?;
    }
    let mut dims = x.1.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = d_out;
    }
    Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from(dims)))
}

/// The op's CUDA forward (f32, f64).
pub(crate) fn forward(
    op: &Forward<'_>,
    x: (&CudaStorage, &Layout),
    a: (&CudaStorage, &Layout),
    bc: (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    match x.0.dtype() {
        candle_core::DType::F32 => forward_t::<f32>(op, x, a, bc),
        candle_core::DType::F64 => forward_t::<f64>(op, x, a, bc),
        d => candle_core::bail!("fused linear (cuda): unsupported dtype {d:?}"),
    }
}

/// Whether `t` can go through the CUDA op.
pub(crate) fn supported(t: &Tensor) -> bool {
    t.device().is_cuda() && matches!(t.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
}
