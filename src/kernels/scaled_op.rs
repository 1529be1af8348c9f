//! The vector-scaled low-rank product (VeRA's) as a candle `CustomOp3` on
//! `(x, mid, out)`: the frozen `W`, bias, `A` and `B` live in the op, so backprop reaches
//! only the input and the two vectors. CPU only (f32, f64); other devices take the
//! composed path ([`super::ScaledLowRankLinear::forward_composed`]).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, WithDType};

use super::cpu::{
    self, as_rows, gather_strided, gather_vec, mat_of_layout, with_slice, ScaledForward,
    ScaledSaved,
};

/// `y = x Wᵀ + b + out ⊙ ((mid ⊙ (x Aᵀ)) Bᵀ)` with `W`, `b`, `A`, `B` held in the op.
#[derive(Clone, Debug)]
pub(crate) struct ScaledLowRankOp {
    /// Frozen `W`, `(d_out, d_in)`, same dtype as `x`.
    pub weight: Tensor,
    /// Frozen bias, `(d_out,)`.
    pub bias: Option<Tensor>,
    /// Frozen `A`, `(r, d_in)` (may be a strided view).
    pub a: Tensor,
    /// Frozen `B`, `(d_out, r)` (may be a strided view).
    pub b: Tensor,
    /// `x Aᵀ` and `v` from the forward, for the backward. The op lives in its output's
    /// autograd graph (only when an input tracks a gradient), so these live as long.
    pub saved: Arc<Mutex<Option<(Tensor, Tensor)>>>,
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
        x: (&[T], &Layout),
        mid: (&[T], &Layout),
        out: (&[T], &Layout),
        f: impl FnOnce(&ScaledForward<T>) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        self.check_shapes(x.1, mid.1, out.1)?;
        let xr = as_rows(x.0, x.1)?;
        let mid = gather_strided(mid.0, mid.1)?;
        let out = gather_strided(out.0, out.1)?;
        let bias = self.bias.as_ref().map(gather_vec::<T>).transpose()?;
        with_slice(&self.weight, |wd, wl| {
            with_slice(&self.a, |ad, al| {
                with_slice(&self.b, |bd, bl| {
                    f(&ScaledForward {
                        x: xr.view()?,
                        w: mat_of_layout(wd, wl)?,
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

    fn cpu_bwd_t<T: WithDType>(
        &self,
        [x, mid, out]: [&Tensor; 3],
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self
            .saved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .filter(|(xa, _)| xa.dtype() == T::DTYPE);
        let need = (x.track_op(), mid.track_op(), out.track_op());
        let (dx, d_mid, d_out) = with_slice::<T, _>(x, |xd, xl| {
            with_slice::<T, _>(mid, |md, ml| {
                with_slice::<T, _>(out, |od, ol| {
                    with_slice::<T, _>(grad, |gd, gl| {
                        let g = as_rows(gd, gl)?;
                        self.with_forward((xd, xl), (md, ml), (od, ol), |fwd| {
                            let run = |xa: &[T], v: &[T]| {
                                cpu::scaled_backward(fwd, ScaledSaved { xa, v }, g.view()?, need)
                            };
                            match &saved {
                                Some((xa, v)) => with_slice::<T, _>(xa, |xa, _| {
                                    with_slice::<T, _>(v, |v, _| run(xa, v))
                                }),
                                None => {
                                    let (_, xa, v) = cpu::scaled_forward(fwd)?;
                                    run(&xa, &v)
                                }
                            }
                        })
                    })
                })
            })
        })?;
        let to_tensor = |v: Option<Vec<T>>, like: &Tensor| {
            v.map(|v| Tensor::from_vec(v, like.shape(), like.device()))
                .transpose()
        };
        Ok((
            to_tensor(dx, x)?,
            to_tensor(d_mid, mid)?,
            to_tensor(d_out, out)?,
        ))
    }
}

impl cpu::CpuForward3 for ScaledLowRankOp {
    const NAME: &'static str = "scaled low-rank linear";

    fn forward_t<T: WithDType>(
        &self,
        x: (&[T], &Layout),
        mid: (&[T], &Layout),
        out: (&[T], &Layout),
    ) -> candle_core::Result<(Vec<T>, Shape)> {
        let (y, xa, v) = self.with_forward(x, mid, out, cpu::scaled_forward)?;
        let (d_out, r) = (self.b.dims2()?.0, self.a.dims2()?.0);
        let n = y.len() / d_out.max(1);
        let dev = candle_core::Device::Cpu;
        let saved = (
            Tensor::from_vec(xa, (n, r), &dev)?,
            Tensor::from_vec(v, (n, d_out), &dev)?,
        );
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        Ok((y, cpu::output_shape(x.1, d_out)))
    }
}

impl CustomOp3 for ScaledLowRankOp {
    fn name(&self) -> &'static str {
        "lorakit-scaled-low-rank-linear"
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

    fn bwd(
        &self,
        x: &Tensor,
        mid: &Tensor,
        out: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !x.device().is_cpu() {
            candle_core::bail!("scaled low-rank linear: the fused op runs on the CPU only");
        }
        match x.dtype() {
            DType::F32 => self.cpu_bwd_t::<f32>([x, mid, out], grad),
            DType::F64 => self.cpu_bwd_t::<f64>([x, mid, out], grad),
            dt => candle_core::bail!("scaled low-rank linear: no CPU backward for {dt:?}"),
        }
    }
}
