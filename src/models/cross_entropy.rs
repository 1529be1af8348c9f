//! A fused, weighted cross-entropy for the CPU: per row `w · (logsumexp(z) − z[t])` in one
//! pass over the logits, and a backward `g · w · (softmax(z) − onehot(t))` in one more
//! (the forward keeps each row's `max + logsumexp`, so the backward takes one exponential
//! per logit), where candle's composed log-softmax + gather takes about ten full-size
//! passes each way.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Per-row weighted cross-entropy of `logits` `(rows, vocab)` f32 (or `(…, vocab)`, its
/// leading dimensions the rows in order) at `targets` `(rows,)` u32 with `weights`
/// `(rows,)` f32: `(rows,)` f32, differentiable in `logits`. Only the CPU
/// runs it (the caller falls back to composed ops elsewhere). Rows with weight 0 are
/// skipped, so their targets may be anything.
pub(crate) fn weighted_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
) -> candle_core::Result<Tensor> {
    logits.contiguous()?.apply_op3(
        &targets.contiguous()?,
        &weights.contiguous()?,
        CrossEntropy::default(),
    )
}

#[derive(Default)]
struct CrossEntropy {
    /// Each row's `max + log Σ exp(z − max)` from the forward (0 for weight-0 rows), for
    /// the backward.
    shifts: Mutex<Option<Arc<Vec<f32>>>>,
}

/// The gradient of [`CrossEntropy`] (no backward of its own).
struct CrossEntropyGrad {
    /// The forward's per-row shifts (`None`: recomputed from the logits).
    shifts: Option<Arc<Vec<f32>>>,
}

/// A contiguous f32/u32 slice of a storage, or an error naming the op.
fn contiguous<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    let data = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((start, end)) => match data.get(start..end) {
            Some(d) => Ok(d),
            None => candle_core::bail!("cross-entropy: {what} out of its storage"),
        },
        None => candle_core::bail!("cross-entropy: {what} must be contiguous"),
    }
}

/// The op's three inputs as slices: logits `(rows, vocab)` f32, targets `(rows,)` u32 and
/// per-row weights `(rows,)` f32, with `(rows, vocab)`.
type Inputs<'a> = (&'a [f32], &'a [u32], &'a [f32], usize, usize);

fn inputs<'a>(
    (s1, l1): (&'a CpuStorage, &Layout),
    (s2, l2): (&'a CpuStorage, &Layout),
    (s3, l3): (&'a CpuStorage, &Layout),
) -> candle_core::Result<Inputs<'a>> {
    let (rows, vocab) = dims(l1, l2, l3)?;
    Ok((
        contiguous::<f32>(s1, l1, "logits")?,
        contiguous::<u32>(s2, l2, "targets")?,
        contiguous::<f32>(s3, l3, "weights")?,
        rows,
        vocab,
    ))
}

/// `(rows, vocab)` of the logits (every dimension but the last makes the rows), checked
/// against the targets and weights.
fn dims(l1: &Layout, l2: &Layout, l3: &Layout) -> candle_core::Result<(usize, usize)> {
    let vocab = match l1.shape().dims() {
        [_, .., vocab] => *vocab,
        _ => 0,
    };
    let rows = l1.shape().elem_count() / vocab.max(1);
    if vocab == 0 || l2.shape().dims() != [rows] || l3.shape().dims() != [rows] {
        candle_core::bail!(
            "cross-entropy: logits {:?}, targets {:?}, weights {:?}",
            l1.shape().dims(),
            l2.shape().dims(),
            l3.shape().dims()
        );
    }
    Ok((rows, vocab))
}

/// `(max, log Σ exp(z − max))` of one row.
#[inline(always)]
pub(super) fn log_sum_exp(row: &[f32]) -> (f32, f32) {
    let max = crate::kernels::vector_math::max(row);
    (max, crate::kernels::vector_math::sum_exp(row, max).ln())
}

impl CustomOp3 for CrossEntropy {
    fn name(&self) -> &'static str {
        "lorakit-cross-entropy"
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
        let (logits, targets, weights, rows, vocab) = inputs((s1, l1), (s2, l2), (s3, l3))?;
        let (out, shifts): (Vec<f32>, Vec<f32>) = logits
            .par_chunks(vocab.max(1))
            .zip(targets.par_iter().zip(weights.par_iter()))
            .map(|(row, (&t, &w))| {
                if w == 0.0 {
                    return (0.0, 0.0);
                }
                let (max, lse) = crate::kernels::vector_math::on_widest_vectors(
                    #[inline(always)]
                    || log_sum_exp(row),
                );
                let picked = row.get(t as usize).copied().unwrap_or(f32::NAN);
                (w * (max + lse - picked), max + lse)
            })
            .unzip();
        if let Ok(mut slot) = self.shifts.lock() {
            *slot = Some(Arc::new(shifts));
        }
        Ok((CpuStorage::F32(out), Shape::from(rows)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        weights: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let scale = (weights * grad.to_dtype(DType::F32)?)?.contiguous()?;
        let shifts = self.shifts.lock().ok().and_then(|slot| slot.clone());
        let g = logits.apply_op3_no_bwd(targets, &scale, &CrossEntropyGrad { shifts })?;
        Ok((Some(g), None, None))
    }
}

impl CustomOp3 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "lorakit-cross-entropy-grad"
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
        let (logits, targets, scales, rows, vocab) = inputs((s1, l1), (s2, l2), (s3, l3))?;
        let saved = self.shifts.as_deref().filter(|s| s.len() == rows);
        let mut out = vec![0f32; rows * vocab];
        out.par_chunks_mut(vocab.max(1))
            .zip(logits.par_chunks(vocab.max(1)))
            .zip(targets.par_iter().zip(scales.par_iter()))
            .enumerate()
            .for_each(|(i, ((dst, row), (&t, &s)))| {
                if s == 0.0 {
                    return;
                }
                crate::kernels::vector_math::on_widest_vectors(
                    #[inline(always)]
                    || {
                        let shift = match saved.and_then(|v| v.get(i)) {
                            Some(&shift) => shift,
                            None => {
                                let (max, lse) = log_sum_exp(row);
                                max + lse
                            }
                        };
                        crate::kernels::vector_math::exp_into(dst, row, shift, s);
                    },
                );
                if let Some(d) = dst.get_mut(t as usize) {
                    *d -= s;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}
