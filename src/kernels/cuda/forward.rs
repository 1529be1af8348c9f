//! The fused op's CUDA forward: `Y = X Wᵀ`, then `Y += s · (X Aᵀ) Bᵀ` into the same buffer
//! (cuBLAS, β = 1), then one epilogue kernel for the row scale and bias. When the op will
//! run backward it keeps `X Aᵀ` and, with a row scale, the pre-scale output `u` (the
//! backward's inputs, as on the CPU).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::{CudaStorage, Layout, Shape, Tensor};

use super::blas::{gemm, Dest, Operand};
use super::dtype::{dispatch_float, CudaFloat};
use super::elementwise::{epilogue, Column};
use super::storage::{tensor_view, view};

/// What the forward needs besides its inputs `x`, `A` and `[B|c]`: the fused op's frozen
/// tensors and settings (the CPU side's counterpart is `cpu::Forward`).
pub(crate) struct Forward<'a> {
    /// Frozen `W`, `(d_out, d_in)`, of `x`'s dtype, contiguous, on the GPU.
    pub weight: &'a Tensor,
    /// Frozen bias, `(d_out,)`.
    pub bias: Option<&'a Tensor>,
    /// The scale `s`.
    pub scale: f64,
    /// The rank `r` (0: no low-rank term).
    pub rank: usize,
    /// Whether `[B|c]` carries the row scale as its last column.
    pub row_scale: bool,
    /// Whether to keep the backward's intermediates (an input tracks a gradient).
    pub keep: bool,
}

/// The forward's output and what it keeps: `x Aᵀ` `(n, r)` and `u` `(n, d_out)`.
pub(crate) type Output = (CudaStorage, Shape, [Option<(CudaStorage, Shape)>; 2]);

/// The op's CUDA forward (f32, f64, bf16, f16).
pub(crate) fn forward(
    op: &Forward<'_>,
    x: (&CudaStorage, &Layout),
    a: (&CudaStorage, &Layout),
    bc: (&CudaStorage, &Layout),
) -> candle_core::Result<Output> {
    dispatch_float!(x.0.dtype(), "fused linear", forward_t(op, x, a, bc))
}

/// The forward for one dtype; row-major `Y (n × d_out)` is the column-major `Yᵀ` cuBLAS
/// writes.
fn forward_t<T: CudaFloat>(
    op: &Forward<'_>,
    x: (&CudaStorage, &Layout),
    a: (&CudaStorage, &Layout),
    bc: (&CudaStorage, &Layout),
) -> candle_core::Result<Output> {
    let dev = x.0.device.clone();
    let (d_out, d_in) = op.weight.dims2()?;
    let n = x.1.shape().elem_count() / d_in.max(1);
    let r = op.rank;
    let width = r + usize::from(op.row_scale);
    let xv = view::<T>(x.0, x.1, "x")?;
    let bcv = view::<T>(bc.0, bc.1, "[B|c]")?;
    let x_op = Operand::new(&xv, n, d_in);
    let mut y = dev.alloc_zeros::<T>(n * d_out)?;
    tensor_view::<T, _>(op.weight, "W", |wv| {
        let w = Operand::new(wv, d_out, d_in);
        gemm(
            &dev,
            1.0,
            &x_op,
            &w.t(),
            0.0,
            Dest {
                slice: &mut y,
                ld: d_out,
            },
        )
    })?;
    let mut xa_kept = None;
    if r > 0 {
        let av = view::<T>(a.0, a.1, "A")?;
        let mut xa = dev.alloc_zeros::<T>(n * r)?;
        let a_op = Operand::new(&av, r, d_in);
        gemm(
            &dev,
            1.0,
            &x_op,
            &a_op.t(),
            0.0,
            Dest {
                slice: &mut xa,
                ld: r,
            },
        )?;
        let xav = xa.slice(..);
        let b_op = Operand::new(&bcv, d_out, r).with_ld(width);
        gemm(
            &dev,
            op.scale,
            &Operand::new(&xav, n, r),
            &b_op.t(),
            1.0,
            Dest {
                slice: &mut y,
                ld: d_out,
            },
        )?;
        xa_kept = op.keep.then_some(xa);
    }
    let mut u_kept: Option<CudaSlice<T>> = None;
    if op.row_scale && op.keep {
        // SAFETY: the epilogue writes every element before anything reads it.
        u_kept = Some(unsafe { dev.alloc::<T>(n * d_out) }?);
    }
    let c_view = bcv.try_slice(r..);
    let row_scale = match (&c_view, op.row_scale) {
        (Some(c), true) => Some(Column {
            view: c,
            stride: width,
        }),
        (None, true) => candle_core::bail!("fused linear (cuda): [B|c] has no row-scale column"),
        (_, false) => None,
    };
    match op.bias {
        Some(b) => tensor_view::<T, _>(b, "bias", |bv| {
            epilogue(&dev, &mut y, d_out, u_kept.as_mut(), row_scale, Some(bv))
        })?,
        None => epilogue(&dev, &mut y, d_out, u_kept.as_mut(), row_scale, None)?,
    }
    let mut dims = x.1.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = d_out;
    }
    let wrap = |s: CudaSlice<T>| CudaStorage::wrap_cuda_slice(s, dev.clone());
    let saved = [
        xa_kept.map(|s| (wrap(s), Shape::from((n, r)))),
        u_kept.map(|s| (wrap(s), Shape::from((n, d_out)))),
    ];
    Ok((wrap(y), Shape::from(dims), saved))
}
