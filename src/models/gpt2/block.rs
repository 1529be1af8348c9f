//! One GPT-2 transformer block: LayerNorms, causal self-attention (over cached keys and
//! values too) and the MLP.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::VarBuilder;

use crate::error::Result;
use crate::kernels::dropout::Dropout;
use crate::matmul::matmul;
use crate::model::{conv1d, AdapterPlan, Linear};
use crate::models::attention_op;
use crate::models::causal_mask::CausalMask;
use crate::models::kv_buffer::{Appending, LayerKv};
use crate::models::ops::{dropout_t, softmax_last, LayerNorm};

use super::config::{Activation, Gpt2Config};

/// One transformer block (`transformer.h.N`).
#[derive(Clone, Debug)]
pub(super) struct Block {
    ln_1: LayerNorm,
    c_attn: Linear,
    attn_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    mlp_proj: Linear,
    n_head: usize,
    /// The attention scores' factor: `1/sqrt(head_dim)` and/or `1/(N + 1)`.
    scale: f64,
    upcast: bool,
    activation: Activation,
    /// Dropout on the attention probabilities (training only).
    attn_pdrop: f64,
    /// Dropout on the attention's and the MLP's outputs (training only).
    resid_pdrop: f64,
}

impl Block {
    pub(super) fn load(
        config: &Gpt2Config,
        index: usize,
        vb: VarBuilder,
        plan: &AdapterPlan,
    ) -> Result<Self> {
        let (d, eps) = (config.n_embd, config.layer_norm_epsilon);
        let inner = config.inner_dim();
        let head_dim = d / config.n_head;
        let mut scale = 1.0;
        if config.scale_attn_weights {
            scale /= (head_dim as f64).sqrt();
        }
        if config.scale_attn_by_inverse_layer_idx {
            scale /= (index + 1) as f64;
        }
        Ok(Self {
            ln_1: LayerNorm::load(d, eps, vb.pp("ln_1"), plan)?,
            c_attn: conv1d(d, 3 * d, vb.pp("attn.c_attn"), plan)?,
            attn_proj: conv1d(d, d, vb.pp("attn.c_proj"), plan)?,
            ln_2: LayerNorm::load(d, eps, vb.pp("ln_2"), plan)?,
            c_fc: conv1d(d, inner, vb.pp("mlp.c_fc"), plan)?,
            mlp_proj: conv1d(inner, d, vb.pp("mlp.c_proj"), plan)?,
            n_head: config.n_head,
            scale,
            upcast: config.reorder_and_upcast_attn,
            activation: config.activation()?,
            attn_pdrop: config.attn_pdrop,
            resid_pdrop: config.resid_pdrop,
        })
    }

    /// The block on `x` `(batch, seq, n_embd)` after the cached keys and values `past`
    /// (`(batch, n_head, past_len, head_dim)` each), the new ones appended as `how` says;
    /// `mask` is `(seq, past_len + seq)`; `train`: the config's dropouts apply (on the
    /// attention probabilities, and on the attention's and the MLP's outputs before each
    /// residual add, as transformers' `GPT2Block` in training mode). Returns the output and
    /// the grown cache entry.
    pub(super) fn forward(
        &self,
        x: &Tensor,
        mask: &CausalMask,
        past: Option<&LayerKv>,
        how: Appending,
        train: bool,
    ) -> Result<(Tensor, LayerKv)> {
        let (attn, kv) = self.attention(&self.ln_1.forward(x)?, mask, past, how, train)?;
        let x = (x + dropout_t(attn, self.resid_pdrop, train)?)?;
        let h = self.c_fc.forward(&self.ln_2.forward(&x)?)?;
        let mlp = self.mlp_proj.forward(&self.activation.apply(&h)?)?;
        Ok(((x + dropout_t(mlp, self.resid_pdrop, train)?)?, kv))
    }

    /// Multi-head self-attention of the new positions over the cached and new keys, with
    /// the additive `mask` (0 where a key is seen, -inf elsewhere), and dropout on the
    /// probabilities when `train`. On f32 CPU tensors, lorakit's fused causal attention op
    /// with its backward (`models::attention_op`) computes the same, left padding
    /// included.
    fn attention(
        &self,
        x: &Tensor,
        mask: &CausalMask,
        past: Option<&LayerKv>,
        how: Appending,
        train: bool,
    ) -> Result<(Tensor, LayerKv)> {
        let p_drop = if train { self.attn_pdrop } else { 0.0 };
        let (b, s, d) = x.dims3()?;
        let head_dim = d / self.n_head;
        let qkv = self.c_attn.forward(x)?;
        let heads = |i: usize| -> candle_core::Result<Tensor> {
            qkv.narrow(D::Minus1, i * d, d)?
                .reshape((b, s, self.n_head, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?);
        let all = LayerKv::append(past, &k, &v, how)?;
        let (k, v) = (&all.keys, &all.values);
        if attention_op::supports(&q, k, v) {
            let dropout = Dropout::new(p_drop as f32);
            let pads = mask.pads();
            let out = attention_op::causal_attention(&q, k, v, self.scale, None, pads, dropout)?;
            return Ok((self.attn_proj.forward(&out)?, all.entry));
        }
        let mask = mask.additive()?;
        let (qs, ks) = if self.upcast {
            (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?)
        } else {
            (q, k.clone())
        };
        let scores = (matmul(&qs, &ks.t()?)? * self.scale)?;
        let scores = scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?;
        let probs = dropout_t(softmax_last(&scores)?, p_drop, train)?.to_dtype(v.dtype())?;
        let out = matmul(&probs, v)?.transpose(1, 2)?.reshape((b, s, d))?;
        Ok((self.attn_proj.forward(&out)?, all.entry))
    }
}
