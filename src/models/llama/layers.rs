//! The pieces of a Llama-family decoder layer: RMSNorm, causal and sliding-window masks,
//! grouped-query attention (with the RoPE tables of `rope.rs`) and the gated MLP.
//!
//! The norms, RoPE, attention and the MLP's gating run through [`crate::models::fused`]:
//! lorakit's fused ops with their backward where a gradient flows through f32 CPU
//! tensors, candle-nn's fused kernels where no gradient flows (they have no backward in
//! candle 0.11), candle-nn's differentiable compositions elsewhere (other dtypes or
//! devices), so adapters before a norm or a RoPE always train. The causal grouped-query
//! attention on f32 CPU tensors, left-padded or not, is always lorakit's fused op
//! (`models::attention_op`), in training and over a KV cache's buffers in generation;
//! other dtypes and devices compose it from candle ops under this forward's masks.

use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use crate::error::{Error, Result, Scope};
use crate::kernels::dropout::Dropout;
use crate::model::{linear_b, AdapterPlan, Linear};
use crate::models::causal_mask::CausalMask;
use crate::models::kv_buffer::{Appending, LayerKv};
use crate::models::ops::dropout_t;
use crate::models::{attention_op, fused};

use super::config::{LayerAttention, LlamaConfig};
use super::gpt_oss_moe;
use super::mlp::Mlp;
use super::norm::RmsNorm;
use super::norm_layout::{NormPlacement, QkNorm};
use super::projections::QkvProjection;
use super::rope::RopeTables;
use super::sparse_moe::SparseMoe;

/// The attention masks of one forward, one per distinct [`LayerAttention`] of the model
/// (`models::causal_mask`; a left-padded batch's additive mask is
/// `(batch, 1, 1, q_len, kv_len)`). Queries sit in slots `offset..offset + q_len`, keys in
/// `0..kv_len` (a KV cache would hold the first `offset`).
#[derive(Debug)]
pub(crate) struct Masks {
    masks: Vec<(LayerAttention, CausalMask)>,
}

impl Masks {
    pub(crate) fn new(
        kinds: &[LayerAttention],
        q_len: usize,
        kv_len: usize,
        offset: usize,
        pads: Option<&[usize]>,
        device: &Device,
    ) -> Self {
        let mut masks: Vec<(LayerAttention, CausalMask)> = Vec::new();
        for &kind in kinds {
            if masks.iter().any(|(k, _)| *k == kind) {
                continue;
            }
            let window = match kind {
                LayerAttention::Full => None,
                LayerAttention::Sliding { window } => Some(window),
            };
            let sizes = (q_len, kv_len, offset);
            masks.push((kind, CausalMask::new(sizes, window, pads, 2, device)));
        }
        Self { masks }
    }

    fn get(&self, kind: LayerAttention) -> Result<&CausalMask> {
        self.masks
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, m)| m)
            .ok_or_else(|| {
                Error::usage(
                    Scope::Settings("Llama attention".to_string()),
                    format!("no mask was built for {kind:?}"),
                )
            })
    }
}

/// Grouped-query self-attention with RoPE (and Qwen3's per-head or OLMo's whole q/k
/// RMSNorm).
///
/// Split in two steps so that a KV cache can sit between them: [`Attention::project`]
/// gives the rotated keys and values of the new positions (what a cache appends to), and
/// [`Attention::attend`] attends over whatever keys and values it is given.
#[derive(Clone, Debug)]
pub(crate) struct Attention {
    qkv: QkvProjection,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    scale: f64,
    kind: LayerAttention,
    /// Whether queries and keys are rotated (all but SmolLM3's NoPE layers).
    rotates: bool,
    /// Dropout on the attention probabilities (training only).
    dropout: f64,
    /// Gemma 2's soft-capping of the scaled scores.
    softcap: Option<f64>,
    /// Whether `q_norm` / `k_norm` normalize each head or the whole projection.
    qk_norm: QkNorm,
    /// OLMoE's clamp of queries, keys and values.
    clip_qkv: Option<f64>,
    /// gpt-oss's sink logit per query head (`sinks`), for the fused op (on the host) and
    /// the composed path.
    sinks: Option<Sinks>,
}

/// A layer's attention sinks ([`LlamaConfig::attention_sinks`]).
#[derive(Clone, Debug)]
struct Sinks {
    host: Arc<[f32]>,
    tensor: Tensor,
}

impl Sinks {
    /// `sinks` `(heads,)` at `vb`'s path (`model.layers.N.self_attn`).
    fn load(heads: usize, vb: &VarBuilder) -> Result<Self> {
        let tensor = vb.get(heads, "sinks")?;
        let host = tensor.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        Ok(Self {
            host: host.into(),
            tensor,
        })
    }
}

impl Attention {
    /// Loads `q_proj`, `k_proj`, `v_proj` (or Phi-3's `qkv_proj`), `o_proj` (and `q_norm`,
    /// `k_norm`) at `vb`'s path (`model.layers.N.self_attn`), each linear through the plan;
    /// `rotates`: RoPE applies.
    pub(crate) fn load(
        c: &LlamaConfig,
        (kind, rotates): (LayerAttention, bool),
        vb: VarBuilder,
        plan: &AdapterPlan,
    ) -> Result<Self> {
        let (h, q_out) = (c.hidden_size, c.num_attention_heads * c.head_dim);
        let kv_out = c.num_key_value_heads * c.head_dim;
        let widths = match c.qk_norm {
            QkNorm::None => None,
            QkNorm::PerHead => Some((c.head_dim, c.head_dim)),
            QkNorm::Whole => Some((q_out, kv_out)),
        };
        let (q_norm, k_norm) = match widths {
            Some((q, k)) => (
                Some(RmsNorm::load(c, q, vb.pp("q_norm"))?),
                Some(RmsNorm::load(c, k, vb.pp("k_norm"))?),
            ),
            None => (None, None),
        };
        Ok(Self {
            qkv: QkvProjection::load(c, &vb, plan)?,
            o_proj: linear_b(q_out, h, c.o_bias, vb.pp("o_proj"), plan)?,
            q_norm,
            k_norm,
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            scale: c.multipliers.attention_scale(c.head_dim),
            kind,
            rotates,
            dropout: c.attention_dropout,
            softcap: c.attn_logit_softcapping,
            qk_norm: c.qk_norm,
            clip_qkv: c.clip_qkv,
            sinks: match c.attention_sinks {
                true => Some(Sinks::load(c.num_attention_heads, &vb)?),
                false => None,
            },
        })
    }

    /// Queries `(b, heads, t, head_dim)` and keys and values `(b, kv_heads, t, head_dim)`
    /// of `x` `(b, t, hidden)`, queries and keys rotated for their positions (unless the
    /// layer is NoPE).
    pub(crate) fn project(
        &self,
        x: &Tensor,
        rope: &RopeTables,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let (mut q, mut k, v) = self.qkv.forward(x)?;
        let normalize = |norm: &Option<RmsNorm>, t_: Tensor| match norm {
            Some(norm) => norm.forward(&t_),
            None => Ok(t_),
        };
        let whole = self.qk_norm == QkNorm::Whole;
        if whole {
            q = normalize(&self.q_norm, q)?;
            k = normalize(&self.k_norm, k)?;
        }
        // OLMoE's clamp, after its (whole) q/k norms.
        let (q, k, v) = match self.clip_qkv {
            Some(c) => (q.clamp(-c, c)?, k.clamp(-c, c)?, v.clamp(-c, c)?),
            None => (q, k, v),
        };
        let heads =
            |t_: Tensor, n: usize| -> Result<Tensor> { Ok(t_.reshape((b, t, n, self.head_dim))?) };
        let mut q = heads(q, self.n_heads)?;
        let mut k = heads(k, self.n_kv_heads)?;
        let v = heads(v, self.n_kv_heads)?;
        if !whole {
            q = normalize(&self.q_norm, q)?;
            k = normalize(&self.k_norm, k)?;
        }
        let (q, k) = if self.rotates {
            (rope.apply_heads(&q)?, rope.apply_heads(&k)?)
        } else {
            (
                q.transpose(1, 2)?.contiguous()?,
                k.transpose(1, 2)?.contiguous()?,
            )
        };
        Ok((q, k, v.transpose(1, 2)?.contiguous()?))
    }

    /// Attention of `q` over `k`, `v` (`(b, kv_heads, kv_len, head_dim)`) under this
    /// layer's mask from `masks`, then `o_proj`: `(b, t, hidden)`. Each key/value head
    /// serves `heads / kv_heads` consecutive query heads (transformers' `repeat_kv`),
    /// without copying keys and values. Scores and softmax in f32 for f16 / bf16 models
    /// (transformers' eager attention; gpt-oss's takes the softmax with its sinks in the
    /// model's dtype, so a bf16 gpt-oss rounds less here than there), products in the
    /// model's dtype. On f32 CPU tensors, left-padded or not, one fused op with its own
    /// backward (`models::attention_op`) computes the same (Gemma 2's soft-capped scores
    /// and gpt-oss's sinks too), reading a KV cache's buffers in place. `train`: the config's `attention_dropout` applies to the probabilities.
    pub(crate) fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        masks: &Masks,
        train: bool,
    ) -> Result<Tensor> {
        let p = if train { self.dropout } else { 0.0 };
        let mask = masks.get(self.kind)?;
        if attention_op::supports(q, k, v) {
            let (window, pads) = (mask.window(), mask.pads());
            let dropout = Dropout::new(p as f32);
            let scores = attention_op::ScoreScale {
                scale: self.scale,
                softcap: self.softcap,
                sinks: self.sinks.as_ref().map(|s| s.host.clone()),
            };
            let out = attention_op::causal_attention(q, k, v, scores, window, pads, dropout)?;
            return Ok(self.o_proj.forward(&out)?);
        }
        let additive = mask.additive()?;
        let sinks = self.sinks.as_ref().map(|s| &s.tensor);
        let (scale, softcap) = (self.scale, self.softcap);
        let out = fused::composed_attention(q, k, v, scale, additive, p, softcap, sinks)?;
        Ok(self.o_proj.forward(&out)?)
    }

    /// [`Attention::project`], the new keys and values appended (along the positions) to
    /// `past` as `how` says, then [`Attention::attend`] over all of them (`train` as
    /// there): the output and the grown cache entry.
    pub(crate) fn forward_cached(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        masks: &Masks,
        past: Option<&LayerKv>,
        how: Appending,
        train: bool,
    ) -> Result<(Tensor, LayerKv)> {
        let (q, k, v) = self.project(x, rope)?;
        let all = LayerKv::append(past, &k, &v, how)?;
        let out = self.attend(&q, &all.keys, &all.values, masks, train)?;
        Ok((out, all.entry))
    }
}

/// A layer's feed-forward block: a dense gated MLP, or a sparse mixture of experts.
#[derive(Clone, Debug)]
pub(crate) enum FeedForward {
    Dense(Mlp),
    Sparse(SparseMoe),
}

impl FeedForward {
    /// Loads the layer's block at `vb`'s path (`model.layers.N`): `mlp`, or the sparse
    /// block when `sparse` (`mlp`; Mixtral's `block_sparse_moe`).
    fn load(c: &LlamaConfig, sparse: bool, vb: &VarBuilder, plan: &AdapterPlan) -> Result<Self> {
        match c.moe.as_ref().filter(|_| sparse) {
            Some(moe) => match moe.clamped_swiglu {
                Some(swiglu) => Ok(Self::Sparse(gpt_oss_moe::load(c, moe, swiglu, vb, plan)?)),
                None => Ok(Self::Sparse(SparseMoe::load(c, moe, vb, plan)?)),
            },
            None if c.dense_mlp_adaptable() => Ok(Self::Dense(Mlp::load(c, vb.pp("mlp"), plan)?)),
            None => Ok(Self::Dense(Mlp::load_frozen(c, vb.pp("mlp"), plan)?)),
        }
    }

    /// The block on `x`; `train`: training mode (Mixtral's router jitter).
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Self::Dense(mlp) => mlp.forward(x),
            Self::Sparse(moe) => moe.forward(x, train),
        }
    }
}

/// One decoder layer: attention and the MLP, each with a residual (each branch times
/// Granite's `residual_multiplier` when it is not 1), normalized where the config's
/// [`NormPlacement`] says: before each branch (Llama), before and after (Gemma 2 and 3:
/// `post_attention_layernorm` after attention, `pre_feedforward_layernorm` before the MLP
/// and `post_feedforward_layernorm` after it), or after only (OLMo 2 and 3).
#[derive(Clone, Debug)]
pub(crate) struct DecoderLayer {
    /// The attention's input norm (none in OLMo 2 and 3).
    input_layernorm: Option<RmsNorm>,
    self_attn: Attention,
    /// The MLP's input norm (`post_attention_layernorm`; Gemma 3's
    /// `pre_feedforward_layernorm`; none in OLMo 2 and 3).
    mlp_norm: Option<RmsNorm>,
    mlp: FeedForward,
    /// The norm of the attention's output (Gemma 2's and 3's, OLMo's
    /// `post_attention_layernorm`).
    attention_output_norm: Option<RmsNorm>,
    /// The norm of the MLP's output (`post_feedforward_layernorm`).
    mlp_output_norm: Option<RmsNorm>,
    residual_multiplier: f64,
    /// Phi-3's `resid_pdrop`: dropout on each branch's output in training mode.
    residual_dropout: f64,
}

impl DecoderLayer {
    /// Loads one layer, with attention pattern `kind`, RoPE or not (`rotates`) and a
    /// sparse mixture of experts or not (`sparse`), at `vb`'s path (`model.layers.N`).
    pub(crate) fn load(
        c: &LlamaConfig,
        (kind, rotates, sparse): (LayerAttention, bool, bool),
        vb: VarBuilder,
        plan: &AdapterPlan,
    ) -> Result<Self> {
        let norm = |name: &str| RmsNorm::load(c, c.hidden_size, vb.pp(name)).map(Some);
        // (input, MLP input, attention output, MLP output) norms.
        let (input_layernorm, mlp_norm, attention_output_norm, mlp_output_norm) =
            match c.norm_placement {
                NormPlacement::Pre => (
                    norm("input_layernorm")?,
                    norm("post_attention_layernorm")?,
                    None,
                    None,
                ),
                NormPlacement::Sandwich => (
                    norm("input_layernorm")?,
                    norm("pre_feedforward_layernorm")?,
                    norm("post_attention_layernorm")?,
                    norm("post_feedforward_layernorm")?,
                ),
                NormPlacement::Post => (
                    None,
                    None,
                    norm("post_attention_layernorm")?,
                    norm("post_feedforward_layernorm")?,
                ),
            };
        Ok(Self {
            input_layernorm,
            self_attn: Attention::load(c, (kind, rotates), vb.pp("self_attn"), plan)?,
            mlp_norm,
            mlp: FeedForward::load(c, sparse, &vb, plan)?,
            attention_output_norm,
            mlp_output_norm,
            residual_multiplier: c.multipliers.residual_multiplier,
            residual_dropout: c.residual_dropout,
        })
    }

    /// The attention pattern of this layer.
    pub(crate) fn kind(&self) -> LayerAttention {
        self.self_attn.kind
    }

    /// `x + branch · residual_multiplier`.
    fn add_residual(&self, x: &Tensor, branch: Tensor) -> Result<Tensor> {
        let branch = if self.residual_multiplier == 1.0 {
            branch
        } else {
            (branch * self.residual_multiplier)?
        };
        Ok((x + branch)?)
    }

    /// The layer on new positions after the cached keys and values `past` (`None`: the
    /// sequence starts here), appended as `how` says: the output and this layer's grown
    /// cache entry. `train`: the attention dropout applies.
    pub(crate) fn forward_cached(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        masks: &Masks,
        past: Option<&LayerKv>,
        how: Appending,
        train: bool,
    ) -> Result<(Tensor, LayerKv)> {
        let normed = |norm: &Option<RmsNorm>, t_: &Tensor| match norm {
            Some(norm) => norm.forward(t_),
            None => Ok(t_.clone()),
        };
        let attention_input = normed(&self.input_layernorm, x)?;
        let (attn, kv) =
            self.self_attn
                .forward_cached(&attention_input, rope, masks, past, how, train)?;
        // Phi-3's `resid_pdrop` drops each branch's output in training mode.
        let dropped = |branch: Tensor| dropout_t(branch, self.residual_dropout, train);
        let attn = dropped(normed(&self.attention_output_norm, &attn)?)?;
        let x = self.add_residual(x, attn)?;
        let mlp = self.mlp.forward(&normed(&self.mlp_norm, &x)?, train)?;
        let mlp = dropped(normed(&self.mlp_output_norm, &mlp)?)?;
        Ok((self.add_residual(&x, mlp)?, kv))
    }
}
