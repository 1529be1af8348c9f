//! The fused low-rank linear as a candle `CustomOp3` (a [`SavingKernel`]).
//!
//! Inputs: `x` (`[.., d_in]`), `A_eff` (`(r, d_in)`) and the packed `[B_eff | c]`
//! (`(d_out, r)`, or `(d_out, r + 1)` whose last column is the row scale `c`). The frozen
//! `W`, the bias and the scale `s` live in the op, so backprop never reaches `W`. Without a
//! low-rank term `r = 0` (zero-sized `A` and `B`).
//!
//! Packing `c` with `B` keeps the op at three inputs while `c` may need a gradient (DoRA):
//! the caller builds the packed tensor with `Tensor::cat`, whose backward routes the
//! packed gradient's columns back to `B` and to `c`.
//!
//! With dropout on the low-rank term's input (LoRA's `lora_dropout` in training), the op
//! holds the dropout (probability and seed) and the low-rank term reads `x̃ = drop(x)`;
//! the backward draws the same `x̃` again rather than keeping it. CPU only: the CUDA
//! kernels have no dropout ([`super::Product`] composes it there).
//!
//! The CPU forward saves `x Aᵀ` (so the backward does not compute it twice) and, with a
//! row scale, the pre-scale output `u = x Wᵀ + s (x Aᵀ) Bᵀ`, for the row scale's gradient
//! `Σ_i g_ij u_ij` (exact for any `c`, where recovering `u` from the output as
//! `(y − b) / c` would lose it to cancellation against a large bias, or to `c = 0`).

use candle_core::{Layout, Tensor, WithDType};

use super::cpu::{self, as_rows, gather_vec, mat_of_layout, Backward, Forward, MatRef, Need};
use super::saved_op::{CpuOutput, Grads3, Input, SavingKernel, SLOTS};
use super::weight::OpWeight;
use crate::kernels::dropout::Dropout;
use crate::matmul::matmul;

/// `y = c ⊙ (x Wᵀ + s (drop(x) Aᵀ) Bᵀ) + b` with `W`, `b`, `s` and the dropout held in
/// the op.
#[derive(Clone, Debug)]
pub(crate) struct FusedLowRankOp {
    /// Frozen `W`, `(d_out, d_in)` (a float one in `x`'s dtype).
    pub weight: OpWeight,
    /// Frozen bias, `(d_out,)`.
    pub bias: Option<Tensor>,
    /// The scale `s`.
    pub scale: f64,
    /// The rank `r` (0: no low-rank term).
    pub rank: usize,
    /// Whether the third input carries the row scale as its last column.
    pub row_scale: bool,
    /// Dropout on the low-rank term's input (CPU only), `None` for none.
    pub dropout: Option<Dropout>,
    /// Whether an input tracks a gradient (the CUDA forward keeps its intermediates only
    /// then; the CPU forward always does, its op dropped with the graph).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub trains: bool,
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
        x: Input<'_, T>,
        a: Input<'_, T>,
        bc: Input<'_, T>,
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
        let x = xr.view()?;
        // The low-rank term's input, drawn again for the backward from the same seed.
        let dropped = self
            .dropout
            .filter(|_| r > 0)
            .map(|dropout| (cpu::dropped_copy(x, &dropout), dropout));
        let dropped_view = match &dropped {
            Some((copy, dropout)) => {
                Some((MatRef::contiguous(copy, x.rows(), x.cols())?, *dropout))
            }
            None => None,
        };
        self.weight.with_mat(|w| {
            let fwd = Forward {
                x,
                w,
                low_rank: (r > 0).then(|| (a, bc.narrow_cols(r), T::from_f64(self.scale))),
                dropped: dropped_view,
                row_scale,
                bias,
            };
            f(&fwd)
        })
    }

    /// The same gradients from candle ops, for devices without a hand-written backward.
    fn composed_bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        bc: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Grads3> {
        if self.dropout.is_some() {
            candle_core::bail!("fused linear: dropout on the low-rank input runs on the CPU only");
        }
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
        let w = self.weight.float_like(x)?;
        let mut dx = matmul(&gs, &w)?;
        let mut da = None;
        let mut db = None;
        if r > 0 {
            let gb = matmul(&gs, &b)?;
            dx = (dx + (matmul(&gb, a)? * s)?)?;
            da = Some((matmul(&gb.t()?, &x2)? * s)?);
            db = Some((matmul(&gs.t()?, &matmul(&x2, &a.t()?)?)? * s)?);
        }
        let dbc = match (&c, db) {
            (Some(_), db) => {
                // u = x Wᵀ + s (x Aᵀ) Bᵀ, recomputed (no division by c).
                let mut u = matmul(&x2, &w.t()?)?;
                if r > 0 {
                    u = (u + (matmul(&matmul(&x2, &a.t()?)?, &b.t()?)? * s)?)?;
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

/// Slot 0: `x Aᵀ` `(n, r)`, slot 1: `u` `(n, d_out)` (see the module docs).
impl SavingKernel for FusedLowRankOp {
    const OP_NAME: &'static str = "lorakit-fused-low-rank-linear";
    const NAME: &'static str = "fused linear";

    fn cpu_forward<T: WithDType>(
        &self,
        [x, a, bc]: [Input<'_, T>; 3],
    ) -> candle_core::Result<CpuOutput<T>> {
        let (y, xa, u) = self.with_forward(x, a, bc, cpu::forward)?;
        let d_out = self.weight.dims2()?.0;
        Ok(CpuOutput {
            y,
            shape: cpu::output_shape(x.1, d_out),
            saved: [(!xa.is_empty()).then_some(xa), u],
        })
    }

    fn cpu_backward<T: WithDType>(
        &self,
        [x, a, bc]: [Input<'_, T>; 3],
        grad: Input<'_, T>,
        [xa, u]: [Option<&[T]>; SLOTS],
        [x_tracks, a_tracks, bc_tracks]: [bool; 3],
    ) -> candle_core::Result<[Option<Vec<T>>; 3]> {
        let need = Need {
            x: x_tracks,
            a: self.rank > 0 && a_tracks,
            bc: (self.rank > 0 || self.row_scale) && bc_tracks,
        };
        let g = as_rows(grad.0, grad.1)?;
        let grads = self.with_forward(x, a, bc, |fwd| {
            cpu::backward(&Backward {
                fwd,
                g: g.view()?,
                need,
                xa,
                u,
            })
        })?;
        Ok([grads.dx, grads.da, grads.dbc])
    }

    fn other_backward(
        &self,
        [x, a, bc]: [&Tensor; 3],
        grad: &Tensor,
    ) -> candle_core::Result<Grads3> {
        self.composed_bwd(x, a, bc, grad)
    }

    #[cfg(feature = "cuda")]
    fn cuda_forward(
        &self,
        [x, a, bc]: [(&candle_core::CudaStorage, &Layout); 3],
    ) -> candle_core::Result<super::saved_op::CudaForward> {
        self.check_shapes(x.1, a.1, bc.1)?;
        let OpWeight::Float(weight) = &self.weight else {
            candle_core::bail!("fused linear: a quantized weight runs on the CPU only");
        };
        if self.dropout.is_some() {
            candle_core::bail!("fused linear: dropout on the low-rank input runs on the CPU only");
        }
        let params = super::cuda::Forward {
            weight,
            bias: self.bias.as_ref(),
            scale: self.scale,
            rank: self.rank,
            row_scale: self.row_scale,
            keep: self.trains,
        };
        super::cuda::forward(&params, x, a, bc)
    }

    #[cfg(feature = "cuda")]
    fn cuda_backward(
        &self,
        inputs: [&Tensor; 3],
        grad: &Tensor,
        saved: [Option<&Tensor>; SLOTS],
    ) -> candle_core::Result<Option<Grads3>> {
        let OpWeight::Float(weight) = &self.weight else {
            return Ok(None);
        };
        if !super::cuda::supported(inputs[0]) {
            return Ok(None);
        }
        let params = super::cuda::Backward {
            weight,
            scale: self.scale,
            rank: self.rank,
            row_scale: self.row_scale,
            need: inputs.map(Tensor::track_op),
        };
        super::cuda::backward(&params, inputs, grad, saved).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::FusedLowRankOp;
    use crate::kernels::weight::OpWeight;
    use crate::matmul::matmul;

    fn relative_error(got: &Tensor, expected: &Tensor) -> f64 {
        let max = |t: &Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        max(&(got - expected).unwrap()) / max(expected).max(f64::MIN_POSITIVE)
    }

    /// The composed backward (what devices without a hand-written backward run) gives
    /// autograd's gradients of the composed forward `c ⊙ (x Wᵀ + s (x Aᵀ) Bᵀ) + b`: with and
    /// without a row scale, and without a low-rank term. `[B | c]` is packed as the layers
    /// pack it, so the backward's `B` is a padded view.
    #[test]
    fn composed_backward_equals_autograd_of_the_composed_forward() {
        let dev = Device::Cpu;
        let (n, d_in, d_out, s) = (6, 9, 7, 0.8);
        let rand = |shape: &[usize]| Tensor::randn(0f64, 1., shape, &dev).unwrap();
        let var = |shape: &[usize]| Var::from_tensor(&rand(shape)).unwrap();
        let (w, bias) = (rand(&[d_out, d_in]), rand(&[d_out]));
        for (r, row_scale) in [(3, false), (3, true), (0, true)] {
            let case = format!("r {r}, row scale {row_scale}");
            let (x, a, b, c) = (
                var(&[2, n / 2, d_in]),
                var(&[r, d_in]),
                var(&[d_out, r]),
                var(&[d_out]),
            );
            let grad = rand(&[2, n / 2, d_out]);

            let x2 = x.as_tensor().reshape((n, d_in)).unwrap();
            let mut y = matmul(&x2, &w.t().unwrap()).unwrap();
            if r > 0 {
                let xa = matmul(&x2, &a.as_tensor().t().unwrap()).unwrap();
                let low = matmul(&xa, &b.as_tensor().t().unwrap()).unwrap();
                y = (y + (low * s).unwrap()).unwrap();
            }
            if row_scale {
                y = y.broadcast_mul(c.as_tensor()).unwrap();
            }
            let y = y.broadcast_add(&bias).unwrap();
            let expected = (y * grad.reshape((n, d_out)).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();

            let packed = if row_scale {
                let column = c.as_tensor().reshape((d_out, 1)).unwrap();
                Tensor::cat(&[b.as_tensor(), &column], 1).unwrap()
            } else {
                b.as_tensor().clone()
            };
            let op = FusedLowRankOp {
                weight: OpWeight::Float(w.clone()),
                bias: Some(bias.clone()),
                scale: s,
                rank: r,
                row_scale,
                dropout: None,
                trains: true,
            };
            let (dx, da, dbc) = op
                .composed_bwd(x.as_tensor(), a.as_tensor(), &packed, &grad)
                .unwrap();
            let dx = dx.expect("dx");
            let dbc = dbc.expect("[dB | dc]");
            let err = relative_error(&dx, expected.get(&x).unwrap());
            assert!(err < 1e-12, "{case}: dx differs by {err:e}");
            if r > 0 {
                let err = relative_error(&da.expect("dA"), expected.get(&a).unwrap());
                assert!(err < 1e-12, "{case}: dA differs by {err:e}");
                let db = dbc.narrow(1, 0, r).unwrap();
                let err = relative_error(&db, expected.get(&b).unwrap());
                assert!(err < 1e-12, "{case}: dB differs by {err:e}");
            } else {
                assert!(da.is_none(), "{case}: dA without a low-rank term");
            }
            if row_scale {
                let dc = dbc.narrow(1, r, 1).unwrap().squeeze(1).unwrap();
                let err = relative_error(&dc, expected.get(&c).unwrap());
                assert!(err < 1e-12, "{case}: dc differs by {err:e}");
            }
        }
    }
}
