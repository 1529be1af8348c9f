//! The input projections of a Llama-family layer: separate (`q_proj`, `k_proj`, `v_proj`;
//! `gate_proj`, `up_proj`) or fused as Phi-3 stores them (`qkv_proj`, `gate_up_proj`),
//! each built through the plan under the checkpoint's own name, so PEFT's targets apply.

use candle_core::{Module, Tensor, D};
use candle_nn::VarBuilder;

use crate::error::Result;
use crate::model::{linear_b, AdapterPlan, Linear};

use super::config::LlamaConfig;

/// The attention's queries, keys and values of `x`, each `(.., width)`.
#[derive(Clone, Debug)]
pub(crate) enum QkvProjection {
    /// `q_proj`, `k_proj`, `v_proj`.
    Separate { q: Linear, k: Linear, v: Linear },
    /// `qkv_proj`, whose output is the queries (`q_out` wide), then the keys and the
    /// values (`kv_out` each).
    Fused {
        qkv: Linear,
        q_out: usize,
        kv_out: usize,
    },
}

impl QkvProjection {
    /// Loads the projections at `vb`'s path (`model.layers.N.self_attn`).
    pub(crate) fn load(c: &LlamaConfig, vb: &VarBuilder, plan: &AdapterPlan) -> Result<Self> {
        let (h, bias) = (c.hidden_size, c.qkv_bias);
        let q_out = c.num_attention_heads * c.head_dim;
        let kv_out = c.num_key_value_heads * c.head_dim;
        Ok(if c.fused_projections {
            Self::Fused {
                qkv: linear_b(h, q_out + 2 * kv_out, bias, vb.pp("qkv_proj"), plan)?,
                q_out,
                kv_out,
            }
        } else {
            Self::Separate {
                q: linear_b(h, q_out, bias, vb.pp("q_proj"), plan)?,
                k: linear_b(h, kv_out, bias, vb.pp("k_proj"), plan)?,
                v: linear_b(h, kv_out, bias, vb.pp("v_proj"), plan)?,
            }
        })
    }

    /// `(queries, keys, values)` of `x` `(.., hidden)`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        match self {
            Self::Separate { q, k, v } => Ok((q.forward(x)?, k.forward(x)?, v.forward(x)?)),
            Self::Fused { qkv, q_out, kv_out } => {
                let all = qkv.forward(x)?;
                Ok((
                    all.narrow(D::Minus1, 0, *q_out)?,
                    all.narrow(D::Minus1, *q_out, *kv_out)?,
                    all.narrow(D::Minus1, q_out + kv_out, *kv_out)?,
                ))
            }
        }
    }
}

/// The gated MLP's gate and up branches of `x`, each `(.., intermediate_size)`.
#[derive(Clone, Debug)]
pub(crate) enum GateUpProjection {
    /// `gate_proj`, `up_proj`.
    Separate { gate: Linear, up: Linear },
    /// `gate_up_proj`, whose output is the gate, then the up branch (`width` each).
    Fused { gate_up: Linear, width: usize },
}

impl GateUpProjection {
    /// Loads the projections, `i` wide, at `vb`'s path (`model.layers.N.mlp`).
    pub(crate) fn load(
        c: &LlamaConfig,
        i: usize,
        vb: &VarBuilder,
        plan: &AdapterPlan,
    ) -> Result<Self> {
        let (h, bias) = (c.hidden_size, c.mlp_bias);
        Ok(if c.fused_projections {
            Self::Fused {
                gate_up: linear_b(h, 2 * i, bias, vb.pp("gate_up_proj"), plan)?,
                width: i,
            }
        } else {
            Self::Separate {
                gate: linear_b(h, i, bias, vb.pp("gate_proj"), plan)?,
                up: linear_b(h, i, bias, vb.pp("up_proj"), plan)?,
            }
        })
    }

    /// `(gate, up)` of `x` `(.., hidden)`, each contiguous.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        match self {
            Self::Separate { gate, up } => Ok((gate.forward(x)?, up.forward(x)?)),
            Self::Fused { gate_up, width } => {
                let both = gate_up.forward(x)?;
                Ok((
                    both.narrow(D::Minus1, 0, *width)?.contiguous()?,
                    both.narrow(D::Minus1, *width, *width)?.contiguous()?,
                ))
            }
        }
    }
}
