//! Differentiable transformer ops for models of your own, as lorakit's models run them:
//! RMSNorm ([`rms_norm`]) and LayerNorm ([`layer_norm`]), RoPE on a projection's heads
//! ([`rope_heads`]), causal grouped-query attention ([`causal_attention`]), an encoder's
//! attention under a key mask with dropout ([`bidirectional_attention`]), the gated
//! MLP's `silu(gate) ⊙ up` ([`silu_mul`]) and GELU (GPT-2's [`gelu_tanh`], BERT's
//! [`gelu_erf`]).
//!
//! Where a gradient flows through f32 CPU tensors, each is one fused op with its own
//! backward (a few full-size graph nodes fewer than the composition: candle's backward
//! gives every node a zero-filled gradient and an add on top of its own work). candle-nn's
//! fused kernels run where no gradient flows (they have no backward in candle 0.11), and
//! candle-nn's differentiable compositions of the same formulas everywhere else (other
//! devices and dtypes), so an adapter before any of these ops always trains. Results agree
//! across the three paths to rounding (each op's unit tests and
//! `tests/suite/fused_ops.rs`).
//!
//! Shapes are checked first: a mismatch is an [`Error::ShapeMismatch`] naming the op and
//! the argument, whichever path would have run.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::kernels::dropout::Dropout;
use crate::matmul::matmul;
use crate::models::causal_mask::CausalMask;
use crate::models::ops::softmax_last;
use crate::models::{
    attention_op, gelu, layer_norm as layer_norm_op, rms_norm as rms_norm_op, rope_op, swiglu,
};

/// `weight ⊙ x / sqrt(mean(x²) + eps)` over the last dimension of `x` (transformers'
/// `LlamaRMSNorm`, candle-nn's `rms_norm`), differentiable in `x` and, when it tracks a
/// gradient, in `weight`.
///
/// `weight` has the size of `x`'s last dimension. Fused with its backward for f32 CPU
/// tensors and a `weight` that tracks no gradient (a frozen norm, as in lorakit's models).
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use lorakit::models::fused::rms_norm;
///
/// let dev = Device::Cpu;
/// let x = Var::from_tensor(&Tensor::new(&[[3f32, 4.0], [1.0, -1.0]], &dev)?)?;
/// let w = Tensor::new(&[1f32, 2.0], &dev)?;
/// let y = rms_norm(x.as_tensor(), &w, 0.0)?;
/// // Row [3, 4]: rms = sqrt((9 + 16) / 2).
/// let r = (12.5f32).sqrt();
/// let got = y.to_vec2::<f32>()?;
/// assert!((got[0][0] - 3.0 / r).abs() < 1e-6 && (got[0][1] - 8.0 / r).abs() < 1e-6);
/// let grads = y.sum_all()?.backward()?;
/// assert_eq!(grads.get(x.as_tensor()).unwrap().dims(), &[2, 2]);
/// # Ok::<(), lorakit::Error>(())
/// ```
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    const OP: &str = "fused::rms_norm";
    let Some(&dim) = x.dims().last() else {
        return Err(shape_error(OP, "x", "at least one dimension", x));
    };
    if weight.dims() != [dim] {
        return Err(shape_error(OP, "weight", format!("[{dim}]"), weight));
    }
    // candle-nn's fused kernel takes f32, f16 and bf16 only.
    let fused_dtype = matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16);
    if x.track_op() && rms_norm_op::supports(x, weight) {
        Ok(rms_norm_op::rms_norm_trainable(x, weight, eps)?)
    } else if x.track_op() || weight.track_op() || !fused_dtype {
        Ok(candle_nn::ops::rms_norm_slow(x, weight, eps)?)
    } else {
        Ok(candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps)?)
    }
}

/// `(x − mean(x)) / sqrt(var(x) + eps) ⊙ weight + bias` over the last dimension of `x`
/// (PyTorch's `nn.LayerNorm`, the biased variance; candle-nn's `layer_norm`), in f32 for
/// half-precision inputs; differentiable in `x`, `bias` and, when it tracks a gradient,
/// `weight`.
///
/// `weight` and `bias` have the size of `x`'s last dimension. Fused with its backward for
/// f32 CPU tensors and a `weight` that tracks no gradient (a frozen norm whose bias may
/// train, as under PEFT's `bias = "all"`).
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use lorakit::models::fused::layer_norm;
///
/// let dev = Device::Cpu;
/// let x = Var::from_tensor(&Tensor::new(&[[1f32, 3.0]], &dev)?)?;
/// let (w, b) = (Tensor::new(&[2f32, 2.0], &dev)?, Tensor::new(&[0f32, 1.0], &dev)?);
/// let y = layer_norm(x.as_tensor(), &w, &b, 0.0)?.to_vec2::<f32>()?;
/// // Mean 2, variance 1: x̂ = [−1, 1].
/// assert!((y[0][0] + 2.0).abs() < 1e-6 && (y[0][1] - 3.0).abs() < 1e-6);
/// # Ok::<(), lorakit::Error>(())
/// ```
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<Tensor> {
    const OP: &str = "fused::layer_norm";
    let Some(&dim) = x.dims().last() else {
        return Err(shape_error(OP, "x", "at least one dimension", x));
    };
    for (name, t) in [("weight", weight), ("bias", bias)] {
        if t.dims() != [dim] {
            return Err(shape_error(OP, name, format!("[{dim}]"), t));
        }
    }
    Ok(layer_norm_op::layer_norm(x, weight, bias, eps)?)
}

/// The heads of a projection `x` `(batch, seq, heads, head_dim)`, rotated for positions
/// `0..seq` whose `cos`, `sin` are `(seq, head_dim / 2)`, as `(batch, heads, seq,
/// head_dim)`: transformers' `apply_rotary_pos_emb` (`rotate_half`: the two halves of a
/// head are the pairs; candle-nn's `rope`, not `rope_i`) after the usual head transpose.
///
/// Differentiable in `x`; fused with the transpose and its backward for f32 CPU tensors
/// and tables that track no gradient.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use lorakit::models::fused::rope_heads;
///
/// let dev = Device::Cpu;
/// // One position, one head of size 2: the pair (x0, x1) turned by the angle.
/// let x = Tensor::new(&[1f32, 0.0], &dev)?.reshape((1, 1, 1, 2))?;
/// let angle = 0.5f32;
/// let (cos, sin) = (Tensor::new(&[[angle.cos()]], &dev)?, Tensor::new(&[[angle.sin()]], &dev)?);
/// let y = rope_heads(&x, &cos, &sin)?.flatten_all()?.to_vec1::<f32>()?;
/// assert!((y[0] - angle.cos()).abs() < 1e-6 && (y[1] - angle.sin()).abs() < 1e-6);
/// # Ok::<(), lorakit::Error>(())
/// ```
pub fn rope_heads(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    const OP: &str = "fused::rope_heads";
    let &[_, t, _, d] = x.dims() else {
        return Err(shape_error(OP, "x", "(batch, seq, heads, head_dim)", x));
    };
    if d % 2 != 0 {
        return Err(shape_error(OP, "x", "an even head_dim", x));
    }
    for (name, table) in [("cos", cos), ("sin", sin)] {
        if table.dims() != [t, d / 2] {
            return Err(shape_error(OP, name, format!("[{t}, {}]", d / 2), table));
        }
    }
    if x.track_op() && rope_op::supports(x, cos, sin) {
        return Ok(rope_op::rope_heads_first(x, cos, sin)?);
    }
    let heads = x.transpose(1, 2)?.contiguous()?;
    if heads.track_op() || cos.track_op() || sin.track_op() {
        Ok(candle_nn::rotary_emb::rope_slow(&heads, cos, sin)?)
    } else {
        Ok(candle_nn::rotary_emb::rope(&heads, cos, sin)?)
    }
}

/// `softmax(scale · q kᵀ + causal mask) v` for queries `q` `(batch, heads, seq, head_dim)`
/// and keys and values `k`, `v` `(batch, kv_heads, kv_len, head_dim)`, as
/// `(batch, seq, heads · head_dim)` (what an output projection reads).
///
/// The queries sit at positions `kv_len − seq ..` (after `kv_len − seq` cached keys) and
/// the keys at `0..kv_len`: a query sees the keys at or before its position and, with
/// `window = Some(w)`, fewer than `w` positions back (Mistral's and Qwen's sliding
/// window). Each key/value head serves `heads / kv_heads` consecutive query heads
/// (transformers' `repeat_kv`), without copying keys and values.
///
/// Differentiable in all three. One fused op with its backward for f32 CPU tensors
/// (it skips the blocks of keys the mask hides); candle's matmul, mask and softmax
/// elsewhere, with scores and softmax in f32 for f16 / bf16 inputs (transformers' eager
/// attention).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use lorakit::models::fused::causal_attention;
///
/// let dev = Device::Cpu;
/// // Two positions, one head of size 1: the first query sees only the first value.
/// let q = Tensor::new(&[1f32, 1.0], &dev)?.reshape((1, 1, 2, 1))?;
/// let k = q.clone();
/// let v = Tensor::new(&[10f32, 20.0], &dev)?.reshape((1, 1, 2, 1))?;
/// let out = causal_attention(&q, &k, &v, 1.0, None)?.flatten_all()?.to_vec1::<f32>()?;
/// assert!((out[0] - 10.0).abs() < 1e-5);
/// assert!((out[1] - 15.0).abs() < 1e-5); // equal scores: the mean of both values
/// # Ok::<(), lorakit::Error>(())
/// ```
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    window: Option<usize>,
) -> Result<Tensor> {
    causal_attention_over("fused::causal_attention", [q, k, v], scale, (window, None))
}

/// [`causal_attention`] over a left-padded batch: row `b` holds `pads[b]` padding slots,
/// then its tokens (batched generation's layout). A token sees its row's tokens at or
/// before it (and within `window`), never the padding; a padding slot sees only itself, so
/// its output is finite (and meaningless). Slots, not positions, are what the mask and the
/// window count; the caller numbers each row's positions for its rotary or learned
/// embeddings. One fused op with its backward for f32 CPU tensors, as [`causal_attention`].
///
/// ```
/// use candle_core::{Device, Tensor};
/// use lorakit::models::fused::padded_causal_attention;
///
/// let dev = Device::Cpu;
/// // Two rows of two slots, one head of size 1; the second row's first slot is padding.
/// let q = Tensor::ones((2, 1, 2, 1), candle_core::DType::F32, &dev)?;
/// let v = Tensor::new(&[10f32, 20.0, 99.0, 30.0], &dev)?.reshape((2, 1, 2, 1))?;
/// let out = padded_causal_attention(&q, &q, &v, 1.0, None, &[0, 1])?;
/// let out = out.flatten_all()?.to_vec1::<f32>()?;
/// assert!((out[1] - 15.0).abs() < 1e-5); // the first row's second token sees both
/// assert!((out[3] - 30.0).abs() < 1e-5); // the second row's token does not see the 99
/// assert!(padded_causal_attention(&q, &q, &v, 1.0, None, &[0]).is_err()); // one pad per row
/// # Ok::<(), lorakit::Error>(())
/// ```
pub fn padded_causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    window: Option<usize>,
    pads: &[usize],
) -> Result<Tensor> {
    const OP: &str = "fused::padded_causal_attention";
    let batch = q.dims().first().copied().unwrap_or(0);
    if pads.len() != batch {
        return Err(Error::usage(
            crate::error::Scope::Settings(OP.to_string()),
            format!(
                "pads has {} entries for a batch of {batch}: give one per row",
                pads.len()
            ),
        ));
    }
    causal_attention_over(OP, [q, k, v], scale, (window, Some(pads)))
}

/// [`causal_attention`] and [`padded_causal_attention`] after the latter's check; `op`
/// names the caller in errors.
fn causal_attention_over(
    op: &'static str,
    [q, k, v]: [&Tensor; 3],
    scale: f64,
    (window, pads): (Option<usize>, Option<&[usize]>),
) -> Result<Tensor> {
    let seq = q.dims().get(2).copied().unwrap_or(0);
    let (_, t, kv_len) = grouped_dims(op, q, k, v, seq)?;
    if window == Some(0) {
        return Err(Error::usage(
            crate::error::Scope::Settings(op.to_string()),
            "window 0 would hide every key: give a window of at least 1 position, or None",
        ));
    }
    if attention_op::supports(q, k, v) {
        return Ok(attention_op::causal_attention(
            q, k, v, scale, window, pads, None,
        )?);
    }
    // The composed ops add the mask to scores `(batch, kv_heads, group, seq, kv_len)`.
    let mask = CausalMask::new((t, kv_len, kv_len - t), window, pads, 2, q.device());
    composed_attention(q, k, v, scale, mask.additive()?, 0.0, None, None)
}

/// `softmax(scale · q kᵀ + mask) v` for queries `q` `(batch, heads, seq, head_dim)` and
/// keys and values `k`, `v` `(batch, kv_heads, kv_len, head_dim)`, where every query sees
/// every key its batch element's `key_mask` `(batch, kv_len)` (any dtype) holds non-zero
/// (`None`: every key), with dropout at probability `dropout` on the probabilities (`0.0`
/// for none, as in evaluation): an encoder's self-attention, as BERT runs it. Returns
/// `(batch, seq, heads · head_dim)` (what an output projection reads). Each key/value head
/// serves `heads / kv_heads` consecutive query heads, without copying keys and values.
///
/// Masked keys get no weight, as transformers' additive mask of the dtype's most negative
/// value gives them; a batch element whose mask holds no key at all gets equal weights
/// on all its keys, as that mask gives (not an error: transformers runs it too). Dropout
/// zeroes each probability with probability `dropout` and scales the rest by
/// `1 / (1 − dropout)` (PyTorch's and candle-nn's dropout).
///
/// Differentiable in `q`, `k` and `v`. One fused op with its backward for f32 CPU tensors
/// with at least as many keys as queries (it skips the keys after a batch element's last
/// unmasked one, so a right-padded batch does no work on its padding; its dropout draws
/// from a seeded counter-based generator (`lowbias32`) rather than candle's); candle's matmul,
/// mask, softmax and dropout elsewhere, with scores and softmax in f32 for f16 / bf16
/// inputs.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use lorakit::models::fused::bidirectional_attention;
///
/// let dev = Device::Cpu;
/// // Three positions, one head of size 1, equal scores; the last key is padding.
/// let q = Tensor::new(&[1f32, 1.0, 1.0], &dev)?.reshape((1, 1, 3, 1))?;
/// let k = Tensor::zeros((1, 1, 3, 1), candle_core::DType::F32, &dev)?;
/// let v = Tensor::new(&[10f32, 20.0, 90.0], &dev)?.reshape((1, 1, 3, 1))?;
/// let mask = Tensor::new(&[[1u32, 1, 0]], &dev)?;
/// let out = bidirectional_attention(&q, &k, &v, 1.0, Some(&mask), 0.0)?;
/// // Every query, the first one too, averages the two unmasked values.
/// for x in out.flatten_all()?.to_vec1::<f32>()? {
///     assert!((x - 15.0).abs() < 1e-5);
/// }
/// // Shapes are checked whichever path runs.
/// assert!(bidirectional_attention(&q, &k, &v, 1.0, Some(&mask.narrow(1, 0, 2)?), 0.0).is_err());
/// # Ok::<(), lorakit::Error>(())
/// ```
pub fn bidirectional_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    key_mask: Option<&Tensor>,
    dropout: f64,
) -> Result<Tensor> {
    const OP: &str = "fused::bidirectional_attention";
    let (b, _, kv_len) = grouped_dims(OP, q, k, v, 1)?;
    if let Some(mask) = key_mask {
        if mask.dims() != [b, kv_len] {
            return Err(shape_error(
                OP,
                "key_mask",
                format!("[{b}, {kv_len}]"),
                mask,
            ));
        }
    }
    crate::validate::dropout(OP, dropout)?;
    let visible = key_flags(key_mask, b * kv_len)?;
    attention_over_keys(q, k, v, scale, &visible, dropout)
}

/// Which keys a `(batch, kv_len)` mask lets its batch elements see (non-zero entries), row
/// after row; every one of `count` without a mask. One read of the mask to the host: a
/// model computes it once per forward for all its layers.
pub(crate) fn key_flags(key_mask: Option<&Tensor>, count: usize) -> Result<Vec<bool>> {
    match key_mask {
        Some(mask) => Ok(mask
            .ne(0f64)?
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_vec1::<u8>()?
            .into_iter()
            .map(|x| x != 0)
            .collect()),
        None => Ok(vec![true; count]),
    }
}

/// [`bidirectional_attention`] after its checks, the key mask as [`key_flags`] gives it
/// (`(batch, kv_len)` flags row after row).
pub(crate) fn attention_over_keys(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    visible: &[bool],
    dropout: f64,
) -> Result<Tensor> {
    let (b, kv_len) = (k.dim(0)?, k.dim(2)?);
    if attention_op::supports(q, k, v) {
        if let Some(keys) = attention_op::KeyMask::new(visible.to_vec(), kv_len) {
            let dropout = Dropout::new(dropout as f32);
            return Ok(attention_op::key_masked_attention(
                q, k, v, scale, keys, dropout,
            )?);
        }
    }
    let min = match q.dtype() {
        DType::F64 => f64::MIN,
        _ => f64::from(f32::MIN),
    };
    let values: Vec<f64> = visible.iter().map(|&s| if s { 0.0 } else { min }).collect();
    let mask =
        Tensor::from_vec(values, (b, 1, 1, 1, kv_len), &Device::Cpu)?.to_device(q.device())?;
    composed_attention(q, k, v, scale, &mask, dropout, None, None)
}

/// `silu(gate) ⊙ up` (the gated MLP of Llama-family models), differentiable in both;
/// `gate` and `up` have one shape. Fused with its backward for f32 CPU tensors.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use lorakit::models::fused::silu_mul;
///
/// let dev = Device::Cpu;
/// let gate = Tensor::new(&[0f32, 2.0], &dev)?;
/// let up = Tensor::new(&[5f32, 3.0], &dev)?;
/// let y = silu_mul(&gate, &up)?.to_vec1::<f32>()?;
/// let silu2 = 2.0 / (1.0 + (-2f32).exp());
/// assert_eq!(y[0], 0.0);
/// assert!((y[1] - 3.0 * silu2).abs() < 1e-6);
/// # Ok::<(), lorakit::Error>(())
/// ```
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if up.dims() != gate.dims() {
        return Err(shape_error(
            "fused::silu_mul",
            "up",
            format!("{:?} (gate's shape)", gate.dims()),
            up,
        ));
    }
    Ok(swiglu::silu_mul(gate, up)?)
}

/// GELU's tanh approximation, `0.5 x (1 + tanh(sqrt(2/π) (x + 0.044715 x³)))`
/// (transformers' `gelu_new`, GPT-2's activation; candle's `gelu`), differentiable. Fused
/// with its backward, one vectorized pass each way, for f32 CPU tensors that track a
/// gradient; candle's `gelu` otherwise.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use lorakit::models::fused::gelu_tanh;
///
/// let dev = Device::Cpu;
/// let y = gelu_tanh(&Tensor::new(&[0f32, 10.0, -10.0], &dev)?)?.to_vec1::<f32>()?;
/// assert_eq!(y[0], 0.0);
/// assert!((y[1] - 10.0).abs() < 1e-5 && y[2].abs() < 1e-5);
/// # Ok::<(), lorakit::Error>(())
/// ```
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    Ok(gelu::gelu_tanh(x)?)
}

/// The exact GELU, `x Φ(x) = 0.5 x (1 + erf(x / sqrt(2)))` (transformers' `gelu`, BERT's
/// activation; candle's `gelu_erf`), differentiable. Fused with its backward, one
/// vectorized pass each way, for f32 CPU tensors that track a gradient, `erf` by
/// Abramowitz and Stegun's 7.1.26 (PyTorch's CPU formula; absolute error ≤ 7e-7 in f32);
/// candle's `gelu_erf` otherwise.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use lorakit::models::fused::gelu_erf;
///
/// let x = Var::new(&[0f32, 1.0, -10.0], &Device::Cpu)?;
/// let y = gelu_erf(x.as_tensor())?;
/// let v = y.to_vec1::<f32>()?;
/// assert_eq!(v[0], 0.0);
/// assert!((v[1] - 0.841_344_7).abs() < 1e-6 && v[2].abs() < 1e-6); // Φ(1) = 0.8413447
/// // The slope at 0 is Φ(0) = 0.5.
/// let grads = y.sum_all()?.backward()?;
/// let dx = grads.get(x.as_tensor()).unwrap().to_vec1::<f32>()?;
/// assert!((dx[0] - 0.5).abs() < 1e-6);
/// # Ok::<(), lorakit::Error>(())
/// ```
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    Ok(gelu::gelu_erf(x)?)
}

/// Attention composed from candle ops: `softmax(scale · q kᵀ + mask) v` for `q`
/// `(b, heads, t, d)`, `k`, `v` `(b, kv_heads, kv_len, d)` and an additive `mask`
/// `(t, kv_len)` or `(b, 1, 1, t, kv_len)` (a left-padded batch), as `(b, t, heads · d)`,
/// with `dropout` (a probability, `0.0` for none) on the probabilities. Key/value heads
/// serve consecutive query heads without copies; scores and softmax in f32 for
/// half-precision inputs, products in the inputs' dtype. `softcap`: the scaled scores
/// become `cap · tanh(scores / cap)` before the mask (Gemma 2's `attn_logit_softcapping`,
/// as transformers' eager attention applies it). `sinks`: one logit per query head
/// `(heads,)`, any float dtype (GPT-OSS's attention sinks, as transformers'
/// `eager_attention_forward` there applies them): each row of a head's masked scores gets
/// its sink as one more column for the softmax (in the max and the sum), which is then
/// dropped, so the keys' probabilities sum to less than 1. The sinks are frozen: no
/// gradient reaches them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn composed_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: &Tensor,
    dropout: f64,
    softcap: Option<f64>,
    sinks: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    if let Some(sinks) = sinks {
        if sinks.dims() != [h] {
            return Err(shape_error("attention", "sinks", format!("[{h}]"), sinks));
        }
    }
    let (g, kv_len) = (k.dim(1)?, k.dim(2)?);
    let rep = h / g;
    let q = q.contiguous()?.reshape((b, g, rep * t, d))?;
    // Half precision scores go to f32 for the softmax; f32 and f64 stay as they are.
    let softmax_dtype = match q.dtype() {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    };
    let mut scores = (matmul(&q, &k.t()?)? * scale)?;
    if let Some(cap) = softcap {
        scores = soft_cap(&scores, cap)?;
    }
    let scores = scores
        .to_dtype(softmax_dtype)?
        .reshape((b, g, rep, t, kv_len))?
        .broadcast_add(&mask.to_dtype(softmax_dtype)?)?;
    let mut probs = match sinks {
        None => softmax_last(&scores)?,
        Some(sinks) => {
            // Query head `gi · rep + j` is `(gi, j)` of `(g, rep)`.
            let column = sinks
                .detach()
                .to_device(q.device())?
                .to_dtype(softmax_dtype)?
                .reshape((1, g, rep, 1, 1))?
                .broadcast_as((b, g, rep, t, 1))?
                .contiguous()?;
            let with_sinks = Tensor::cat(&[&scores, &column], 4)?;
            softmax_last(&with_sinks)?.narrow(4, 0, kv_len)?
        }
    };
    if dropout > 0.0 {
        probs = candle_nn::ops::dropout(&probs, dropout as f32)?;
    }
    let probs = probs
        .to_dtype(v.dtype())?
        .reshape((b, g, rep * t, kv_len))?;
    Ok(matmul(&probs, v)?
        .reshape((b, h, t, d))?
        .transpose(1, 2)?
        .reshape((b, t, h * d))?)
}

/// `cap · tanh(x / cap)`: `x` soft-capped to `(−cap, cap)` (Gemma 2's attention scores and
/// logits), differentiable, in `x`'s dtype.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use lorakit::models::fused::soft_cap;
/// let x = Tensor::new(&[0f32, 1.0, 1000.0], &Device::Cpu)?;
/// let y = soft_cap(&x, 30.0)?.to_vec1::<f32>()?;
/// assert!(y[0] == 0.0 && (y[1] - 30.0 * (1f32 / 30.0).tanh()).abs() < 1e-6 && y[2] == 30.0);
/// # Ok::<(), lorakit::Error>(())
/// ```
pub fn soft_cap(x: &Tensor, cap: f64) -> Result<Tensor> {
    Ok(((x / cap)?.tanh()? * cap)?)
}

/// Checks that `q` is `(batch, heads, seq, head_dim)` with `seq ≥ 1`, `k`
/// `(batch, kv_heads, kv_len, head_dim)` with `kv_heads` dividing `heads` and
/// `kv_len ≥ min_keys` (and ≥ 1), and `v` shaped as `k`; returns `(batch, seq, kv_len)`,
/// or the error naming the argument that does not fit.
fn grouped_dims(
    op: &str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    min_keys: usize,
) -> Result<(usize, usize, usize)> {
    let &[b, h, t, d] = q.dims() else {
        return Err(shape_error(op, "q", "(batch, heads, seq, head_dim)", q));
    };
    if t == 0 {
        return Err(shape_error(op, "q", "(batch, heads, seq ≥ 1, head_dim)", q));
    }
    let &[kb, g, kv_len, kd] = k.dims() else {
        let expected = "(batch, kv_heads, kv_len, head_dim)";
        return Err(shape_error(op, "k", expected, k));
    };
    let min_keys = min_keys.max(1);
    if kb != b || kd != d || g == 0 || h % g != 0 || kv_len < min_keys {
        let expected = format!("[{b}, a divisor of {h}, at least {min_keys} positions, {d}]");
        return Err(shape_error(op, "k", expected, k));
    }
    if v.dims() != k.dims() {
        return Err(shape_error(op, "v", format!("{:?}", k.dims()), v));
    }
    Ok((b, t, kv_len))
}

/// The error for argument `what` of `op` whose shape is not `expected`.
fn shape_error(op: &str, what: &str, expected: impl Into<String>, got: &Tensor) -> Error {
    Error::ShapeMismatch {
        layer: op.to_string(),
        what: what.to_string(),
        expected: expected.into(),
        got: format!("{:?}", got.dims()),
    }
}
