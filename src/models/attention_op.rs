//! Grouped-query attention as one CPU op with its own backward: causal (training, and
//! generation over a KV cache, keys and values read in place from the cache's buffers), or
//! every query seeing its batch element's unmasked keys, with dropout on the
//! probabilities (an encoder's self-attention: BERT's).
//!
//! The composed path (`q·kᵀ`, scale, mask, softmax, dropout, `probs·v`, the output
//! transpose) records about ten nodes, half of them `(heads, seq, seq)`-sized; candle's
//! backward gives each a zero-filled gradient and an add on top of its own work. This op
//! computes `softmax(scale · q kᵀ + mask) v` with products that skip the keys the mask
//! hides from whole blocks of queries ([`super::attention_blocks`]) and one pass for the
//! scale, the mask (causal, optionally a sliding window; or per key) and the softmax, and
//! writes the output in `(batch, seq, heads · head_dim)` (what `o_proj` reads). It keeps
//! the probabilities for its backward (as the composed path's softmax node does), which
//! is `dV = Pᵀ dO`, `dS = scale · P ⊙ (dO Vᵀ − rowsum(dO ⊙ O))`, `dQ = dS K`,
//! `dK = dSᵀ Q` (with dropout, [`super::attention_blocks`]' note). With Gemma 2's
//! soft-capping the scaled scores become `z = cap · tanh(scale · s / cap)` before the mask,
//! and the forward also keeps each score's slope `1 − tanh²`, which multiplies `dS`. With
//! GPT-OSS's attention sinks (one learned logit per query head, [`ScoreScale::sinks`])
//! each row's softmax also counts its head's sink,
//! `p_j = exp(z_j − m) / (Σ_k exp(z_k − m) + exp(sink − m))` with
//! `m = max(max_j z_j, sink)`, and keeps only the keys' probabilities (summing to less
//! than 1); the backward is unchanged, since the sink's column has no upstream gradient
//! (`rowsum(dO ⊙ O)` is still `Σ_j P_j dP_j` over the keys), and the sinks, frozen, get
//! none. Each key/value head serves `heads / kv_heads` consecutive query heads; the
//! products run per key/value head over the stacked query heads, so keys and values are
//! not repeated and `dK`, `dV` sum over their query heads by the product itself.

use std::sync::{Arc, Mutex};

use candle_core::{
    CpuStorage, CustomOp3, DType, Device, Layout, Shape, Storage, Tensor, WithDType,
};
use rayon::prelude::*;

use super::attention_blocks::{self, Seen};
use super::cpu_op::f32_input;
use super::padding::seen_keys;
use crate::kernels::dropout::Dropout;

/// The op's name in errors.
const OP: &str = "attention";

/// `softmax(scale · q kᵀ + mask) v` (scores as `scores` says: [`ScoreScale`]) for `q`
/// `(b, heads, t, d)` and `k`, `v`
/// `(b, kv_heads, kv_len, d)`, queries in slots `kv_len − t ..` and keys in `0..kv_len`:
/// a query sees the keys at or before its slot (and, with `window`, fewer than `window`
/// slots back), with `dropout` on the probabilities. In a left-padded batch, `pads`
/// (one per batch element) hides each row's padding slots from its tokens, and a padding
/// query sees only itself (`models::padding`). Returns `(b, t, heads · d)`;
/// differentiable in all three. Callers check [`supports`] first.
pub(crate) fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scores: impl Into<ScoreScale>,
    window: Option<usize>,
    pads: Option<&[usize]>,
    dropout: Option<Dropout>,
) -> candle_core::Result<Tensor> {
    let pads = pads.map(<[usize]>::to_vec).unwrap_or_default();
    if !pads.is_empty() && pads.len() != q.dim(0)? {
        candle_core::bail!(
            "{OP}: padding for {} batch elements, queries {:?}",
            pads.len(),
            q.dims()
        )
    }
    apply(
        q,
        k,
        v,
        scores.into(),
        Mask::Causal { window, pads },
        dropout,
    )
}

/// `softmax(scale · q kᵀ + mask) v` with dropout on the probabilities, shapes as
/// [`causal_attention`]'s, where every query of batch element `i` sees the keys `keys`
/// lets it see. Callers check [`supports`] first. A bare scale: no soft-cap and no
/// attention sinks here (no encoder has them; the op's softmax would apply them).
pub(crate) fn key_masked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    keys: KeyMask,
    dropout: Option<Dropout>,
) -> candle_core::Result<Tensor> {
    if keys.ends.len() != q.dim(0)? || keys.visible.len() != keys.ends.len() * k.dim(2)? {
        candle_core::bail!(
            "{OP}: a key mask of {} batch elements and {} keys for keys {:?}",
            keys.ends.len(),
            keys.visible.len(),
            k.dims()
        )
    }
    apply(q, k, v, scale.into(), Mask::Keys(keys), dropout)
}

fn apply(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scores: ScoreScale,
    mask: Mask,
    dropout: Option<Dropout>,
) -> candle_core::Result<Tensor> {
    if let Some(sinks) = &scores.sinks {
        if sinks.len() != q.dim(1)? {
            candle_core::bail!(
                "{OP}: {} attention sinks for queries {:?} (one per query head)",
                sinks.len(),
                q.dims()
            )
        }
    }
    q.contiguous()?.apply_op3(
        &heads_in_place(k)?,
        &heads_in_place(v)?,
        Attention {
            scale: scores.scale as f32,
            softcap: scores.softcap.map(|cap| cap as f32),
            sinks: scores.sinks,
            mask,
            dropout,
            saved: Mutex::new(None),
        },
    )
}

/// Whether [`causal_attention`] and [`key_masked_attention`] run: f32 CPU tensors of rank
/// 4 whose batch and head dims agree, the query heads a multiple of the key/value heads,
/// at least as many keys as queries.
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

/// Which keys each batch element's queries see.
#[derive(Clone, Debug)]
pub(crate) struct KeyMask {
    /// `(batch, kv_len)`, row-major.
    visible: Vec<bool>,
    /// Per batch element, one past its last visible key.
    ends: Vec<usize>,
}

impl KeyMask {
    /// The mask whose flags `visible` are `(batch, kv_len)` row-major (`kv_len > 0`);
    /// `None` when some batch element sees no key (its softmax has nothing to normalize)
    /// or the flags are not whole rows.
    pub(crate) fn new(visible: Vec<bool>, kv_len: usize) -> Option<Self> {
        if kv_len == 0 || !visible.len().is_multiple_of(kv_len) {
            return None;
        }
        let ends = visible
            .chunks(kv_len)
            .map(|row| row.iter().rposition(|&seen| seen).map(|last| last + 1))
            .collect::<Option<Vec<usize>>>()?;
        Some(Self { visible, ends })
    }
}

/// The mask the op applies.
enum Mask {
    /// `pads`: each batch element's left padding; empty for none.
    Causal {
        window: Option<usize>,
        pads: Vec<usize>,
    },
    Keys(KeyMask),
}

impl Mask {
    fn seen(&self) -> Seen<'_> {
        match self {
            Mask::Causal { window, pads } => Seen::Causal {
                window: *window,
                pads,
            },
            Mask::Keys(keys) => Seen::Keys { ends: &keys.ends },
        }
    }
}

/// What the forward keeps for the backward.
struct Saved {
    /// The softmax probabilities `(b, kv_heads, heads / kv_heads · t, kv_len)`.
    probs: Tensor,
    /// The probabilities after dropout, as `probs`; `None` without dropout.
    dropped: Option<Tensor>,
    /// The soft-cap's slopes `1 − tanh²(scale · s / cap)`, as `probs` (0 where masked);
    /// `None` without a soft-cap.
    cap_slopes: Option<Tensor>,
}

/// How the scores `q · kᵀ` become the softmax's input: times `scale`, then soft-capped to
/// `(−cap, cap)` as `cap · tanh(x / cap)` when `softcap` is set (Gemma 2), before the mask;
/// with `sinks`, each row's softmax also counts its query head's sink logit (GPT-OSS).
/// A bare `f64` is a scale without a cap or sinks.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ScoreScale {
    pub(crate) scale: f64,
    pub(crate) softcap: Option<f64>,
    /// One logit per query head (`heads` of them; frozen: no gradient), an extra column
    /// of every row of that head's scores, after the mask, that joins the softmax's max
    /// and sum and is then dropped (transformers' GPT-OSS `eager_attention_forward`):
    /// the keys' probabilities sum to less than 1. `None`: no sinks.
    pub(crate) sinks: Option<Arc<[f32]>>,
}

impl From<f64> for ScoreScale {
    fn from(scale: f64) -> Self {
        Self {
            scale,
            softcap: None,
            sinks: None,
        }
    }
}

struct Attention {
    scale: f32,
    softcap: Option<f32>,
    /// One logit per query head ([`ScoreScale::sinks`]).
    sinks: Option<Arc<[f32]>>,
    mask: Mask,
    dropout: Option<Dropout>,
    saved: Mutex<Option<Saved>>,
}

/// Rows from one head to the next of `(b, heads, rows, d)` whose heads are each
/// contiguous and evenly spaced, at least `rows` apart: a contiguous tensor (`rows`), or a
/// KV cache's first positions in buffers with room after them (the buffers' capacity).
fn head_stride(l: &Layout) -> Option<usize> {
    let (&[b, g, rows, d], &[s_b, s_g, s_r, s_d]) = (l.dims(), l.stride()) else {
        return None;
    };
    // Elements from one head to the next (a dimension of size 1 may have any stride).
    let head = match (b, g) {
        (1, 1) => rows * d,
        (_, 1) => s_b,
        (1, _) => s_g,
        _ if s_b == g * s_g => s_g,
        _ => return None,
    };
    let stride = head.checked_div(d)?;
    let fits = (s_d == 1 || d == 1) && (s_r == d || rows == 1) && head % d == 0 && stride >= rows;
    fits.then_some(stride)
}

/// `x` when its heads can be read in place ([`head_stride`]), else a contiguous copy.
fn heads_in_place(x: &Tensor) -> candle_core::Result<Tensor> {
    match head_stride(x.layout()) {
        Some(_) => Ok(x.clone()),
        None => x.contiguous(),
    }
}

/// The elements of `(b, heads, rows, d)` laid out as [`head_stride`] accepts, from its
/// first element to its last.
fn heads_input<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = f32::cpu_storage_as_slice(s)?;
    let (&[b, g, rows, d], Some(stride)) = (l.dims(), head_stride(l)) else {
        candle_core::bail!(
            "{OP}: keys and values {:?} are not evenly spaced heads",
            l.dims()
        )
    };
    let len = (b * g).saturating_sub(1) * stride * d + rows * d;
    match data.get(l.start_offset()..l.start_offset() + len) {
        Some(slice) => Ok(slice),
        None => candle_core::bail!("{OP}: {len} elements of keys or values outside their buffer"),
    }
}

/// The CPU storage behind a tensor's storage guard.
fn on_cpu(storage: &Storage) -> candle_core::Result<&CpuStorage> {
    match storage {
        Storage::Cpu(storage) => Ok(storage),
        _ => candle_core::bail!("attention backward: expected CPU tensors"),
    }
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
    /// Rows from one key/value head to the next in `k` and `v` ([`head_stride`]).
    kv_stride: usize,
}

impl Dims {
    fn of(q: &Layout, k: &Layout, v: &Layout) -> candle_core::Result<Self> {
        let (b, h, t, d) = q.shape().dims4()?;
        let (kb, g, kv, kd) = k.shape().dims4()?;
        let fits = kb == b && kd == d && g > 0 && h % g == 0 && kv >= t && v.dims() == k.dims();
        let kv_stride = head_stride(k).filter(|&s| head_stride(v) == Some(s));
        match kv_stride {
            Some(kv_stride) if fits && q.is_contiguous() => Ok(Self {
                b,
                h,
                g,
                t,
                kv,
                d,
                kv_stride,
            }),
            _ => candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} are not grouped-query shapes (q contiguous, \
                 k and v in evenly spaced heads with the same spacing)",
                q.dims(),
                k.dims(),
                v.dims()
            ),
        }
    }

    /// Query rows per key/value head (its query heads stacked).
    fn m(&self) -> usize {
        self.h / self.g * self.t
    }

    /// The query head of row `r` of the scores `(b, g, m, kv)`: key/value head `gi`
    /// serves query heads `gi · h/g ..` stacked `t` rows each, so the rows run over
    /// `(b, g, h/g, t)`, that is `(b, h, t)`.
    fn query_head(&self, r: usize) -> usize {
        r / self.t.max(1) % self.h.max(1)
    }
}

impl Attention {
    /// The sizes [`attention_blocks`] works on.
    fn block_shape(&self, n: Dims) -> attention_blocks::Shape<'_> {
        attention_blocks::Shape {
            batch: n.b,
            kv_heads: n.g,
            group: n.h / n.g,
            t: n.t,
            kv: n.kv,
            kv_stride: n.kv_stride,
            d: n.d,
            seen: self.mask.seen(),
        }
    }

    /// Scales, soft-caps, masks and normalizes each row of `scores` `(b·g, m, kv)` in
    /// place; with a soft-cap, `slopes` (as `scores`, zeros) receives each seen score's
    /// slope `1 − tanh²`.
    fn softmax_rows(&self, scores: &mut [f32], slopes: Option<&mut [f32]>, n: Dims) {
        let width = n.kv.max(1);
        let rows = scores.par_chunks_mut(width).enumerate();
        match slopes {
            Some(slopes) => rows
                .zip(slopes.par_chunks_mut(width))
                .for_each(|((r, row), slopes)| self.softmax_row(r, row, Some(slopes), n)),
            None => rows.for_each(|(r, row)| self.softmax_row(r, row, None, n)),
        }
    }

    /// [`Attention::softmax_rows`] for row `r`.
    fn softmax_row(&self, r: usize, row: &mut [f32], slopes: Option<&mut [f32]>, n: Dims) {
        let offset = n.kv - n.t;
        // The keys this row may see, `lo..hi`, and which of them it sees.
        let (lo, hi, visible) = match &self.mask {
            Mask::Causal { window, pads } => {
                let pad = pads.get(r / n.m() / n.g).copied().unwrap_or(0);
                let keys = seen_keys(offset + r % n.t, pad, *window);
                (keys.start, keys.end.min(n.kv), None)
            }
            Mask::Keys(keys) => {
                let batch = r / n.m() / n.g;
                let end = keys.ends.get(batch).copied().unwrap_or(0);
                let flags = keys.visible.get(batch * n.kv..batch * n.kv + end);
                (0, end, flags)
            }
        };
        crate::kernels::vector_math::on_widest_vectors(
            #[inline(always)]
            || {
                let seen = row.get_mut(lo..hi).unwrap_or_default();
                match visible {
                    None => seen.iter_mut().for_each(|v| *v *= self.scale),
                    Some(flags) => {
                        for (v, &shown) in seen.iter_mut().zip(flags) {
                            *v = if shown {
                                *v * self.scale
                            } else {
                                f32::NEG_INFINITY
                            };
                        }
                    }
                }
                if let (Some(cap), Some(slopes)) = (self.softcap, slopes) {
                    // Masked scores stay −∞ (their slope 0): the cap comes before the mask.
                    let slopes = slopes.get_mut(lo..hi).unwrap_or_default();
                    crate::kernels::vector_math::soft_cap_in_place(seen, slopes, cap);
                }
                let mut max = crate::kernels::vector_math::max(seen);
                // The sink joins the max, and `exp(sink − max)` the sum.
                let mut sink_share = 0.0;
                if let Some(sinks) = &self.sinks {
                    let sink = sinks
                        .get(n.query_head(r))
                        .copied()
                        .unwrap_or(f32::NEG_INFINITY);
                    max = max.max(sink);
                    // A row that sees nothing, with a sink of −∞, has nothing to count.
                    if max > f32::NEG_INFINITY {
                        sink_share = (sink - max).exp();
                    }
                }
                let sum = crate::kernels::vector_math::exp_in_place_sum(seen, max) + sink_share;
                let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
                for (j, v) in row.iter_mut().enumerate() {
                    if j < lo || j >= hi {
                        *v = 0.0;
                    } else {
                        *v *= inv;
                    }
                }
            },
        )
    }
}

impl CustomOp3 for Attention {
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
        let shape = self.block_shape(n);
        let (q, k, v) = (
            f32_input(OP, qs, ql)?,
            heads_input(ks, kl)?,
            heads_input(vs, vl)?,
        );
        let mut probs = vec![0f32; bg * m * n.kv];
        attention_blocks::scores(q, k, shape, &mut probs)?;
        let mut cap_slopes = self.softcap.map(|_| vec![0f32; probs.len()]);
        self.softmax_rows(&mut probs, cap_slopes.as_deref_mut(), n);
        let dropped = self.dropout.map(|dropout| dropout.apply(&probs, 0));
        let mut heads = vec![0f32; bg * m * n.d];
        let used = dropped.as_deref().unwrap_or(&probs);
        attention_blocks::weighted_values(used, v, shape, &mut heads)?;
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
        let saved_shape = (n.b, n.g, m, n.kv);
        let saved = Saved {
            probs: Tensor::from_vec(probs, saved_shape, &Device::Cpu)?,
            dropped: dropped
                .map(|d| Tensor::from_vec(d, saved_shape, &Device::Cpu))
                .transpose()?,
            cap_slopes: cap_slopes
                .map(|s| Tensor::from_vec(s, saved_shape, &Device::Cpu))
                .transpose()?,
        };
        if let Ok(mut slot) = self.saved.lock() {
            *slot = Some(saved);
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
        let saved = match self.saved.lock() {
            Ok(slot) => slot
                .as_ref()
                .map(|s| (s.probs.clone(), s.dropped.clone(), s.cap_slopes.clone())),
            Err(_) => None,
        };
        let Some((p, dropped, cap_slopes)) = saved else {
            candle_core::bail!("attention backward: the forward's probabilities are missing")
        };
        // Without dropout the product read the probabilities themselves.
        let p_used = dropped.unwrap_or_else(|| p.clone());
        let (qc, kc, vc) = (q.contiguous()?, heads_in_place(k)?, heads_in_place(v)?);
        let n = Dims::of(qc.layout(), kc.layout(), vc.layout())?;
        // The output and its gradient stay in `(b, t, h·d)`: the blocks read each head's
        // rows in place.
        let (out, d_out) = (res.contiguous()?, grad.contiguous()?);
        // Without a soft-cap the slopes' guard reads the probabilities (unused).
        let slopes = cap_slopes.unwrap_or_else(|| p.clone());
        let guards =
            [&qc, &kc, &vc, &p, &p_used, &out, &d_out, &slopes].map(|t| t.storage_and_layout());
        let [q_g, k_g, v_g, p_g, used_g, out_g, d_out_g, slopes_g] = &guards;
        let inputs = attention_blocks::BackwardInputs {
            q: f32_input(OP, on_cpu(&q_g.0)?, q_g.1)?,
            k: heads_input(on_cpu(&k_g.0)?, k_g.1)?,
            v: heads_input(on_cpu(&v_g.0)?, v_g.1)?,
            probs: f32_input(OP, on_cpu(&p_g.0)?, p_g.1)?,
            dropped: match self.dropout {
                Some(_) => Some(f32_input(OP, on_cpu(&used_g.0)?, used_g.1)?),
                None => None,
            },
            out: f32_input(OP, on_cpu(&out_g.0)?, out_g.1)?,
            d_out: f32_input(OP, on_cpu(&d_out_g.0)?, d_out_g.1)?,
            scale: self.scale,
            cap_slopes: match self.softcap {
                Some(_) => Some(f32_input(OP, on_cpu(&slopes_g.0)?, slopes_g.1)?),
                None => None,
            },
        };
        let shape = self.block_shape(n);
        let (d_q, d_k, d_v) = attention_blocks::backward(&inputs, shape)?;
        let Dims {
            b, h, g, t, kv, d, ..
        } = n;
        drop(guards);
        let dev = Device::Cpu;
        let d_q = Tensor::from_vec(d_q, (b, h, t, d), &dev)?;
        let d_k = Tensor::from_vec(d_k, (b, g, kv, d), &dev)?;
        let d_v = Tensor::from_vec(d_v, (b, g, kv, d), &dev)?;
        let keep = |x: &Tensor, grad: Tensor| x.track_op().then_some(grad);
        Ok((keep(q, d_q), keep(k, d_k), keep(v, d_v)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var, D};

    use crate::matmul::matmul;

    /// The reference: keys and values repeated per query head (transformers'
    /// `repeat_kv`), scores, an additive `mask` broadcast to `(b, h, t, kv)`, with sinks
    /// their head's sink as one more column of scores `(b, h, t, kv + 1)` (dropped after
    /// the softmax, transformers' GPT-OSS eager attention), candle-nn's
    /// composed softmax, the probabilities times `keep` (dropout's choices and scale,
    /// `(b, h, t, kv)`) when given, the product and the output transpose.
    fn composed_with(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scores: impl Into<super::ScoreScale>,
        mask: &Tensor,
        keep: Option<Tensor>,
    ) -> Tensor {
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
        let super::ScoreScale {
            scale,
            softcap,
            sinks,
        } = scores.into();
        let mut scores = (matmul(q, &repeat(k).t().unwrap()).unwrap() * scale).unwrap();
        if let Some(cap) = softcap {
            scores = ((scores / cap).unwrap().tanh().unwrap() * cap).unwrap();
        }
        let mut scores = scores.broadcast_add(mask).unwrap();
        if let Some(sinks) = &sinks {
            let column = Tensor::from_slice(sinks, (1, h, 1, 1), &Device::Cpu)
                .unwrap()
                .broadcast_as((b, h, t, 1))
                .unwrap();
            scores = Tensor::cat(&[&scores, &column], 3).unwrap();
        }
        let mut probs = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
        if sinks.is_some() {
            probs = probs.narrow(3, 0, kv).unwrap();
        }
        if let Some(keep) = keep {
            probs = (probs * keep).unwrap();
        }
        matmul(&probs, &repeat(v))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, h * d))
            .unwrap()
    }

    /// The causal reference: [`composed`] with `dropout`'s choices on the probabilities.
    fn composed_dropped(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: impl Into<super::ScoreScale>,
        window: Option<usize>,
        dropout: Option<&super::Dropout>,
    ) -> Tensor {
        let (t, kv) = (q.dim(2).unwrap(), k.dim(2).unwrap());
        composed_with(
            q,
            k,
            v,
            scale,
            &causal_mask(t, kv, window),
            keep(q, kv, dropout),
        )
    }

    /// The causal reference: [`composed_with`] and [`causal_mask`].
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, window: Option<usize>) -> Tensor {
        composed_dropped(q, k, v, scale, window, None)
    }

    /// The additive causal mask `(t, kv)`, built element by element.
    fn causal_mask(t: usize, kv: usize, window: Option<usize>) -> Tensor {
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
        Tensor::from_vec(mask, (t, kv), &Device::Cpu).unwrap()
    }

    /// `dropout`'s choices and scale on probabilities `(b, h, t, kv)` for queries `q`
    /// `(b, h, t, d)`: their index there is the op's index in its
    /// `(b, kv_heads, heads / kv_heads · t, kv)` layout.
    fn keep(q: &Tensor, kv: usize, dropout: Option<&super::Dropout>) -> Option<Tensor> {
        let (b, h, t, _) = q.dims4().unwrap();
        dropout.map(|dropout| {
            let keep = dropout.factors(b * h * t * kv);
            Tensor::from_vec(keep, (b, h, t, kv), &Device::Cpu).unwrap()
        })
    }

    /// Value and the gradients of q, k and v equal the composed ops with the same dropped
    /// entries: grouped-query heads, full causal and sliding-window masks, queries after
    /// earlier keys, one block of query rows and several, with and without dropout, with
    /// and without Gemma 2's soft-cap (`cap · tanh(scale · s / cap)` before the mask).
    #[test]
    fn equals_the_composed_attention() {
        let dev = Device::Cpu;
        for (h, g, t, kv, window, p, softcap) in [
            (4, 2, 5, 5, None, 0.0, None),
            (4, 2, 6, 6, Some(3), 0.0, None),
            (3, 3, 3, 5, None, 0.0, None),
            (2, 1, 4, 7, Some(2), 0.0, None),
            // Past one block of query rows (attention_blocks::BLOCK_ROWS = 64): the
            // later blocks' key spans, a ragged last block, windows inside and across
            // blocks.
            (4, 2, 150, 150, None, 0.0, None),
            (2, 1, 70, 100, Some(40), 0.0, None),
            (3, 3, 130, 130, Some(100), 0.0, None),
            (4, 2, 6, 6, None, 0.3, None),
            (2, 1, 70, 100, Some(40), 0.5, None),
            // Scores of size ~1 against a cap of 0.7: the cap bends most of them.
            (4, 2, 6, 6, None, 0.0, Some(0.7)),
            (2, 1, 70, 100, Some(40), 0.0, Some(0.7)),
            (4, 2, 6, 6, Some(3), 0.3, Some(0.7)),
        ] {
            let (b, d) = (2, 4);
            let var = |shape: (usize, usize, usize, usize)| {
                Var::from_tensor(&Tensor::randn(0f32, 1., shape, &dev).unwrap()).unwrap()
            };
            let (q, k, v) = (var((b, h, t, d)), var((b, g, kv, d)), var((b, g, kv, d)));
            let scale = 1.0 / (d as f64).sqrt();
            let scores = super::ScoreScale {
                scale,
                softcap,
                sinks: None,
            };
            let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
            assert!(super::supports(qt, kt, vt));
            let dropout = (p > 0.0).then(|| super::Dropout::with_seed(p, 7));
            let fused =
                super::causal_attention(qt, kt, vt, scores.clone(), window, None, dropout).unwrap();
            let reference = composed_dropped(qt, kt, vt, scores, window, dropout.as_ref());
            if softcap.is_some() {
                let uncapped = composed_dropped(qt, kt, vt, scale, window, dropout.as_ref());
                let apart = (&reference - &uncapped).unwrap().abs().unwrap();
                assert!(apart.max_all().unwrap().to_scalar::<f32>().unwrap() > 1e-2);
            }
            let case =
                format!("h {h}, g {g}, t {t}, kv {kv}, window {window:?}, p {p}, cap {softcap:?}");
            let inputs = [("q", qt), ("k", kt), ("v", vt)];
            super::super::op_test::assert_same_op(&fused, &reference, &inputs, 1e-5, &case);
        }
    }

    /// In a left-padded batch (each row's padding hidden from its tokens, a padding query
    /// seeing only itself): the value and the gradients of q, k and v equal the composed
    /// ops under `models::padding`'s mask with the same dropped entries. Rows without
    /// padding, with some, padding past a block of query rows, sliding windows, queries
    /// after cached keys (decoding: one query over a longer cache), grouped-query heads.
    #[test]
    fn left_padded_equals_the_composed_attention() {
        let dev = Device::Cpu;
        // ((h, g, t, kv), pads, window, dropout).
        type Heads = (usize, usize, usize, usize);
        let cases: [(Heads, &[usize], Option<usize>, f32); 8] = [
            ((4, 2, 6, 6), &[0, 2], None, 0.0),
            ((2, 2, 5, 5), &[3, 0, 1], Some(2), 0.0),
            ((4, 2, 1, 9), &[0, 4], None, 0.0),
            ((3, 1, 2, 8), &[5, 1], Some(3), 0.0),
            ((4, 2, 150, 150), &[0, 70], None, 0.0),
            ((2, 1, 70, 100), &[80, 10], Some(40), 0.0),
            ((4, 2, 6, 6), &[1, 3], None, 0.3),
            ((2, 2, 130, 130), &[66, 0], Some(90), 0.4),
        ];
        for ((h, g, t, kv), pads, window, p) in cases {
            let (b, d) = (pads.len(), 4);
            let var = |shape: (usize, usize, usize, usize)| {
                Var::from_tensor(&Tensor::randn(0f32, 1., shape, &dev).unwrap()).unwrap()
            };
            let (q, k, v) = (var((b, h, t, d)), var((b, g, kv, d)), var((b, g, kv, d)));
            let scale = 1.0 / (d as f64).sqrt();
            let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
            let dropout = (p > 0.0).then(|| super::Dropout::with_seed(p, 5));
            let fused =
                super::causal_attention(qt, kt, vt, scale, window, Some(pads), dropout).unwrap();
            let values = crate::models::padding::mask_values(Some(pads), t, kv, kv - t, window);
            let mask = Tensor::from_vec(values, (b, 1, t, kv), &dev).unwrap();
            let reference = composed_with(qt, kt, vt, scale, &mask, keep(qt, kv, dropout.as_ref()));
            let case =
                format!("h {h}, g {g}, t {t}, kv {kv}, pads {pads:?}, window {window:?}, p {p}");
            let inputs = [("q", qt), ("k", kt), ("v", vt)];
            super::super::op_test::assert_same_op(&fused, &reference, &inputs, 1e-5, &case);
        }
        // Padding for another batch size is refused.
        let q = Tensor::zeros((2, 2, 3, 4), candle_core::DType::F32, &dev).unwrap();
        let err = super::causal_attention(&q, &q, &q, 1.0, None, Some(&[1]), None).unwrap_err();
        assert!(
            err.to_string().contains("padding for 1 batch elements"),
            "{err}"
        );
    }

    /// Distinct sink logits for `h` query heads, about the size of the scores: a sink
    /// ignored or read for another head changes the result.
    fn sinks(h: usize) -> std::sync::Arc<[f32]> {
        (0..h)
            .map(|i| [-1.5f32, 0.9, 2.2, -0.4, 0.3, 1.4][i % 6])
            .collect()
    }

    /// With attention sinks (GPT-OSS): the value and the gradients of q, k and v equal
    /// both references with the same sinks, [`composed_with`] (keys repeated per query
    /// head, its own sink column) and `fused::composed_attention` (the path off the op,
    /// key/value heads grouped), under grouped-query heads, sliding windows, left
    /// padding (a padding query seeing only itself), queries after cached keys (`t <
    /// kv`, one query decoding), several blocks of query rows, a soft-cap, dropout (the
    /// first reference only: the second draws its own). The sinks change the output.
    #[test]
    fn with_sinks_equals_the_composed_attention() {
        let dev = Device::Cpu;
        // ((h, g, t, kv), pads, window, dropout, soft-cap).
        type Heads = (usize, usize, usize, usize);
        type Case = (
            Heads,
            Option<&'static [usize]>,
            Option<usize>,
            f32,
            Option<f64>,
        );
        let cases: [Case; 11] = [
            ((4, 2, 6, 6), None, None, 0.0, None),
            ((4, 2, 6, 6), None, Some(3), 0.0, None),
            ((3, 3, 5, 5), None, None, 0.0, None),
            ((4, 2, 3, 9), None, Some(4), 0.0, None),
            ((4, 2, 1, 9), Some(&[0, 4]), None, 0.0, None),
            ((4, 2, 6, 6), Some(&[0, 2]), Some(3), 0.0, None),
            ((4, 2, 4, 10), Some(&[3, 7]), Some(5), 0.0, None),
            ((4, 2, 150, 150), Some(&[0, 70]), None, 0.0, None),
            ((2, 1, 70, 100), Some(&[80, 10]), Some(40), 0.0, None),
            ((4, 2, 6, 6), Some(&[1, 3]), Some(4), 0.3, None),
            ((4, 2, 6, 8), None, Some(3), 0.0, Some(0.7)),
        ];
        for ((h, g, t, kv), pads, window, p, softcap) in cases {
            let (b, d) = (pads.map_or(2, <[usize]>::len), 4);
            let var = |shape: (usize, usize, usize, usize)| {
                Var::from_tensor(&Tensor::randn(0f32, 1., shape, &dev).unwrap()).unwrap()
            };
            let (q, k, v) = (var((b, h, t, d)), var((b, g, kv, d)), var((b, g, kv, d)));
            let scale = 1.0 / (d as f64).sqrt();
            let sinks = sinks(h);
            let scores = super::ScoreScale {
                scale,
                softcap,
                sinks: Some(sinks.clone()),
            };
            let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
            let dropout = (p > 0.0).then(|| super::Dropout::with_seed(p, 11));
            let fused =
                super::causal_attention(qt, kt, vt, scores.clone(), window, pads, dropout).unwrap();
            let values = crate::models::padding::mask_values(pads, t, kv, kv - t, window);
            let rows = pads.map_or(1, <[usize]>::len);
            let mask = Tensor::from_vec(values, (rows, 1, t, kv), &dev).unwrap();
            let keep = || keep(qt, kv, dropout.as_ref());
            let reference = composed_with(qt, kt, vt, scores, &mask, keep());
            let unsunk = super::ScoreScale {
                scale,
                softcap,
                sinks: None,
            };
            let without = composed_with(qt, kt, vt, unsunk, &mask, keep());
            let apart = super::super::op_test::max_abs(&(&reference - &without).unwrap());
            let case = format!(
                "h {h}, g {g}, t {t}, kv {kv}, pads {pads:?}, window {window:?}, p {p}, \
                 cap {softcap:?}"
            );
            assert!(
                apart > 1e-2,
                "{case}: the sinks change the output by {apart:e}"
            );
            let inputs = [("q", qt), ("k", kt), ("v", vt)];
            super::super::op_test::assert_same_op(&fused, &reference, &inputs, 1e-5, &case);
            if p == 0.0 {
                let sinks = Tensor::from_slice(&sinks, h, &dev).unwrap();
                let mask = mask.unsqueeze(1).unwrap();
                let grouped = crate::models::fused::composed_attention(
                    qt,
                    kt,
                    vt,
                    scale,
                    &mask,
                    0.0,
                    softcap,
                    Some(&sinks),
                )
                .unwrap();
                let case = format!("{case}, fused::composed_attention");
                super::super::op_test::assert_same_op(&fused, &grouped, &inputs, 1e-5, &case);
            }
        }
        // One sink per query head, or an error.
        let q = Tensor::zeros((1, 4, 3, 2), candle_core::DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 2, 3, 2), candle_core::DType::F32, &dev).unwrap();
        let scores = super::ScoreScale {
            scale: 1.0,
            softcap: None,
            sinks: Some(sinks(2)),
        };
        let err = super::causal_attention(&q, &k, &k, scores, None, None, None).unwrap_err();
        assert!(err.to_string().contains("2 attention sinks"), "{err}");
        let mask = Tensor::zeros((3, 3), candle_core::DType::F32, &dev).unwrap();
        let two = Tensor::zeros(2, candle_core::DType::F32, &dev).unwrap();
        let composed =
            crate::models::fused::composed_attention(&q, &k, &k, 1.0, &mask, 0.0, None, Some(&two));
        assert!(composed.is_err());
    }

    /// `fused::composed_attention` with sinks (the reference above, and the path off
    /// the op) against the formula written out in f64, on f64 tensors with f32 sinks:
    /// `p_j = exp(z_j − m) / (Σ_k exp(z_k − m) + exp(sink_h − m))`,
    /// `m = max(max_j z_j, sink_h)`, `out = Σ_j p_j v_j`, for grouped-query heads under
    /// an additive mask with finite and infinite entries, one of its rows fully masked
    /// (its output 0, no NaN); and the gradients of q, k and v against central
    /// differences of the formula.
    #[test]
    fn composed_attention_with_sinks_is_the_formula() {
        let dev = Device::Cpu;
        let (b, h, g, t, kv, d) = (2, 4, 2, 3, 4, 3);
        let rep = h / g;
        let scale = 0.7;
        let sinks = [0.5f32, -1.25, 2.0, 0.25];
        let inf = f64::NEG_INFINITY;
        let mask = [
            [0.0, 0.0, inf, inf],
            [inf, inf, inf, inf],
            [0.0, -0.5, 0.0, 0.3],
        ];
        let numbers = |n: usize, seed: usize| -> Vec<f64> {
            (0..n)
                .map(|i| (((i * 37 + seed * 11) % 23) as f64 / 23.0 - 0.5) * 2.5)
                .collect()
        };
        let (qv, kv_, vv) = (
            numbers(b * h * t * d, 1),
            numbers(b * g * kv * d, 2),
            numbers(b * g * kv * d, 3),
        );
        // The formula, `(b, t, h · d)`.
        let formula = |q: &[f64], k: &[f64], v: &[f64]| -> Vec<f64> {
            let mut out = vec![0f64; b * t * h * d];
            for bi in 0..b {
                for hi in 0..h {
                    let gi = hi / rep;
                    let sink = f64::from(sinks[hi]);
                    for ti in 0..t {
                        let z: Vec<f64> = (0..kv)
                            .map(|j| {
                                let dot: f64 = (0..d)
                                    .map(|e| {
                                        q[((bi * h + hi) * t + ti) * d + e]
                                            * k[((bi * g + gi) * kv + j) * d + e]
                                    })
                                    .sum();
                                scale * dot + mask[ti][j]
                            })
                            .collect();
                        let m = z.iter().copied().fold(sink, f64::max);
                        let denom: f64 =
                            z.iter().map(|zj| (zj - m).exp()).sum::<f64>() + (sink - m).exp();
                        for e in 0..d {
                            out[(bi * t + ti) * h * d + hi * d + e] = (0..kv)
                                .map(|j| {
                                    (z[j] - m).exp() / denom * v[((bi * g + gi) * kv + j) * d + e]
                                })
                                .sum();
                        }
                    }
                }
            }
            out
        };
        let var = |x: &[f64], shape: (usize, usize, usize, usize)| {
            Var::from_tensor(&Tensor::from_slice(x, shape, &dev).unwrap()).unwrap()
        };
        let q = var(&qv, (b, h, t, d));
        let k = var(&kv_, (b, g, kv, d));
        let v = var(&vv, (b, g, kv, d));
        let mask_t = Tensor::from_iter(mask.iter().flatten().copied(), &dev)
            .unwrap()
            .reshape((t, kv))
            .unwrap();
        let sinks_t = Tensor::from_slice(&sinks, h, &dev).unwrap();
        let out = crate::models::fused::composed_attention(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            scale,
            &mask_t,
            0.0,
            None,
            Some(&sinks_t),
        )
        .unwrap();
        assert_eq!(out.dims(), [b, t, h * d]);
        let got: Vec<f64> = out.flatten_all().unwrap().to_vec1().unwrap();
        let want = formula(&qv, &kv_, &vv);
        for (i, (x, y)) in got.iter().zip(&want).enumerate() {
            assert!(
                (x - y).abs() < 1e-12,
                "out[{i}]: {x} against the formula's {y}"
            );
        }
        // The fully masked query row (slot 1) reads nothing.
        for bi in 0..b {
            let row = &got[(bi * t + 1) * h * d..(bi * t + 2) * h * d];
            assert!(row.iter().all(|&x| x == 0.0), "{row:?}");
        }
        // Gradients of `Σ out ⊙ u` against central differences of the formula.
        let u = numbers(b * t * h * d, 4);
        let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
            formula(q, k, v).iter().zip(&u).map(|(o, u)| o * u).sum()
        };
        let u_t = Tensor::from_slice(&u, (b, t, h * d), &dev).unwrap();
        let grads = (out * u_t).unwrap().sum_all().unwrap().backward().unwrap();
        let eps = 1e-6;
        for (name, which) in [("q", 0), ("k", 1), ("v", 2)] {
            let x = [&q, &k, &v][which];
            let got: Vec<f64> = grads
                .get(x.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let base = [&qv, &kv_, &vv][which];
            for i in 0..base.len() {
                let at = |shift: f64| {
                    let mut inputs = [qv.clone(), kv_.clone(), vv.clone()];
                    inputs[which][i] += shift;
                    loss(&inputs[0], &inputs[1], &inputs[2])
                };
                let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
                assert!(got[i].is_finite(), "d{name}[{i}] is {}", got[i]);
                assert!(
                    (got[i] - numeric).abs() < 1e-6,
                    "d{name}[{i}]: {} against central differences' {numeric}",
                    got[i]
                );
            }
        }
    }

    /// The reference for a key mask: [`composed_with`], an additive mask of f32's most
    /// negative value per masked key (transformers' BERT) and `dropout`'s choices.
    fn key_masked_composed(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        visible: &[bool],
        dropout: Option<&super::Dropout>,
    ) -> Tensor {
        let b = q.dim(0).unwrap();
        let kv = k.dim(2).unwrap();
        let mask: Vec<f32> = visible
            .iter()
            .map(|&seen| if seen { 0.0 } else { f32::MIN })
            .collect();
        let mask = Tensor::from_vec(mask, (b, 1, 1, kv), &Device::Cpu).unwrap();
        composed_with(q, k, v, scale, &mask, keep(q, kv, dropout))
    }

    /// Under a key mask, with and without dropout: the value and the gradients of q, k
    /// and v equal the composed ops with the same mask and the same dropped entries. No
    /// padding, trailing padding (skipped keys), masked keys inside the span, more keys
    /// than queries, grouped-query heads, several blocks of query rows.
    #[test]
    fn key_masked_equals_the_composed_attention() {
        let dev = Device::Cpu;
        // (b, h, g, t, kv, the batch elements' visible keys as (first, end) runs, dropout).
        type Case = (
            usize,
            usize,
            usize,
            usize,
            usize,
            [&'static [(usize, usize)]; 2],
            f32,
        );
        let cases: [Case; 6] = [
            (2, 4, 2, 5, 5, [&[(0, 5)], &[(0, 5)]], 0.0),
            (2, 2, 2, 7, 7, [&[(0, 7)], &[(0, 3)]], 0.0),
            (2, 3, 1, 6, 6, [&[(0, 2), (4, 5)], &[(1, 6)]], 0.0),
            (2, 2, 2, 3, 9, [&[(0, 9)], &[(2, 4), (6, 8)]], 0.0),
            (2, 4, 2, 130, 130, [&[(0, 100)], &[(0, 130)]], 0.0),
            (2, 4, 2, 70, 70, [&[(0, 50), (60, 65)], &[(0, 70)]], 0.3),
        ];
        for (b, h, g, t, kv, runs, p) in cases {
            let d = 4;
            let var = |shape: (usize, usize, usize, usize)| {
                Var::from_tensor(&Tensor::randn(0f32, 1., shape, &dev).unwrap()).unwrap()
            };
            let (q, k, v) = (var((b, h, t, d)), var((b, g, kv, d)), var((b, g, kv, d)));
            let visible: Vec<bool> = runs
                .iter()
                .flat_map(|row| (0..kv).map(|j| row.iter().any(|&(lo, hi)| (lo..hi).contains(&j))))
                .collect();
            let scale = 1.0 / (d as f64).sqrt();
            let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
            let keys = super::KeyMask::new(visible.clone(), kv).unwrap();
            let dropout = (p > 0.0).then(|| super::Dropout::with_seed(p, 99));
            let fused = super::key_masked_attention(qt, kt, vt, scale, keys, dropout).unwrap();
            let reference = key_masked_composed(qt, kt, vt, scale, &visible, dropout.as_ref());
            let case = format!("b {b}, h {h}, g {g}, t {t}, kv {kv}, runs {runs:?}, p {p}");
            let inputs = [("q", qt), ("k", kt), ("v", vt)];
            super::super::op_test::assert_same_op(&fused, &reference, &inputs, 1e-5, &case);
        }
    }

    /// A batch element that sees no key has no key mask (the caller takes the composed
    /// path); ends are one past the last visible key.
    #[test]
    fn a_key_mask_needs_a_visible_key_per_batch_element() {
        assert!(super::KeyMask::new(vec![true, false, false, false], 2).is_none());
        assert!(super::KeyMask::new(vec![true, false, true], 2).is_none());
        let mask = super::KeyMask::new(vec![true, false, false, true, false, false], 3).unwrap();
        assert_eq!(mask.ends, [1, 1]);
    }

    /// Keys and values read in place from buffers with room past them (a KV cache's),
    /// one batch element or several, one key/value head or several: the same values and
    /// gradients (through the buffers) as contiguous copies.
    #[test]
    fn reads_a_caches_buffers_in_place() {
        let dev = Device::Cpu;
        for (b, h, g, t, kv, capacity) in [
            (1, 4, 2, 1, 9, 16),
            (2, 4, 2, 3, 7, 12),
            (2, 2, 1, 1, 5, 8),
            (1, 3, 3, 2, 6, 6),
        ] {
            let d = 4;
            let var = |shape: (usize, usize, usize, usize)| {
                Var::from_tensor(&Tensor::randn(0f32, 1., shape, &dev).unwrap()).unwrap()
            };
            let q = var((b, h, t, d));
            let (k_buf, v_buf) = (var((b, g, capacity, d)), var((b, g, capacity, d)));
            let k = k_buf.as_tensor().narrow(2, 0, kv).unwrap();
            let v = v_buf.as_tensor().narrow(2, 0, kv).unwrap();
            assert!(super::head_stride(k.layout()) == Some(capacity));
            let scale = 0.5;
            let fused =
                super::causal_attention(q.as_tensor(), &k, &v, scale, None, None, None).unwrap();
            let reference = composed(
                q.as_tensor(),
                &k.contiguous().unwrap(),
                &v.contiguous().unwrap(),
                scale,
                None,
            );
            let case = format!("b {b}, h {h}, g {g}, t {t}, kv {kv} of {capacity}");
            let inputs = [
                ("q", q.as_tensor()),
                ("k buffer", k_buf.as_tensor()),
                ("v buffer", v_buf.as_tensor()),
            ];
            super::super::op_test::assert_same_op(&fused, &reference, &inputs, 1e-5, &case);
        }
    }
}
