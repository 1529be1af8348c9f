//! The fused low-rank linear as a candle `CustomOp3`.
//!
//! Inputs: `x` (`[.., d_in]`), `A_eff` (`(r, d_in)`) and the packed `[B_eff | c]`
//! (`(d_out, r)`, or `(d_out, r + 1)` whose last column is the row scale `c`). The frozen
//! `W`, the bias and the scale `s` live in the op, so backprop never reaches `W`. Without a
//! low-rank term `r = 0` (zero-sized `A` and `B`).
//!
//! Packing `c` with `B` keeps the op at three inputs while `c` may need a gradient (DoRA):
//! the caller builds the packed tensor with `Tensor::cat`, whose backward routes the
//! packed gradient's columns back to `B` and to `c`.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, WithDType};

use super::cpu::{self, as_rows, gather_vec, mat_of_layout, with_slice, Backward, Forward};

/// `y = c ⊙ (x Wᵀ + s (x Aᵀ) Bᵀ) + b` with `W`, `b`, `s` held in the op.
#[derive(Clone, Debug)]
pub(crate) struct FusedLowRankOp {
    /// Frozen `W`, `(d_out, d_in)`, same dtype as `x`.
    pub weight: Tensor,
    /// Frozen bias, `(d_out,)`.
    pub bias: Option<Tensor>,
    /// The scale `s`.
    pub scale: f64,
    /// The rank `r` (0: no low-rank term).
    pub rank: usize,
    /// Whether the third input carries the row scale as its last column.
    pub row_scale: bool,
    /// `x Aᵀ` from the CPU forward, kept for the backward (so it is not computed twice).
    /// The op lives in the autograd graph of its output, so this lives as long as the graph.
    pub saved_xa: std::sync::Arc<std::sync::Mutex<Option<Tensor>>>,
    /// With a row scale: the pre-scale output `u = x Wᵀ + s (x Aᵀ) Bᵀ` from the CPU
    /// forward, for the row scale's gradient `Σ_i g_ij u_ij` (exact for any `c`, where
    /// recovering `u` from the output as `(y − b) / c` would lose it to cancellation
    /// against a large bias, or to `c = 0`).
    pub saved_u: std::sync::Arc<std::sync::Mutex<Option<Tensor>>>,
}

/// Runs `f` with the CPU slice of a saved intermediate, or `None`.
fn with_saved<T: WithDType, R>(
    saved: Option<&Tensor>,
    f: impl FnOnce(Option<&[T]>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    match saved {
        Some(t) => with_slice::<T, _>(t, |data, _| f(Some(data))),
        None => f(None),
    }
}

impl FusedLowRankOp {
    fn check_shapes(&self, x: &Layout, a: &Layout, bc: &Layout) -> candle_core::Result<()> {
        let (d_out, d_in) = self.weight.dims2()?;
        let width = self.rank + usize::from(self.row_scale);
        let x_in = x.dims().last().copied().unwrap_or(0);
        if x_in != d_in || a.dims() != [self.rank, d_in] || bc.dims() != [d_out, width] {
            candle_core::bail!(
                "fused linear: x {:?}, A {:?}, [B|c] {:?} do not fit W ({d_out}, {d_in}) with r = {}",
                x.dims(),
                a.dims(),
                bc.dims(),
                self.rank
            );
        }
        Ok(())
    }

    /// Runs `f` with the forward's CPU views of `x`, `A`, `[B|c]` and the op's tensors.
    fn with_forward<T: WithDType, R>(
        &self,
        x: (&[T], &Layout),
        a: (&[T], &Layout),
        bc: (&[T], &Layout),
        f: impl FnOnce(&Forward<T>) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        self.check_shapes(x.1, a.1, bc.1)?;
        let bias = self.bias.as_ref().map(gather_vec::<T>).transpose()?;
        let xr = as_rows(x.0, x.1)?;
        let a = mat_of_layout(a.0, a.1)?;
        let bc = mat_of_layout(bc.0, bc.1)?;
        let (d_out, r) = (bc.rows(), self.rank);
        let row_scale = if self.row_scale {
            Some(
                (0..d_out)
                    .map(|j| bc.t().at_checked(r, j))
                    .collect::<candle_core::Result<Vec<T>>>()?,
            )
        } else {
            None
        };
        with_slice(&self.weight, |w_data, w_layout| {
            let fwd = Forward {
                x: xr.view()?,
                w: mat_of_layout(w_data, w_layout)?,
                low_rank: (r > 0).then(|| (a, bc.narrow_cols(r), T::from_f64(self.scale))),
                row_scale,
                bias,
            };
            f(&fwd)
        })
    }

    fn cpu_bwd_t<T: WithDType>(
        &self,
        args: [&Tensor; 3],
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [x, a, bc] = args;
        let take = |m: &std::sync::Mutex<Option<Tensor>>| {
            m.lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .filter(|t| t.dtype() == T::DTYPE)
        };
        let (saved_xa, saved_u) = (take(&self.saved_xa), take(&self.saved_u));
        let need = (
            x.track_op(),
            self.rank > 0 && a.track_op(),
            (self.rank > 0 || self.row_scale) && bc.track_op(),
        );
        let grads = with_slice::<T, _>(x, |xd, xl| {
            with_slice::<T, _>(a, |ad, al| {
                with_slice::<T, _>(bc, |bd, bl| {
                    with_slice::<T, _>(grad, |gd, gl| {
                        let g = as_rows(gd, gl)?;
                        self.with_forward((xd, xl), (ad, al), (bd, bl), |fwd| {
                            with_saved::<T, _>(saved_xa.as_ref(), |xa| {
                                with_saved::<T, _>(saved_u.as_ref(), |u| {
                                    cpu::backward(&Backward {
                                        fwd,
                                        g: g.view()?,
                                        need,
                                        xa,
                                        u,
                                    })
                                })
                            })
                        })
                    })
                })
            })
        })?;
        let dev = x.device();
        let dx = grads
            .dx
            .map(|v| Tensor::from_vec(v, x.shape(), dev))
            .transpose()?;
        let da = grads
            .da
            .map(|v| Tensor::from_vec(v, a.shape(), dev))
            .transpose()?;
        let dbc = grads
            .dbc
            .map(|v| Tensor::from_vec(v, bc.shape(), dev))
            .transpose()?;
        Ok((dx, da, dbc))
    }

    /// The same gradients from candle ops, for devices without a hand-written backward.
    fn composed_bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        bc: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (d_out, d_in) = self.weight.dims2()?;
        let r = self.rank;
        let n = x.elem_count() / d_in.max(1);
        let x2 = x.reshape((n, d_in))?;
        let g = grad.reshape((n, d_out))?;
        let (b, c) = if self.row_scale {
            (bc.narrow(1, 0, r)?, Some(bc.narrow(1, r, 1)?.squeeze(1)?))
        } else {
            (bc.clone(), None)
        };
        let gs = match &c {
            Some(c) => g.broadcast_mul(c)?,
            None => g.clone(),
        };
        let s = self.scale;
        let mut dx = gs.matmul(&self.weight)?;
        let mut da = None;
        let mut db = None;
        if r > 0 {
            let gb = gs.matmul(&b)?;
            dx = (dx + (gb.matmul(a)? * s)?)?;
            da = Some((gb.t()?.matmul(&x2)? * s)?);
            db = Some((gs.t()?.matmul(&x2.matmul(&a.t()?)?)? * s)?);
        }
        let dbc = match (&c, db) {
            (Some(_), db) => {
                // u = x Wᵀ + s (x Aᵀ) Bᵀ, recomputed (no division by c).
                let mut u = x2.matmul(&self.weight.t()?)?;
                if r > 0 {
                    u = (u + (x2.matmul(&a.t()?)?.matmul(&b.t()?)? * s)?)?;
                }
                let dc = (g * u)?.sum(0)?.unsqueeze(1)?;
                Some(match db {
                    Some(db) => Tensor::cat(&[&db, &dc], 1)?,
                    None => dc,
                })
            }
            (None, db) => db,
        };
        let dx = dx.reshape(x.shape())?;
        Ok((Some(dx), da, dbc))
    }
}

impl cpu::CpuForward3 for FusedLowRankOp {
    const NAME: &'static str = "fused linear";

    fn forward_t<T: WithDType>(
        &self,
        x: (&[T], &Layout),
        a: (&[T], &Layout),
        bc: (&[T], &Layout),
    ) -> candle_core::Result<(Vec<T>, Shape)> {
        let (y, xa, u) = self.with_forward(x, a, bc, cpu::forward)?;
        let d_out = self.weight.dims2()?.0;
        let n = y.len() / d_out.max(1);
        let dev = candle_core::Device::Cpu;
        if !xa.is_empty() {
            let saved = Tensor::from_vec(xa, (n, self.rank), &dev)?;
            *self.saved_xa.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        }
        if let Some(u) = u {
            let saved = Tensor::from_vec(u, (n, d_out), &dev)?;
            *self.saved_u.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        }
        Ok((y, cpu::output_shape(x.1, d_out)))
    }
}

impl CustomOp3 for FusedLowRankOp {
    fn name(&self) -> &'static str {
        "lorakit-fused-low-rank-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu::cpu_fwd_f32_f64(self, (s1, l1), (s2, l2), (s3, l3))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.check_shapes(l1, l2, l3)?;
        super::cuda::forward(self, (s1, l1), (s2, l2), (s3, l3))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        bc: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if x.device().is_cpu() {
            match x.dtype() {
                DType::F32 => return self.cpu_bwd_t::<f32>([x, a, bc], grad),
                DType::F64 => return self.cpu_bwd_t::<f64>([x, a, bc], grad),
                _ => {}
            }
        }
        self.composed_bwd(x, a, bc, grad)
    }
}
