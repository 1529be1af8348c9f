//! Rotary position embeddings (transformers' `rotate_half` layout) fused with the head
//! transpose, as one CPU op with its own backward, for training: candle-nn's fused `rope`
//! has no backward in candle 0.11, and its composed `rope_slow` (plus the transpose copy
//! before it) records several full-size nodes.
//!
//! The op reads a projection's output `(batch, seq, heads, head_dim)` and writes the
//! rotated heads `(batch, heads, seq, head_dim)` in one pass. A rotation's backward is the
//! inverse rotation (the same kernel with `−sin`), written back in the input's layout.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_op::f32_input;

/// `x` `(b, t, heads, d)` rotated for positions whose `cos`, `sin` are `(t, d / 2)`,
/// as `(b, heads, t, d)`; differentiable in `x`. Callers check [`supports`] first.
pub(crate) fn rope_heads_first(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        Rotate { inverse: false },
    )
}

/// Whether [`rope_heads_first`] runs: f32 CPU tensors, `x` rank 4 with an even
/// `head_dim`, tables `(t, head_dim / 2)` that track no gradient.
pub(crate) fn supports(x: &Tensor, cos: &Tensor, sin: &Tensor) -> bool {
    let [_, t, _, d] = x.dims() else {
        return false;
    };
    let table = |c: &Tensor| {
        c.device().is_cpu() && c.dtype() == DType::F32 && !c.track_op() && c.dims() == [*t, d / 2]
    };
    x.device().is_cpu() && x.dtype() == DType::F32 && d % 2 == 0 && table(cos) && table(sin)
}

/// The kernel. Forward: input `(b, t, h, d)` → output `(b, h, t, d)`, rotated by the
/// angles. Inverse (the backward): input `(b, h, t, d)` → output `(b, t, h, d)`, rotated
/// back. Either way the input is `(b, n1, n2, d)` and the output `(b, n2, n1, d)`.
struct Rotate {
    inverse: bool,
}

impl CustomOp3 for Rotate {
    fn name(&self) -> &'static str {
        "lorakit-rope-heads"
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
        let x = f32_input("rope", s1, l1)?;
        let (cos, sin) = (f32_input("rope", s2, l2)?, f32_input("rope", s3, l3)?);
        let (b, n1, n2, d) = l1.shape().dims4()?;
        let half = d / 2;
        let positions = if self.inverse { n2 } else { n1 };
        if d % 2 != 0 || cos.len() != positions * half || sin.len() != cos.len() {
            candle_core::bail!(
                "rope: tables {:?} do not fit input {:?}",
                l2.dims(),
                l1.dims()
            );
        }
        let sign = if self.inverse { -1f32 } else { 1f32 };
        let mut out = vec![0f32; x.len()];
        if half == 0 || x.is_empty() {
            return Ok((CpuStorage::F32(out), Shape::from((b, n2, n1, d))));
        }
        // One output block per (batch, j2): rows j1 = 0..n1, each from input row (j1, j2).
        out.par_chunks_mut(n1 * d)
            .enumerate()
            .for_each(|(block, dst)| {
                let (bi, j2) = (block / n2, block % n2);
                for (j1, row) in dst.chunks_mut(d).enumerate() {
                    let src = ((bi * n1 + j1) * n2 + j2) * d;
                    let pos = if self.inverse { j2 } else { j1 };
                    let (Some(src), Some(c), Some(s)) = (
                        x.get(src..src + d),
                        cos.get(pos * half..(pos + 1) * half),
                        sin.get(pos * half..(pos + 1) * half),
                    ) else {
                        continue;
                    };
                    let (x1, x2) = src.split_at(half);
                    let (y1, y2) = row.split_at_mut(half);
                    let pairs = y1.iter_mut().zip(y2.iter_mut()).zip(x1.iter().zip(x2));
                    for (((o1, o2), (&a, &bv)), (&ci, &si)) in pairs.zip(c.iter().zip(s)) {
                        let si = sign * si;
                        *o1 = a * ci - bv * si;
                        *o2 = bv * ci + a * si;
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((b, n2, n1, d))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let gx = grad
            .contiguous()?
            .apply_op3_no_bwd(cos, sin, &Rotate { inverse: true })?;
        Ok((Some(gx), None, None))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    /// Value and input gradient equal candle-nn's composed `rope_slow` after the
    /// transpose (the path the fused op replaces).
    #[test]
    fn equals_the_composed_rope() {
        let dev = Device::Cpu;
        let (b, t, h, d) = (2, 5, 3, 8);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (b, t, h, d), &dev).unwrap()).unwrap();
        let angles = Tensor::randn(0f32, 2., (t, d / 2), &dev).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        assert!(super::supports(x.as_tensor(), &cos, &sin));
        let fused = super::rope_heads_first(x.as_tensor(), &cos, &sin).unwrap();
        let xt = x.as_tensor().transpose(1, 2).unwrap().contiguous().unwrap();
        let composed = candle_nn::rotary_emb::rope_slow(&xt, &cos, &sin).unwrap();
        super::super::op_test::assert_same_op(
            &fused,
            &composed,
            &[("x", x.as_tensor())],
            1e-6,
            "rope",
        );
    }
}
