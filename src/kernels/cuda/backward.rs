//! The fused op's CUDA backward, with the CPU backward's contract: no gradient for the
//! frozen `W`; gradients only for the inputs that track one. With `g' = c ⊙ g` (or `g`):
//!
//! ```text
//! gB  = g' B                      (n × r)
//! dx  = g' W  + s · gB A          (one buffer: the second GEMM accumulates, β = 1)
//! dA  = s · gBᵀ x
//! dB  = s · g'ᵀ (x Aᵀ)            (x Aᵀ kept by the forward)
//! dc  = Σ_i g_ij u_ij             (u, the pre-scale output, kept by the forward)
//! ```
//!
//! `dB` and `dc` are written into one `(d_out, r + 1)` buffer, the packed input's gradient.
//! Intermediates the forward did not keep (it keeps them only when an input tracks a
//! gradient) are recomputed.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView};
use candle_core::cuda_backend::CudaDevice;
use candle_core::Tensor;

use super::blas::{gemm, Dest, Operand};
use super::dtype::{dispatch_float, CudaFloat};
use super::elementwise::{column_dot, scale_columns, Column};
use super::storage::{grad_tensor, tensor_view};

/// The backward's settings: the op's frozen `W`, scale and shape, and which inputs
/// (`x`, `A`, `[B|c]`) need a gradient.
pub(crate) struct Backward<'a> {
    /// Frozen `W`, `(d_out, d_in)`, of `x`'s dtype, contiguous, on the GPU.
    pub weight: &'a Tensor,
    /// The scale `s`.
    pub scale: f64,
    /// The rank `r`.
    pub rank: usize,
    /// Whether `[B|c]` carries the row scale as its last column.
    pub row_scale: bool,
    /// Whether `x`, `A` and `[B|c]` need their gradients.
    pub need: [bool; 3],
}

/// The gradients of `x`, `A` and `[B|c]` (`None` where not needed).
pub(crate) type Grads = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// The op's CUDA backward for the incoming gradient `grad`; `kept`: the forward's
/// `x Aᵀ` and `u` when it kept them.
pub(crate) fn backward(
    op: &Backward<'_>,
    [x, a, bc]: [&Tensor; 3],
    grad: &Tensor,
    kept: [Option<&Tensor>; 2],
) -> candle_core::Result<Grads> {
    let grad = grad.contiguous()?;
    dispatch_float!(
        x.dtype(),
        "fused linear",
        backward_t(op, [x, a, bc], &grad, kept)
    )
}

/// Runs `f` with the view of a kept intermediate of dtype `T` and `len` elements, or with
/// `None` when there is none (the caller recomputes it then).
fn with_kept<T: CudaFloat, R>(
    kept: Option<&Tensor>,
    len: usize,
    f: impl FnOnce(Option<CudaView<'_, T>>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    match kept {
        Some(t) if t.elem_count() == len && t.dtype() == T::DTYPE => {
            tensor_view::<T, _>(t, "a kept intermediate", |v| f(Some(v.slice(..))))
        }
        _ => f(None),
    }
}

/// The backward for one dtype.
fn backward_t<T: CudaFloat>(
    op: &Backward<'_>,
    [x, a, bc]: [&Tensor; 3],
    grad: &Tensor,
    [kept_xa, kept_u]: [Option<&Tensor>; 2],
) -> candle_core::Result<Grads> {
    let candle_core::Device::Cuda(dev) = x.device() else {
        candle_core::bail!("fused linear (cuda): x is not on the GPU");
    };
    let (d_out, d_in) = op.weight.dims2()?;
    let n = x.elem_count() / d_in.max(1);
    let width = op.rank + usize::from(op.row_scale);
    let [dx, da, dbc] = tensor_view::<T, _>(x, "x", |xv| {
        tensor_view::<T, _>(a, "A", |av| {
            tensor_view::<T, _>(bc, "[B|c]", |bcv| {
                tensor_view::<T, _>(grad, "the gradient", |gv| {
                    tensor_view::<T, _>(op.weight, "W", |wv| {
                        let ops = Operands {
                            dev,
                            op,
                            x: Operand::new(xv, n, d_in),
                            a: Operand::new(av, op.rank, d_in),
                            b: Operand::new(bcv, d_out, op.rank).with_ld(width),
                            w: Operand::new(wv, d_out, d_in),
                            bcv,
                            g: gv,
                        };
                        with_kept::<T, _>(kept_xa, n * op.rank, |xa| {
                            with_kept::<T, _>(kept_u, n * d_out, |u| ops.run(xa, u))
                        })
                    })
                })
            })
        })
    })?;
    Ok((
        grad_tensor(dx, dev, x),
        grad_tensor(da, dev, a),
        grad_tensor(dbc, dev, bc),
    ))
}

/// The backward's inputs as GEMM operands.
struct Operands<'v, 'a, T> {
    dev: &'v CudaDevice,
    op: &'v Backward<'v>,
    /// `x`, `(n, d_in)`.
    x: Operand<'v, 'a, T>,
    /// `A`, `(r, d_in)`.
    a: Operand<'v, 'a, T>,
    /// `B`, the first `r` columns of `[B|c]`.
    b: Operand<'v, 'a, T>,
    /// `W`, `(d_out, d_in)`.
    w: Operand<'v, 'a, T>,
    /// `[B|c]`, `(d_out, width)`.
    bcv: &'v CudaView<'a, T>,
    /// The incoming gradient, `(n, d_out)`.
    g: &'v CudaView<'a, T>,
}

impl<T: CudaFloat> Operands<'_, '_, T> {
    /// `dx`, `dA` and `d[B|c]`, each where needed.
    fn run(
        &self,
        kept_xa: Option<CudaView<'_, T>>,
        kept_u: Option<CudaView<'_, T>>,
    ) -> candle_core::Result<[Option<CudaSlice<T>>; 3]> {
        let dev = self.dev;
        let (n, d_in, d_out) = (self.x.rows, self.x.cols, self.w.rows);
        let (r, s) = (self.op.rank, self.op.scale);
        let width = r + usize::from(self.op.row_scale);
        let [need_x, need_a, need_bc] = self.op.need;
        let (need_a, need_bc) = (need_a && r > 0, need_bc && width > 0);
        let c = self.op.row_scale.then(|| self.bcv.try_slice(r..)).flatten();
        if self.op.row_scale && c.is_none() {
            candle_core::bail!("fused linear (cuda): [B|c] has no row-scale column");
        }
        // g' = c ⊙ g
        let scaled = match &c {
            Some(c) => Some(scale_columns(
                dev,
                self.g,
                d_out,
                Column {
                    view: c,
                    stride: width,
                },
            )?),
            None => None,
        };
        let scaled_view = scaled.as_ref().map(|t| t.slice(..));
        let gs = Operand::new(scaled_view.as_ref().unwrap_or(self.g), n, d_out);
        // gB = g' B, for dx and dA.
        let gb = if r > 0 && (need_x || need_a) {
            let mut gb = dev.alloc_zeros::<T>(n * r)?;
            gemm(
                dev,
                1.0,
                &gs,
                &self.b,
                0.0,
                Dest {
                    slice: &mut gb,
                    ld: r,
                },
            )?;
            Some(gb)
        } else {
            None
        };
        let gb_view = gb.as_ref().map(|t| t.slice(..));
        let gb_op = gb_view.as_ref().map(|v| Operand::new(v, n, r));
        let mut dx = None;
        if need_x {
            let mut out = dev.alloc_zeros::<T>(n * d_in)?;
            gemm(
                dev,
                1.0,
                &gs,
                &self.w,
                0.0,
                Dest {
                    slice: &mut out,
                    ld: d_in,
                },
            )?;
            if let Some(gb) = &gb_op {
                gemm(
                    dev,
                    s,
                    gb,
                    &self.a,
                    1.0,
                    Dest {
                        slice: &mut out,
                        ld: d_in,
                    },
                )?;
            }
            dx = Some(out);
        }
        let mut da = None;
        if let (true, Some(gb)) = (need_a, &gb_op) {
            let mut out = dev.alloc_zeros::<T>(r * d_in)?;
            let gb_t = Operand::new(gb.view, n, r).t();
            gemm(
                dev,
                s,
                &gb_t,
                &self.x,
                0.0,
                Dest {
                    slice: &mut out,
                    ld: d_in,
                },
            )?;
            da = Some(out);
        }
        let mut dbc = None;
        if need_bc {
            let mut out = dev.alloc_zeros::<T>(d_out * width)?;
            if r > 0 {
                let xa = match kept_xa {
                    Some(v) => Recomputed::Kept(v),
                    None => Recomputed::Fresh(self.xa()?),
                };
                let xa_view = xa.view();
                let gs_t = Operand::new(gs.view, n, d_out).t();
                gemm(
                    dev,
                    s,
                    &gs_t,
                    &Operand::new(&xa_view, n, r),
                    0.0,
                    Dest {
                        slice: &mut out,
                        ld: width,
                    },
                )?;
            }
            if self.op.row_scale {
                let u = match kept_u {
                    Some(v) => Recomputed::Kept(v),
                    None => Recomputed::Fresh(self.pre_scale_output()?),
                };
                column_dot(dev, self.g, &u.view(), (n, d_out), &mut out, (r, width))?;
            }
            dbc = Some(out);
        }
        Ok([dx, da, dbc])
    }

    /// `x Aᵀ`, `(n, r)`.
    fn xa(&self) -> candle_core::Result<CudaSlice<T>> {
        let (n, r) = (self.x.rows, self.a.rows);
        let mut xa = self.dev.alloc_zeros::<T>(n * r)?;
        gemm(
            self.dev,
            1.0,
            &self.x,
            &self.a.t(),
            0.0,
            Dest {
                slice: &mut xa,
                ld: r,
            },
        )?;
        Ok(xa)
    }

    /// `u = x Wᵀ + s (x Aᵀ) Bᵀ`, `(n, d_out)`.
    fn pre_scale_output(&self) -> candle_core::Result<CudaSlice<T>> {
        let (n, d_out, r) = (self.x.rows, self.w.rows, self.a.rows);
        let mut u = self.dev.alloc_zeros::<T>(n * d_out)?;
        gemm(
            self.dev,
            1.0,
            &self.x,
            &self.w.t(),
            0.0,
            Dest {
                slice: &mut u,
                ld: d_out,
            },
        )?;
        if r > 0 {
            let xa = self.xa()?;
            let xa_view = xa.slice(..);
            let b_t = self.b.t();
            gemm(
                self.dev,
                self.op.scale,
                &Operand::new(&xa_view, n, r),
                &b_t,
                1.0,
                Dest {
                    slice: &mut u,
                    ld: d_out,
                },
            )?;
        }
        Ok(u)
    }
}

/// An intermediate the forward kept, or one computed again.
enum Recomputed<'a, T> {
    Kept(CudaView<'a, T>),
    Fresh(CudaSlice<T>),
}

impl<T> Recomputed<'_, T> {
    fn view(&self) -> CudaView<'_, T> {
        match self {
            Recomputed::Kept(v) => v.slice(..),
            Recomputed::Fresh(s) => s.slice(..),
        }
    }
}
