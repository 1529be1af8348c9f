//! `silu(gate) ⊙ up` (the Llama MLP's gating) as one CPU op with its own backward:
//! candle's composed `silu` and product record several full-size nodes each way.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_op::{map2, sigmoid, CHUNK};

/// `silu(gate) ⊙ up`, differentiable in both. The fused op runs for f32 CPU tensors of one
/// shape when a gradient flows; candle's ops otherwise.
pub(crate) fn silu_mul(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    let fused = (gate.track_op() || up.track_op())
        && gate.device().is_cpu()
        && gate.dtype() == DType::F32
        && up.dtype() == DType::F32
        && gate.dims() == up.dims();
    if fused {
        gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)
    } else {
        gate.silu()? * up
    }
}

/// A contiguous f32 slice of an op input.
fn input<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    super::cpu_op::f32_input("silu·up", s, l)
}

struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "lorakit-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (gate, up) = (input(s1, l1)?, input(s2, l2)?);
        if gate.len() != up.len() {
            candle_core::bail!(
                "silu·up: gate {:?} and up {:?} differ",
                l1.dims(),
                l2.dims()
            );
        }
        let out = map2(gate, up, |g, u| g * sigmoid(g) * u);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        // Both gradients from one pass: `(2, …)`, the gate's first.
        let both = gate.apply_op3_no_bwd(up, &grad, &SiluMulGrad)?;
        let d_gate = both.get(0)?;
        let d_up = both.get(1)?;
        Ok((Some(d_gate), Some(d_up)))
    }
}

/// Both inputs' gradients in one pass, stacked `(2, …)`: `g ⊙ up ⊙ silu'(gate)` and
/// `g ⊙ silu(gate)`, with `silu'(x) = σ(x) (1 + x (1 − σ(x)))`.
struct SiluMulGrad;

impl CustomOp3 for SiluMulGrad {
    fn name(&self) -> &'static str {
        "lorakit-silu-mul-grad"
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
        let (gate, up, grad) = (input(s1, l1)?, input(s2, l2)?, input(s3, l3)?);
        if gate.len() != up.len() || gate.len() != grad.len() {
            candle_core::bail!("silu·up backward: shapes differ");
        }
        let n = gate.len();
        let mut out = vec![0f32; 2 * n];
        let (d_gate, d_up) = out.split_at_mut(n);
        d_gate
            .par_chunks_mut(CHUNK)
            .zip(d_up.par_chunks_mut(CHUNK))
            .zip(
                gate.par_chunks(CHUNK)
                    .zip(up.par_chunks(CHUNK).zip(grad.par_chunks(CHUNK))),
            )
            .for_each(|((dg, du), (x, (u, g)))| {
                crate::kernels::vector_math::on_widest_vectors(
                    #[inline(always)]
                    || {
                        let outs = dg.iter_mut().zip(du.iter_mut());
                        let ins = x.iter().zip(u).zip(g);
                        for ((dg, du), ((&x, &u), &g)) in outs.zip(ins) {
                            let s = sigmoid(x);
                            *dg = g * u * s * (1.0 + x * (1.0 - s));
                            *du = g * x * s;
                        }
                    },
                )
            });
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    /// Value and both gradients equal candle's composed `silu(gate) * up`, within one
    /// parallel chunk and over several (with a partial last one).
    #[test]
    fn equals_the_composed_ops() {
        let dev = Device::Cpu;
        for shape in [(4, 6, 9), (3, 2, super::CHUNK / 2 + 77)] {
            let gate = Var::from_tensor(&Tensor::randn(0f32, 3., shape, &dev).unwrap()).unwrap();
            let up = Var::from_tensor(&Tensor::randn(0f32, 1., shape, &dev).unwrap()).unwrap();
            let fused = super::silu_mul(gate.as_tensor(), up.as_tensor()).unwrap();
            let composed = (gate.as_tensor().silu().unwrap() * up.as_tensor()).unwrap();
            let inputs = [("gate", gate.as_tensor()), ("up", up.as_tensor())];
            let case = format!("silu·up {shape:?}");
            super::super::op_test::assert_same_op(&fused, &composed, &inputs, 1e-5, &case);
        }
    }
}
