//! `silu(gate) ⊙ up` (the Llama MLP's gating) as one CPU op with its own backward:
//! candle's composed `silu` and product record several full-size nodes each way.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

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

/// `1 / (1 + e⁻ˣ)` with the vectorizable `exp`.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + crate::vector_math::exp(-x))
}

/// Elements per task of the element-wise passes (inner loops long enough to vectorize).
const CHUNK: usize = 1 << 14;

/// `f(a[i], b[i])` for every `i`, in parallel chunks.
fn map2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(out, (a, b))| {
            crate::vector_math::on_widest_vectors(
                #[inline(always)]
                || {
                    for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
                        *o = f(a, b);
                    }
                },
            )
        });
    out
}

/// `f(a[i], b[i], c[i])` for every `i`, in parallel chunks.
fn map3(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    out.par_chunks_mut(CHUNK)
        .zip(
            a.par_chunks(CHUNK)
                .zip(b.par_chunks(CHUNK).zip(c.par_chunks(CHUNK))),
        )
        .for_each(|(out, (a, (b, c)))| {
            crate::vector_math::on_widest_vectors(
                #[inline(always)]
                || {
                    for (((o, &a), &b), &c) in out.iter_mut().zip(a).zip(b).zip(c) {
                        *o = f(a, b, c);
                    }
                },
            )
        });
    out
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
        let d_gate = gate.apply_op3_no_bwd(up, &grad, &SiluMulGrad { wrt_gate: true })?;
        let d_up = gate.apply_op3_no_bwd(up, &grad, &SiluMulGrad { wrt_gate: false })?;
        Ok((Some(d_gate), Some(d_up)))
    }
}

/// One input's gradient: `g ⊙ up ⊙ silu'(gate)` or `g ⊙ silu(gate)`.
struct SiluMulGrad {
    wrt_gate: bool,
}

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
        let out = if self.wrt_gate {
            map3(gate, up, grad, |x, u, g| {
                let s = sigmoid(x);
                g * u * s * (1.0 + x * (1.0 - s))
            })
        } else {
            map2(gate, grad, |x, g| g * x * sigmoid(x))
        };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    /// Value and both gradients equal candle's composed `silu(gate) * up`.
    #[test]
    fn equals_the_composed_ops() {
        let dev = Device::Cpu;
        let gate = Var::from_tensor(&Tensor::randn(0f32, 3., (4, 6, 9), &dev).unwrap()).unwrap();
        let up = Var::from_tensor(&Tensor::randn(0f32, 1., (4, 6, 9), &dev).unwrap()).unwrap();
        let fused = super::silu_mul(gate.as_tensor(), up.as_tensor()).unwrap();
        let composed = (gate.as_tensor().silu().unwrap() * up.as_tensor()).unwrap();
        let inputs = [("gate", gate.as_tensor()), ("up", up.as_tensor())];
        super::super::op_test::assert_same_op(&fused, &composed, &inputs, 1e-5, "silu·up");
    }
}
