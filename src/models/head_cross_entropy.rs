//! A frozen output head and the cross-entropy loss as one CPU op: per row
//! `w · (logsumexp(z) − z[t])` with logits `z = h Wᵀ + b`, over blocks of rows, so that only
//! one block's logits exist at a time.
//!
//! When a gradient flows into the hidden states `h`, the same pass computes the head's input
//! gradient for an upstream gradient of 1, `w · (softmax(z) − onehot(t)) W` per row: each
//! block's logits turn into their gradient in place and one product gives the block's rows.
//! The backward then only scales those rows by the upstream gradient (each row's loss is
//! linear in it). Against the head's op followed by [`super::cross_entropy`], this never
//! stores a batch's logits (`rows × vocab`: 32 MB at 1,024 tokens of a 8,000-token
//! vocabulary) nor their gradient, reads each block's logits right after the product wrote
//! them, and leaves candle's autograd one `rows × d` tensor to accumulate instead of two
//! `rows × vocab` ones. The weight gets no gradient: the op is for a frozen head (the
//! caller falls back to the logits and the loss otherwise). With Gemma 2's soft-cap the
//! logits become `cap · tanh(z / cap)` before the loss, and each row's gradient is
//! multiplied by the cap's slopes `1 − tanh²` before the product.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::cpu_op::f32_input;
use super::cross_entropy::log_sum_exp;
use crate::kernels::vector_math::{on_widest_vectors, scaled_exp_in_place, soft_cap_in_place};
use crate::kernels::{mat_of_layout, product_into, Accum, MatRef};

const OP: &str = "head cross-entropy";

/// Logits held at once: the rows of a block times the vocabulary, at most this many bytes
/// (and at least one row). A bound on the op's memory, not a speed setting: blocks of a
/// few hundred rows keep the products' efficiency at the vocabularies of today's models.
const BLOCK_BYTES: usize = 16 << 20;

/// Per-row weighted cross-entropy of the logits `hidden Wᵀ + bias` at `targets`:
/// `hidden` `(rows, d)` f32, `weight` `(vocab, d)` f32 (any strides), `bias` `(vocab,)`,
/// `targets` and `weights` one per row (rows of weight 0 are skipped: their target is never
/// read), the logits soft-capped at `softcap` first when given. Returns `(rows,)` f32,
/// differentiable in `hidden` only. CPU only.
pub(crate) fn head_cross_entropy(
    hidden: &Tensor,
    (weight, bias, softcap): (&Tensor, Option<&Tensor>, Option<f32>),
    targets: Vec<u32>,
    weights: Vec<f32>,
) -> candle_core::Result<Tensor> {
    with_blocks(hidden, (weight, bias, softcap), targets, weights, None)
}

/// [`head_cross_entropy`] with `block_rows` rows per block (`None`: as many as
/// [`BLOCK_BYTES`] of logits hold).
fn with_blocks(
    hidden: &Tensor,
    (weight, bias, softcap): (&Tensor, Option<&Tensor>, Option<f32>),
    targets: Vec<u32>,
    weights: Vec<f32>,
    block_rows: Option<usize>,
) -> candle_core::Result<Tensor> {
    let op = HeadCrossEntropy {
        weight: weight.clone(),
        bias: bias
            .map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>())
            .transpose()?,
        softcap,
        targets,
        weights,
        wants_grad: hidden.track_op(),
        block_rows,
        unit_grad: Mutex::new(None),
    };
    hidden.contiguous()?.apply_op1(op)
}

struct HeadCrossEntropy {
    weight: Tensor,
    bias: Option<Vec<f32>>,
    /// Gemma 2's soft-cap of the logits.
    softcap: Option<f32>,
    targets: Vec<u32>,
    weights: Vec<f32>,
    /// Whether the forward computes the input gradient (a gradient flows into `hidden`).
    wants_grad: bool,
    /// Rows per block (`None`: [`BLOCK_BYTES`] of logits).
    block_rows: Option<usize>,
    /// `∂ loss_r / ∂ hidden_r` for each row `r`, `(rows, d)`, from the forward.
    unit_grad: Mutex<Option<Arc<Vec<f32>>>>,
}

/// The weight's f32 CPU storage as a `(vocab, d)` view, for `f`.
fn with_weight<R>(
    weight: &Tensor,
    f: impl FnOnce(MatRef<f32>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = weight.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        candle_core::bail!(
            "{OP}: the weight must be an f32 CPU tensor, got {:?}",
            weight.dtype()
        )
    };
    f(mat_of_layout(data, layout)?)
}

impl HeadCrossEntropy {
    /// The losses and, if wanted, the unit gradient, for `hidden` `(rows, d)`.
    fn run(
        &self,
        hidden: &[f32],
        rows: usize,
        d: usize,
        w: MatRef<f32>,
        bias: Option<&[f32]>,
    ) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
        let vocab = w.rows();
        if w.t().rows() != d || bias.is_some_and(|b| b.len() != vocab) {
            candle_core::bail!(
                "{OP}: hidden size {d} against a {vocab} × {} weight and a bias of {:?}",
                w.t().rows(),
                bias.map(<[f32]>::len)
            );
        }
        if self.targets.len() != rows || self.weights.len() != rows {
            candle_core::bail!(
                "{OP}: {rows} rows against {} targets and {} weights",
                self.targets.len(),
                self.weights.len()
            );
        }
        if d == 0 || vocab == 0 {
            candle_core::bail!("{OP}: empty hidden size {d} or vocabulary {vocab}");
        }
        let block = self.block_rows.unwrap_or(BLOCK_BYTES / (vocab * 4));
        let block = block.clamp(1, rows.max(1));
        let mut losses = vec![0f32; rows];
        let mut unit = vec![0f32; if self.wants_grad { rows * d } else { 0 }];
        // One chunk per block when a gradient is wanted, none otherwise.
        let mut unit_blocks = unit.chunks_mut(block * d);
        let mut logits = vec![0f32; block.min(rows) * vocab];
        // The soft-cap's slopes of a block's logits (none without a cap).
        let mut slopes = vec![
            0f32;
            if self.softcap.is_some() {
                logits.len()
            } else {
                0
            }
        ];
        let blocks = hidden
            .chunks(block * d)
            .zip(losses.chunks_mut(block))
            .zip(self.targets.chunks(block).zip(self.weights.chunks(block)));
        for ((h, losses), (targets, weights)) in blocks {
            let n = losses.len();
            let z = logits.get_mut(..n * vocab).unwrap_or_default();
            product_into(
                z,
                vocab,
                MatRef::contiguous(h, n, d)?,
                w.t(),
                Accum::Replace,
            )?;
            let rows_of = z
                .par_chunks_mut(vocab)
                .zip(losses.par_iter_mut())
                .zip(targets.par_iter().zip(weights.par_iter()));
            let one = |row: &mut [f32], loss: &mut f32, t: u32, wt: f32, slopes| {
                *loss = on_widest_vectors(
                    #[inline(always)]
                    || self.row(row, slopes, bias, (t, wt)),
                );
            };
            if self.softcap.is_some() {
                rows_of
                    .zip(slopes.par_chunks_mut(vocab))
                    .for_each(|(((row, loss), (&t, &wt)), s)| one(row, loss, t, wt, Some(s)));
            } else {
                rows_of.for_each(|((row, loss), (&t, &wt))| one(row, loss, t, wt, None));
            }
            if let Some(dst) = unit_blocks.next() {
                let p = MatRef::contiguous(z, n, vocab)?;
                product_into(dst, d, p, w, Accum::Replace)?;
            }
        }
        Ok((losses, unit))
    }

    /// One row's loss from its logits `row`; with a gradient wanted, the row becomes
    /// `∂ loss / ∂ z = wt · (softmax(z) − onehot(t))` (zero for a row of weight 0), times the
    /// soft-cap's slopes (kept in `slopes`) when the logits are capped.
    #[inline(always)]
    fn row(
        &self,
        row: &mut [f32],
        mut slopes: Option<&mut [f32]>,
        bias: Option<&[f32]>,
        (t, wt): (u32, f32),
    ) -> f32 {
        if wt == 0.0 {
            if self.wants_grad {
                row.fill(0.0);
            }
            return 0.0;
        }
        if let Some(bias) = bias {
            row.iter_mut().zip(bias).for_each(|(z, b)| *z += b);
        }
        if let (Some(cap), Some(slopes)) = (self.softcap, slopes.as_deref_mut()) {
            soft_cap_in_place(row, slopes, cap);
        }
        let (max, lse) = log_sum_exp(row);
        let shift = max + lse;
        let picked = row.get(t as usize).copied().unwrap_or(f32::NAN);
        if self.wants_grad {
            scaled_exp_in_place(row, shift, wt);
            if let Some(g) = row.get_mut(t as usize) {
                *g -= wt;
            }
            if let Some(slopes) = slopes {
                row.iter_mut().zip(slopes.iter()).for_each(|(g, s)| *g *= s);
            }
        }
        wt * (shift - picked)
    }
}

impl CustomOp1 for HeadCrossEntropy {
    fn name(&self) -> &'static str {
        "lorakit-head-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, d) = l.shape().dims2()?;
        let hidden = f32_input(OP, s, l)?;
        let bias = self.bias.as_deref();
        let (losses, unit) = with_weight(&self.weight, |w| self.run(hidden, rows, d, w, bias))?;
        if self.wants_grad {
            *self.unit_grad.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(unit));
        }
        Ok((CpuStorage::F32(losses), Shape::from(rows)))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let unit = self
            .unit_grad
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(unit) = unit else {
            candle_core::bail!("{OP}: the forward computed no gradient (none was tracked)")
        };
        let (rows, d) = hidden.dims2()?;
        let scales = grad.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        if scales.len() != rows || unit.len() != rows * d {
            candle_core::bail!("{OP}: a gradient of {} rows for {rows}", scales.len());
        }
        let mut dx = vec![0f32; rows * d];
        dx.par_chunks_mut(d.max(1))
            .zip(unit.par_chunks(d.max(1)).zip(scales.par_iter()))
            .for_each(|(dst, (src, &g))| {
                on_widest_vectors(
                    #[inline(always)]
                    || dst.iter_mut().zip(src).for_each(|(o, &u)| *o = g * u),
                )
            });
        Ok(Some(Tensor::from_vec(dx, (rows, d), hidden.device())?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    /// The reference: logits by candle's matmul (soft-capped by candle's `tanh` when `cap`
    /// is given), then candle's composed log-softmax, each row's picked log-probability times
    /// its weight.
    fn composed(
        h: &Tensor,
        (w, b, cap): (&Tensor, Option<&Tensor>, Option<f32>),
        t: &[u32],
        wt: &[f32],
    ) -> Tensor {
        let mut z = crate::matmul::matmul(h, &w.t().unwrap()).unwrap();
        if let Some(b) = b {
            z = z.broadcast_add(b).unwrap();
        }
        if let Some(cap) = cap {
            let cap = f64::from(cap);
            z = ((z / cap).unwrap().tanh().unwrap() * cap).unwrap();
        }
        let log_p = candle_nn::ops::log_softmax(&z, 1).unwrap();
        let dev = h.device();
        let t = Tensor::new(t, dev).unwrap().unsqueeze(1).unwrap();
        let picked = log_p.gather(&t, 1).unwrap().squeeze(1).unwrap();
        (picked * Tensor::new(wt, dev).unwrap())
            .unwrap()
            .neg()
            .unwrap()
    }

    /// Losses and the hidden states' gradient (under a non-uniform upstream gradient) equal
    /// the composed reference: with and without a bias, rows of weight 0 (whose targets are
    /// out of range, never read), one block, several blocks with a ragged last one, a
    /// weight read through transposed strides (a `Conv1D`-stored head), soft-capped logits
    /// (Gemma 2), and without a gradient (evaluation).
    #[test]
    fn equals_the_composed_head_and_loss() {
        let dev = Device::Cpu;
        let (rows, d, vocab) = (13, 24, 37);
        let h = Var::from_tensor(&Tensor::randn(0f32, 1., (rows, d), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 0.5, (vocab, d), &dev).unwrap();
        let w_in_out = w.t().unwrap().contiguous().unwrap().t().unwrap();
        let bias = Tensor::randn(0f32, 1., vocab, &dev).unwrap();
        let targets: Vec<u32> = (0..rows as u32)
            .map(|r| (r * 7 + 3) % vocab as u32)
            .collect();
        let mut weights: Vec<f32> = (0..rows).map(|r| 0.5 + (r % 3) as f32).collect();
        weights[4] = 0.0;
        weights[rows - 1] = 0.0;
        let mut unread = targets.clone();
        unread[4] = u32::MAX;
        unread[rows - 1] = vocab as u32;
        let upstream = Tensor::randn(0f32, 1., rows, &dev).unwrap();
        for (weight, b, blocks, cap) in [
            (&w, None, None, None),
            (&w, Some(&bias), Some(1), None),
            (&w, Some(&bias), Some(5), None),
            (&w_in_out, None, Some(4), None),
            // Logits of size ~3 against a cap of 2: most are bent.
            (&w, Some(&bias), Some(5), Some(2.0)),
            (&w_in_out, None, None, Some(2.0)),
        ] {
            let head = (weight, b, cap);
            let want = composed(h.as_tensor(), head, &targets, &weights);
            if cap.is_some() {
                let uncapped = composed(h.as_tensor(), (weight, b, None), &targets, &weights);
                let apart = (&want - &uncapped).unwrap().abs().unwrap();
                assert!(apart.max_all().unwrap().to_scalar::<f32>().unwrap() > 1e-2);
            }
            let got =
                super::with_blocks(h.as_tensor(), head, unread.clone(), weights.clone(), blocks)
                    .unwrap();
            let (want_v, got_v) = (
                want.to_vec1::<f32>().unwrap(),
                got.to_vec1::<f32>().unwrap(),
            );
            for (r, (a, g)) in want_v.iter().zip(&got_v).enumerate() {
                assert!(
                    (a - g).abs() <= 1e-5 * a.abs().max(1.0),
                    "row {r}: {g} vs {a} ({blocks:?}, cap {cap:?})"
                );
            }
            let grad = |loss: &Tensor| {
                let grads = (loss * &upstream)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                grads
                    .get(h.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            let (want_g, got_g) = (grad(&want), grad(&got));
            let scale = want_g.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (i, (a, g)) in want_g.iter().zip(&got_g).enumerate() {
                assert!(
                    (a - g).abs() <= 1e-5 * scale,
                    "grad {i}: {g} vs {a} ({blocks:?}, cap {cap:?})"
                );
            }
            let detached = h.as_tensor().detach();
            let eval = super::with_blocks(&detached, head, unread.clone(), weights.clone(), blocks)
                .unwrap();
            assert_eq!(eval.to_vec1::<f32>().unwrap(), got_v);
        }
    }

    /// Shapes that do not fit are errors naming the op, not panics.
    #[test]
    fn mismatched_shapes_are_errors() {
        let dev = Device::Cpu;
        let h = Tensor::zeros((3, 4), candle_core::DType::F32, &dev).unwrap();
        let w = Tensor::zeros((5, 6), candle_core::DType::F32, &dev).unwrap();
        let err =
            super::head_cross_entropy(&h, (&w, None, None), vec![0; 3], vec![1.0; 3]).unwrap_err();
        assert!(err.to_string().contains("head cross-entropy"), "{err}");
        let w = Tensor::zeros((5, 4), candle_core::DType::F32, &dev).unwrap();
        let err =
            super::head_cross_entropy(&h, (&w, None, None), vec![0; 2], vec![1.0; 3]).unwrap_err();
        assert!(
            err.to_string().contains("3 rows against 2 targets"),
            "{err}"
        );
    }
}
