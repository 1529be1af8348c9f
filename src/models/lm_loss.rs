//! The causal language-modelling loss with a per-token mask (prompt tokens and padding
//! masked out).

use candle_core::{DType, Module, Tensor, D};

use super::cross_entropy::weighted_cross_entropy;
use super::head_cross_entropy::head_cross_entropy;
use crate::error::{Error, Result};
use crate::model::Linear;

/// The summed next-token cross-entropy of a batch: for every row `b` and position `t ≥ 1`
/// with `loss_mask[b, t] = 1`, `−log softmax(logits[b, t − 1])[input_ids[b, t]]`.
///
/// `logits` is `(batch, seq, vocab)`, `input_ids` `(batch, seq)` and `loss_mask`
/// `(batch, seq)` (1 where token `t` is a prediction target, as
/// [`Batch`](crate::finetune::Batch) builds it), computed in f32. On the CPU a fused kernel
/// computes it in one pass over the logits and its gradient in one more; elsewhere
/// [`causal_lm_loss_sum_composed`] runs. Dividing the sum by the number
/// of target tokens of the whole optimizer step (all accumulated micro-batches) gives the
/// mean loss per target token, as transformers' `Trainer` computes it.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use lorakit::finetune::loss::causal_lm_loss_sum;
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// // Uniform logits over 4 tokens: each counted target costs ln 4.
/// let logits = Tensor::zeros((1, 3, 4), candle_core::DType::F32, &dev)?;
/// let ids = Tensor::new(&[[0u32, 1, 2]], &dev)?;
/// let mask = Tensor::new(&[[0f32, 0., 1.]], &dev)?; // only token 2 is a target
/// let loss = causal_lm_loss_sum(&logits, &ids, &mask)?.to_scalar::<f32>()?;
/// assert!((loss - 4f32.ln()).abs() < 1e-6);
/// # Ok(()) }
/// ```
pub fn causal_lm_loss_sum(
    logits: &Tensor,
    input_ids: &Tensor,
    loss_mask: &Tensor,
) -> Result<Tensor> {
    let (_, seq) = check(logits, input_ids, loss_mask)?;
    if seq < 2 {
        return Ok(Tensor::zeros((), DType::F32, logits.device())?);
    }
    if logits.device().is_cpu() {
        // The fused op reads the logits where they are (no shifted copy, so no copy in
        // the backward either).
        let (targets, weights) = next_tokens(input_ids, loss_mask)?;
        let per_row = weighted_cross_entropy(&logits.to_dtype(DType::F32)?, &targets, &weights)?;
        return Ok(per_row.sum_all()?);
    }
    let Some(Shifted {
        predicted,
        targets,
        mask,
    }) = shift(logits, input_ids, loss_mask)?
    else {
        return Ok(Tensor::zeros((), DType::F32, logits.device())?);
    };
    composed(&predicted, &targets, &mask)
}

/// [`causal_lm_loss_sum`] of the logits `hidden Wᵀ + bias` of a frozen output head, in one
/// op that never stores the logits ([`super::head_cross_entropy`]), for `hidden`
/// `(batch, seq, d)` on the CPU in f32 with a float head that takes no gradient. `None`
/// when the op does not apply (another device or dtype, a head that trains): the caller
/// computes the logits and [`causal_lm_loss_sum`] instead.
pub(crate) fn frozen_head_loss_sum(
    hidden: &Tensor,
    (weight, bias, softcap): (&Tensor, Option<&Tensor>, Option<f64>),
    input_ids: &Tensor,
    loss_mask: &Tensor,
) -> Result<Option<Tensor>> {
    let frozen = |t: &Tensor| !t.track_op() && t.device().is_cpu() && t.dtype() == DType::F32;
    let applies = hidden.device().is_cpu()
        && hidden.dtype() == DType::F32
        && frozen(weight)
        && bias.is_none_or(frozen);
    if !applies {
        return Ok(None);
    }
    let (batch, seq, d) = hidden
        .dims3()
        .map_err(|_| shape_error("hidden states", hidden))?;
    check_ids(batch, seq, input_ids, loss_mask)?;
    if seq < 2 {
        return Ok(Some(Tensor::zeros((), DType::F32, hidden.device())?));
    }
    let (targets, weights) = next_tokens(input_ids, loss_mask)?;
    let per_row = head_cross_entropy(
        &hidden.reshape((batch * seq, d))?,
        (weight, bias, softcap.map(|cap| cap as f32)),
        targets.to_vec1::<u32>()?,
        weights.to_vec1::<f32>()?,
    )?;
    Ok(Some(per_row.sum_all()?))
}

/// [`causal_lm_loss_sum`] of the logits of the output head `head` on the hidden states
/// `hidden` `(batch, seq, d)`: what a model built with [`crate::model::linear`] calls for
/// its loss. With a frozen float head on the CPU in f32, the head and the cross-entropy
/// run as one op over blocks of positions (the logits `(batch · seq, vocab)` are never
/// stored, and when a gradient flows the head's input gradient is computed in the same
/// pass); an adapted, trained or quantized head, another device or dtype computes the
/// logits and the loss. The result is the same either way (to float rounding).
///
/// ```
/// use candle_core::{DType, Device, Tensor, Var};
/// use lorakit::finetune::loss::{causal_lm_loss_sum, linear_head_loss_sum};
/// use lorakit::model::Linear;
/// use lorakit::FrozenLinear;
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// let head = Linear::Frozen(FrozenLinear::new(Tensor::randn(0f32, 0.1, (50, 8), &dev)?, None)?);
/// let hidden = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, 8), &dev)?)?;
/// let ids = Tensor::new(&[[1u32, 7, 3, 9, 4], [2, 2, 8, 0, 5]], &dev)?;
/// let mask = Tensor::ones((2, 5), DType::F32, &dev)?;
/// let fused = linear_head_loss_sum(hidden.as_tensor(), &head, &ids, &mask)?;
/// let logits = candle_core::Module::forward(&head, hidden.as_tensor())?;
/// let composed = causal_lm_loss_sum(&logits, &ids, &mask)?;
/// let (a, b) = (fused.to_scalar::<f32>()?, composed.to_scalar::<f32>()?);
/// assert!((a - b).abs() < 1e-5 * b.abs());
/// // The hidden states' gradient flows through the fused op.
/// assert!(fused.backward()?.get(hidden.as_tensor()).is_some());
/// # Ok(()) }
/// ```
pub fn linear_head_loss_sum(
    hidden: &Tensor,
    head: &Linear,
    input_ids: &Tensor,
    loss_mask: &Tensor,
) -> Result<Tensor> {
    capped_head_loss_sum(hidden, (head, None), input_ids, loss_mask)
}

/// [`linear_head_loss_sum`] with the logits soft-capped at `softcap` (`cap · tanh(z / cap)`,
/// Gemma 2's `final_logit_softcapping`) before the loss; in the fused op too.
pub(crate) fn capped_head_loss_sum(
    hidden: &Tensor,
    (head, softcap): (&Linear, Option<f64>),
    input_ids: &Tensor,
    loss_mask: &Tensor,
) -> Result<Tensor> {
    if let Linear::Frozen(f) = head {
        if !f.is_quantized() {
            let parts = (f.weight(), f.bias(), softcap);
            let fused = frozen_head_loss_sum(hidden, parts, input_ids, loss_mask)?;
            if let Some(loss) = fused {
                return Ok(loss);
            }
        }
    }
    let mut logits = head.forward(hidden)?;
    if let Some(cap) = softcap {
        logits = super::fused::soft_cap(&logits, cap)?;
    }
    causal_lm_loss_sum(&logits, input_ids, loss_mask)
}

/// Each position's next token and its weight, `(batch · seq,)` u32 and f32: row `(b, t)`
/// predicts token `t + 1` with weight `loss_mask[b, t + 1]`, and each sequence's last row
/// gets weight 0 (its dummy target is never read). Needs `seq ≥ 2`.
fn next_tokens(input_ids: &Tensor, loss_mask: &Tensor) -> Result<(Tensor, Tensor)> {
    let (batch, seq) = input_ids.dims2()?;
    let next = |t: &Tensor, dtype: DType| -> Result<Tensor> {
        let tail = Tensor::zeros((batch, 1), dtype, t.device())?;
        let shifted = t.narrow(1, 1, seq - 1)?.to_dtype(dtype)?;
        Ok(Tensor::cat(&[&shifted, &tail], 1)?.reshape(batch * seq)?)
    };
    Ok((next(input_ids, DType::U32)?, next(loss_mask, DType::F32)?))
}

/// [`causal_lm_loss_sum`] by candle's composed ops (log-softmax, gather): what devices
/// other than the CPU run, and the reference the fused CPU kernel is tested against.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use lorakit::finetune::loss::{causal_lm_loss_sum, causal_lm_loss_sum_composed};
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// let logits = Tensor::randn(0f32, 3., (2, 5, 11), &dev)?;
/// let ids = Tensor::new(&[[1u32, 2, 3, 4, 5], [6, 7, 8, 9, 10]], &dev)?;
/// let mask = Tensor::new(&[[0f32, 1., 1., 0., 1.], [1., 1., 1., 1., 0.]], &dev)?;
/// let fused = causal_lm_loss_sum(&logits, &ids, &mask)?.to_scalar::<f32>()?;
/// let composed = causal_lm_loss_sum_composed(&logits, &ids, &mask)?.to_scalar::<f32>()?;
/// assert!((fused - composed).abs() < 1e-5 * composed.abs());
/// # Ok(()) }
/// ```
pub fn causal_lm_loss_sum_composed(
    logits: &Tensor,
    input_ids: &Tensor,
    loss_mask: &Tensor,
) -> Result<Tensor> {
    match shift(logits, input_ids, loss_mask)? {
        Some(Shifted {
            predicted,
            targets,
            mask,
        }) => composed(&predicted, &targets, &mask),
        None => Ok(Tensor::zeros((), DType::F32, logits.device())?),
    }
}

/// The predicting logits `(rows, vocab)` f32, their targets `(rows, 1)` u32 and weights
/// `(rows,)` f32 over every `(b, t ≥ 1)`.
struct Shifted {
    predicted: Tensor,
    targets: Tensor,
    mask: Tensor,
}

/// `(batch, seq)` of the logits, checked against the ids and the mask.
fn check(logits: &Tensor, input_ids: &Tensor, loss_mask: &Tensor) -> Result<(usize, usize)> {
    let (batch, seq, _) = logits.dims3().map_err(|_| shape_error("logits", logits))?;
    check_ids(batch, seq, input_ids, loss_mask)?;
    Ok((batch, seq))
}

/// Checks that the ids and the mask are `(batch, seq)`.
fn check_ids(batch: usize, seq: usize, input_ids: &Tensor, loss_mask: &Tensor) -> Result<()> {
    if input_ids.dims() != [batch, seq] || loss_mask.dims() != [batch, seq] {
        return Err(Error::ShapeMismatch {
            layer: "causal LM loss".to_string(),
            what: "input_ids / loss_mask".to_string(),
            expected: format!("[{batch}, {seq}] (the model's batch and sequence)"),
            got: format!("{:?} / {:?}", input_ids.dims(), loss_mask.dims()),
        });
    }
    Ok(())
}

/// Checks the shapes and shifts: `None` for sequences of one token (nothing to predict).
fn shift(logits: &Tensor, input_ids: &Tensor, loss_mask: &Tensor) -> Result<Option<Shifted>> {
    let (batch, seq) = check(logits, input_ids, loss_mask)?;
    let vocab = logits.dim(2)?;
    if seq < 2 {
        return Ok(None);
    }
    let rows = batch * (seq - 1);
    let narrow =
        |t: &Tensor, start: usize, dtype: DType| t.narrow(1, start, seq - 1)?.to_dtype(dtype);
    Ok(Some(Shifted {
        predicted: narrow(logits, 0, DType::F32)?.reshape((rows, vocab))?,
        targets: narrow(input_ids, 1, DType::U32)?.reshape((rows, 1))?,
        mask: narrow(loss_mask, 1, DType::F32)?.reshape(rows)?,
    }))
}

fn composed(predicted: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let log_probs = candle_nn::ops::log_softmax(predicted, D::Minus1)?;
    let picked = log_probs.gather(targets, 1)?.squeeze(1)?;
    Ok((picked * mask)?.sum_all()?.neg()?)
}

fn shape_error(what: &str, t: &Tensor) -> Error {
    Error::ShapeMismatch {
        layer: "causal LM loss".to_string(),
        what: what.to_string(),
        expected: "(batch, seq, vocab)".to_string(),
        got: format!("{:?}", t.dims()),
    }
}
