//! Causal grouped-query attention as one CPU op with its own backward, for training.
//!
//! The composed path (`q·kᵀ`, scale, mask, softmax, `probs·v`, the output transpose)
//! records about ten nodes, half of them `(heads, seq, seq)`-sized; candle's backward
//! gives each a zero-filled gradient and an add on top of its own work. This op computes
//! `softmax(scale · q kᵀ + causal mask) v` with candle's CPU matmul for the two products
//! and one pass for the scale, the mask (causal, optionally a sliding window) and the
//! softmax, and writes the output straight in `(batch, seq, heads · head_dim)` (what
//! `o_proj` reads). It keeps the probabilities for its backward (as the composed path's
//! softmax node does), which is
//! `dV = Pᵀ dO`, `dS = scale · P ⊙ (dO Vᵀ − rowsum(dO ⊙ O))`, `dQ = dS K`, `dK = dSᵀ Q`.
//! Each key/value head serves `heads / kv_heads` consecutive query heads; the products
//! run per key/value head over the stacked query heads, so keys and values are not
//! repeated and `dK`, `dV` sum over their query heads by the product itself.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_op::f32_input;

/// `softmax(scale · q kᵀ + mask) v` for `q` `(b, heads, t, d)` and `k`, `v`
/// `(b, kv_heads, kv_len, d)`, queries at positions `kv_len − t ..` and keys at `0..kv_len`:
/// a query sees the keys at or before its position (and, with `window`, fewer than
/// `window` positions back). Returns `(b, t, heads · d)`; differentiable in all three.
/// Callers check [`supports`] first.
pub(crate) fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    window: Option<usize>,
) -> candle_core::Result<Tensor> {
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        CausalAttention {
            scale: scale as f32,
            window,
            probs: Mutex::new(None),
        },
    )
}

/// Whether [`causal_attention`] runs: f32 CPU tensors of rank 4 whose batch and head
/// dims agree, the query heads a multiple of the key/value heads, at least as many keys as
/// queries.
pub(crate) fn supports(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    let (&[b, h, t, d], &[kb, g, kv, kd]) = (q.dims(), k.dims()) else {
        return false;
    };
    [q, k, v]
        .iter()
        .all(|x| x.device().is_cpu() && x.dtype() == DType::F32)
        && v.dims() == k.dims()
        && kb == b
        && kd == d
        && g > 0
        && h % g == 0
        && kv >= t
        && t > 0
}

struct CausalAttention {
    scale: f32,
    window: Option<usize>,
    /// The softmax probabilities `(b, kv_heads, heads / kv_heads · t, kv_len)` of the
    /// forward, for the backward.
    probs: Mutex<Option<Tensor>>,
}

/// The dimensions of one call.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    g: usize,
    t: usize,
    kv: usize,
    d: usize,
}

impl Dims {
    fn of(q: &Layout, k: &Layout, v: &Layout) -> candle_core::Result<Self> {
        let (b, h, t, d) = q.shape().dims4()?;
        let (kb, g, kv, kd) = k.shape().dims4()?;
        let fits = kb == b && kd == d && g > 0 && h % g == 0 && kv >= t && v.dims() == k.dims();
        if !(fits && q.is_contiguous() && k.is_contiguous() && v.is_contiguous()) {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} are not contiguous grouped-query shapes",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        Ok(Self { b, h, g, t, kv, d })
    }

    /// Query rows per key/value head (its query heads stacked).
    fn m(&self) -> usize {
        self.h / self.g * self.t
    }
}

fn f32_vec(s: CpuStorage) -> candle_core::Result<Vec<f32>> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        other => candle_core::bail!("attention: expected f32, got {:?}", other.dtype()),
    }
}

impl CausalAttention {
    /// Scales, masks and normalizes each row of `scores` `(b·g, m, kv)` in place.
    fn softmax_rows(&self, scores: &mut [f32], n: Dims) {
        let offset = n.kv - n.t;
        scores
            .par_chunks_mut(n.kv.max(1))
            .enumerate()
            .for_each(|(r, row)| {
                let pos = offset + r % n.t;
                let lo = self.window.map_or(0, |w| (pos + 1).saturating_sub(w));
                let hi = pos.min(n.kv - 1);
                let mut max = f32::NEG_INFINITY;
                let seen = row.get_mut(lo..=hi).unwrap_or_default();
                for v in seen.iter_mut() {
                    *v *= self.scale;
                    max = max.max(*v);
                }
                let sum = crate::vector_math::exp_in_place_sum(seen, max);
                let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
                for (j, v) in row.iter_mut().enumerate() {
                    if j < lo || j > hi {
                        *v = 0.0;
                    } else {
                        *v *= inv;
                    }
                }
            });
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "lorakit-causal-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = Dims::of(ql, kl, vl)?;
        let (bg, m) = (n.b * n.g, n.m());
        let q_rows = Layout::contiguous_with_offset((bg, m, n.d), ql.start_offset());
        let k_t =
            Layout::contiguous_with_offset((bg, n.kv, n.d), kl.start_offset()).transpose(1, 2)?;
        let mut probs = f32_vec(qs.matmul(ks, (bg, m, n.kv, n.d), &q_rows, &k_t)?)?;
        self.softmax_rows(&mut probs, n);
        let probs = CpuStorage::F32(probs);
        let heads = probs.matmul(
            vs,
            (bg, m, n.d, n.kv),
            &Layout::contiguous((bg, m, n.kv)),
            &Layout::contiguous_with_offset((bg, n.kv, n.d), vl.start_offset()),
        )?;
        let heads = f32_vec(heads)?;
        // (b, h, t, d) → (b, t, h, d).
        let (h, t, d) = (n.h, n.t, n.d);
        let mut out = vec![0f32; heads.len()];
        if !out.is_empty() {
            out.par_chunks_mut(h * d).enumerate().for_each(|(bt, dst)| {
                let (bi, ti) = (bt / t, bt % t);
                for (hi, row) in dst.chunks_mut(d).enumerate() {
                    let src = ((bi * h + hi) * t + ti) * d;
                    if let Some(src) = heads.get(src..src + d) {
                        row.copy_from_slice(src);
                    }
                }
            });
        }
        let probs = Tensor::from_vec(f32_vec(probs)?, (n.b, n.g, m, n.kv), &Device::Cpu)?;
        if let Ok(mut slot) = self.probs.lock() {
            *slot = Some(probs);
        }
        Ok((CpuStorage::F32(out), Shape::from((n.b, n.t, n.h * n.d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let probs = match self.probs.lock() {
            Ok(slot) => slot.clone(),
            Err(_) => None,
        };
        let Some(p) = probs else {
            candle_core::bail!("attention backward: the forward's probabilities are missing")
        };
        let (b, h, t, d) = q.dims4()?;
        let g = k.dim(1)?;
        let m = h / g * t;
        // (b, t, h·d) → (b, g, m, d), the layout of the products.
        let grouped = |x: &Tensor| -> candle_core::Result<Tensor> {
            x.reshape((b, t, h, d))?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b, g, m, d))
        };
        let d_out = grouped(grad)?;
        let row_dot = grouped(&(grad * res)?)?.sum_keepdim(3)?;
        let d_v = p.t()?.matmul(&d_out)?;
        let d_p = d_out.matmul(&v.t()?)?;
        let d_s = p.apply_op3_no_bwd(
            &d_p,
            &row_dot.contiguous()?,
            &ScoresGrad { scale: self.scale },
        )?;
        let d_q = d_s.matmul(k)?.reshape((b, h, t, d))?;
        let d_k = d_s.t()?.matmul(&q.reshape((b, g, m, d))?)?;
        let keep = |x: &Tensor, grad: Tensor| x.track_op().then_some(grad);
        Ok((keep(q, d_q), keep(k, d_k), keep(v, d_v)))
    }
}

/// The scores' gradient from the probabilities `P`, their gradient `dP` (both
/// `(…, kv)`) and `rowsum(dO ⊙ O)` `(…, 1)`: `scale · P ⊙ (dP − rowsum)`, in one pass.
struct ScoresGrad {
    scale: f32,
}

impl CustomOp3 for ScoresGrad {
    fn name(&self) -> &'static str {
        "lorakit-attention-scores-grad"
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
        let p = f32_input("attention backward", s1, l1)?;
        let dp = f32_input("attention backward", s2, l2)?;
        let dot = f32_input("attention backward", s3, l3)?;
        let kv = l1.dims().last().copied().unwrap_or(0);
        if kv == 0 || dp.len() != p.len() || dot.len() * kv != p.len() {
            candle_core::bail!(
                "attention backward: probabilities {:?}, their gradient {:?}, row sums {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let mut out = vec![0f32; p.len()];
        out.par_chunks_mut(kv)
            .zip(p.par_chunks(kv).zip(dp.par_chunks(kv)))
            .zip(dot.par_iter())
            .for_each(|((dst, (pr, dpr)), &c)| {
                for ((d, &pv), &g) in dst.iter_mut().zip(pr).zip(dpr) {
                    *d = self.scale * pv * (g - c);
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var, D};

    /// The reference: keys and values repeated per query head (transformers'
    /// `repeat_kv`), scores, an additive mask built element by element, candle-nn's
    /// composed softmax, the product and the output transpose.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, window: Option<usize>) -> Tensor {
        let (b, h, t, d) = q.dims4().unwrap();
        let (_, g, kv, _) = k.dims4().unwrap();
        let repeat = |x: &Tensor| {
            x.unsqueeze(2)
                .unwrap()
                .broadcast_as((b, g, h / g, kv, d))
                .unwrap()
                .reshape((b, h, kv, d))
                .unwrap()
        };
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| {
                let pos = kv - t + i;
                (0..kv).map(move |j| {
                    let seen = j <= pos && window.is_none_or(|w| j + w > pos);
                    if seen {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, kv), &Device::Cpu).unwrap();
        let scores = (q.matmul(&repeat(k).t().unwrap()).unwrap() * scale)
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        let probs = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
        probs
            .matmul(&repeat(v))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, h * d))
            .unwrap()
    }

    /// Value and the gradients of q, k and v equal the composed ops: grouped-query heads,
    /// full causal and sliding-window masks, queries after earlier keys.
    #[test]
    fn equals_the_composed_attention() {
        let dev = Device::Cpu;
        for (h, g, t, kv, window) in [
            (4, 2, 5, 5, None),
            (4, 2, 6, 6, Some(3)),
            (3, 3, 3, 5, None),
            (2, 1, 4, 7, Some(2)),
        ] {
            let (b, d) = (2, 4);
            let var = |shape: (usize, usize, usize, usize)| {
                Var::from_tensor(&Tensor::randn(0f32, 1., shape, &dev).unwrap()).unwrap()
            };
            let (q, k, v) = (var((b, h, t, d)), var((b, g, kv, d)), var((b, g, kv, d)));
            let scale = 1.0 / (d as f64).sqrt();
            let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
            assert!(super::supports(qt, kt, vt));
            let fused = super::causal_attention(qt, kt, vt, scale, window).unwrap();
            let reference = composed(qt, kt, vt, scale, window);
            let case = format!("h {h}, g {g}, t {t}, kv {kv}, window {window:?}");
            let inputs = [("q", qt), ("k", kt), ("v", vt)];
            super::super::op_test::assert_same_op(&fused, &reference, &inputs, 1e-5, &case);
        }
    }
}
