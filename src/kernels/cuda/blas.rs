//! Row-major GEMMs through cuBLAS (`GemmEx`): `D = α · op(P) op(Q) + β · D` for row-major
//! operands, written as the column-major `Dᵀ = op(Q)ᵀ op(P)ᵀ` cuBLAS computes. `β = 1`
//! accumulates into `D`, which is how the fused op puts several products into one buffer.

use candle_core::cuda_backend::cudarc::cublas::result::gemm_ex;
use candle_core::cuda_backend::cudarc::cublas::sys::{cublasGemmAlgo_t, cublasOperation_t};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut};
use candle_core::cuda_backend::{CudaDevice, WrapErr};

use super::dtype::CudaFloat;

/// A row-major matrix on the GPU as a GEMM operand: `rows × cols` stored at row stride
/// `ld`, used as is or transposed.
pub(super) struct Operand<'v, 'a, T> {
    /// The elements.
    pub view: &'v CudaView<'a, T>,
    /// Stored rows.
    pub rows: usize,
    /// Stored columns.
    pub cols: usize,
    /// Row stride (at least `cols`).
    pub ld: usize,
    /// Whether the product uses the transpose.
    pub transposed: bool,
}

impl<T> Clone for Operand<'_, '_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Operand<'_, '_, T> {}

impl<'v, 'a, T> Operand<'v, 'a, T> {
    /// A contiguous `rows × cols` operand used as is.
    pub fn new(view: &'v CudaView<'a, T>, rows: usize, cols: usize) -> Self {
        Self {
            view,
            rows,
            cols,
            ld: cols,
            transposed: false,
        }
    }

    /// The same operand with row stride `ld`.
    pub fn with_ld(self, ld: usize) -> Self {
        Self { ld, ..self }
    }

    /// The transposed operand.
    pub fn t(self) -> Self {
        Self {
            transposed: !self.transposed,
            ..self
        }
    }

    /// Rows and columns as the product sees them.
    fn shape(&self) -> (usize, usize) {
        if self.transposed {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        }
    }

    /// Whether `ld` and the view hold the stored matrix.
    fn fits(&self) -> bool {
        self.ld >= self.cols
            && (self.rows == 0 || (self.rows - 1) * self.ld + self.cols <= self.view.len())
    }

    fn op(&self) -> cublasOperation_t {
        if self.transposed {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        }
    }
}

/// A row-major destination: `rows × cols` at row stride `ld`.
pub(super) struct Dest<'d, T> {
    /// The elements.
    pub slice: &'d mut CudaSlice<T>,
    /// Row stride (at least the product's columns).
    pub ld: usize,
}

fn int(v: usize) -> candle_core::Result<i32> {
    i32::try_from(v)
        .map_err(|_| candle_core::Error::Msg(format!("fused linear (cuda): {v} exceeds i32")))
}

/// `dst = alpha · op(P) op(Q) + beta · dst` (row-major, `beta = 0` overwrites), with
/// `alpha`/`beta` passed to cuBLAS in the compute precision (f32 for f32/bf16/f16, f64 for
/// f64), so a scale is not rounded to 16 bits. Shapes are checked: an error names them.
pub(super) fn gemm<T: CudaFloat>(
    dev: &CudaDevice,
    alpha: f64,
    p: &Operand<'_, '_, T>,
    q: &Operand<'_, '_, T>,
    beta: f64,
    dst: Dest<'_, T>,
) -> candle_core::Result<()> {
    let ((m, k), (k2, n)) = (p.shape(), q.shape());
    let dst_fits = dst.ld >= n && (m == 0 || (m - 1) * dst.ld + n <= dst.slice.len());
    if k != k2 || !p.fits() || !q.fits() || !dst_fits {
        candle_core::bail!(
            "fused linear (cuda): a ({m} x {k}) · ({k2} x {n}) product into a buffer of {} at row stride {}, operands of {} and {} elements",
            dst.slice.len(),
            dst.ld,
            p.view.len(),
            q.view.len()
        );
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let blas = dev.cublas_handle();
    let stream = dev.cuda_stream();
    let (a, _read_a) = q.view.device_ptr(&stream);
    let (b, _read_b) = p.view.device_ptr(&stream);
    let (c, _write_c) = dst.slice.device_ptr_mut(&stream);
    let (alpha32, beta32) = (alpha as f32, beta as f32);
    let (alpha_ptr, beta_ptr) = if T::F64_SCALARS {
        (
            std::ptr::from_ref(&alpha).cast(),
            std::ptr::from_ref(&beta).cast(),
        )
    } else {
        (
            std::ptr::from_ref(&alpha32).cast(),
            std::ptr::from_ref(&beta32).cast(),
        )
    };
    // SAFETY: every operand was checked above to hold the elements its shape and leading
    // dimension describe; `alpha`/`beta` point to scalars of the compute type's width that
    // outlive the call; the handle is bound to `stream`, on which the pointers' records
    // order the reads and the write.
    unsafe {
        gemm_ex(
            *blas.handle(),
            q.op(),
            p.op(),
            int(n)?,
            int(m)?,
            int(k)?,
            alpha_ptr,
            a as *const _,
            T::DATA,
            int(q.ld)?,
            b as *const _,
            T::DATA,
            int(p.ld)?,
            beta_ptr,
            c as *mut _,
            T::DATA,
            int(dst.ld)?,
            T::COMPUTE,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .w()
}
