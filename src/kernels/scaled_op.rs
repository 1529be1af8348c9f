//! The vector-scaled low-rank product (VeRA's) as a candle `CustomOp3` (a
//! [`SavingKernel`]) on `(x, mid, out)`: the frozen `W`, bias, `A` and `B` live in the op,
//! so backprop reaches only the input and the two vectors. CPU (f32, f64) and CUDA
//! (feature `cuda`: f32, f64, bf16, f16, `kernels::cuda`); other devices take the composed
//! path ([`super::ScaledLowRankLinear::forward_composed`]).
//! The forward saves `x Aᵀ` and `v = (mid ⊙ x Aᵀ) Bᵀ` for the backward.

use candle_core::{Layout, Tensor, WithDType};

use super::cpu::{
    self, as_rows, gather_strided, gather_vec, mat_of_layout, with_slice, ScaledForward,
    ScaledNeed, ScaledSaved,
};
use super::saved_op::{CpuOutput, Grads3, Input, SavingKernel, SLOTS};
use super::weight::OpWeight;

/// `y = x Wᵀ + b + out ⊙ ((mid ⊙ (x Aᵀ)) Bᵀ)` with `W`, `b`, `A`, `B` held in the op.
#[derive(Clone, Debug)]
pub(crate) struct ScaledLowRankOp {
    /// Frozen `W`, `(d_out, d_in)` (a float one in `x`'s dtype).
    pub weight: OpWeight,
    /// Frozen bias, `(d_out,)`.
    pub bias: Option<Tensor>,
    /// Frozen `A`, `(r, d_in)` (may be a strided view).
    pub a: Tensor,
    /// Frozen `B`, `(d_out, r)` (may be a strided view; contiguous on CUDA).
    pub b: Tensor,
    /// Whether an input tracks a gradient (the CUDA forward keeps its intermediates only
    /// then).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub trains: bool,
}

impl ScaledLowRankOp {
    fn check_shapes(&self, x: &Layout, mid: &Layout, out: &Layout) -> candle_core::Result<()> {
        let (d_out, d_in) = self.weight.dims2()?;
        let (r, a_in) = self.a.dims2()?;
        let x_in = x.dims().last().copied().unwrap_or(0);
        if x_in != d_in
            || a_in != d_in
            || self.b.dims() != [d_out, r]
            || mid.dims() != [r]
            || out.dims() != [d_out]
        {
            candle_core::bail!(
                "scaled low-rank linear: x {:?}, A {:?}, B {:?}, mid {:?}, out {:?} do not fit W ({d_out}, {d_in})",
                x.dims(),
                self.a.dims(),
                self.b.dims(),
                mid.dims(),
                out.dims()
            );
        }
        Ok(())
    }

    /// Runs `f` with the CPU views of the inputs and the op's tensors.
    fn with_forward<T: WithDType, R>(
        &self,
        x: Input<'_, T>,
        mid: Input<'_, T>,
        out: Input<'_, T>,
        f: impl FnOnce(&ScaledForward<T>) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        self.check_shapes(x.1, mid.1, out.1)?;
        let xr = as_rows(x.0, x.1)?;
        let mid = gather_strided(mid.0, mid.1)?;
        let out = gather_strided(out.0, out.1)?;
        let bias = self.bias.as_ref().map(gather_vec::<T>).transpose()?;
        self.weight.with_mat(|w| {
            with_slice(&self.a, |ad, al| {
                with_slice(&self.b, |bd, bl| {
                    f(&ScaledForward {
                        x: xr.view()?,
                        w,
                        a: mat_of_layout(ad, al)?,
                        b: mat_of_layout(bd, bl)?,
                        mid: &mid,
                        out: &out,
                        bias: bias.as_deref(),
                    })
                })
            })
        })
    }
}

/// Slot 0: `x Aᵀ` `(n, r)`, slot 1: `v` `(n, d_out)`.
impl SavingKernel for ScaledLowRankOp {
    const OP_NAME: &'static str = "lorakit-scaled-low-rank-linear";
    const NAME: &'static str = "scaled low-rank linear";

    fn cpu_forward<T: WithDType>(
        &self,
        [x, mid, out]: [Input<'_, T>; 3],
    ) -> candle_core::Result<CpuOutput<T>> {
        let (y, xa, v) = self.with_forward(x, mid, out, cpu::scaled_forward)?;
        let d_out = self.b.dims2()?.0;
        Ok(CpuOutput {
            y,
            shape: cpu::output_shape(x.1, d_out),
            saved: [Some(xa), Some(v)],
        })
    }

    fn cpu_backward<T: WithDType>(
        &self,
        [x, mid, out]: [Input<'_, T>; 3],
        grad: Input<'_, T>,
        [xa, v]: [Option<&[T]>; SLOTS],
        [x_tracks, mid_tracks, out_tracks]: [bool; 3],
    ) -> candle_core::Result<[Option<Vec<T>>; 3]> {
        let need = ScaledNeed {
            x: x_tracks,
            mid: mid_tracks,
            out: out_tracks,
        };
        let g = as_rows(grad.0, grad.1)?;
        let (dx, d_mid, d_out) = self.with_forward(x, mid, out, |fwd| {
            let run = |xa: &[T], v: &[T]| {
                cpu::scaled_backward(fwd, ScaledSaved { xa, v }, g.view()?, need)
            };
            match (xa, v) {
                (Some(xa), Some(v)) => run(xa, v),
                _ => {
                    let (_, xa, v) = cpu::scaled_forward(fwd)?;
                    run(&xa, &v)
                }
            }
        })?;
        Ok([dx, d_mid, d_out])
    }

    fn other_backward(
        &self,
        [x, _, _]: [&Tensor; 3],
        _grad: &Tensor,
    ) -> candle_core::Result<Grads3> {
        if !x.device().is_cpu() {
            candle_core::bail!("scaled low-rank linear: the fused op runs on the CPU only");
        }
        candle_core::bail!(
            "scaled low-rank linear: no CPU backward for {:?}",
            x.dtype()
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_forward(
        &self,
        [x, mid, out]: [(&candle_core::CudaStorage, &Layout); 3],
    ) -> candle_core::Result<super::saved_op::CudaForward> {
        self.check_shapes(x.1, mid.1, out.1)?;
        let OpWeight::Float(weight) = &self.weight else {
            candle_core::bail!("scaled low-rank linear: a quantized weight runs on the CPU only");
        };
        let op = super::cuda::Scaled {
            weight,
            bias: self.bias.as_ref(),
            a: &self.a,
            b: &self.b,
            keep: self.trains,
        };
        super::cuda::scaled_forward(&op, x, mid, out)
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
        let op = super::cuda::Scaled {
            weight,
            bias: self.bias.as_ref(),
            a: &self.a,
            b: &self.b,
            keep: false,
        };
        let need = inputs.map(Tensor::track_op);
        super::cuda::scaled_backward(&op, need, inputs, grad, saved).map(Some)
    }
}
