//! [`Mlp`]: the gated MLP of a Llama-family layer (and of a mixture-of-experts model's
//! experts and shared expert).

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::error::Result;
use crate::frozen::FrozenLinear;
use crate::model::{linear_b, AdapterPlan, Linear};
use crate::models::fused;

use super::activation::GateActivation;
use super::config::LlamaConfig;
use super::projections::GateUpProjection;

/// The gated MLP: `down_proj(act(gate_proj(x)) ⊙ up_proj(x))`, `act` SiLU (Gemma: GELU's
/// tanh approximation) (Phi-3: `gate_proj` and `up_proj` as one `gate_up_proj`).
#[derive(Clone, Debug)]
pub(crate) struct Mlp {
    gate_up: GateUpProjection,
    down_proj: Linear,
    act: GateActivation,
}

impl Mlp {
    /// The MLP of these projections.
    pub(crate) fn new(gate_up: GateUpProjection, down_proj: Linear, act: GateActivation) -> Self {
        Self {
            gate_up,
            down_proj,
            act,
        }
    }

    /// Loads `gate_proj`, `up_proj` (or `gate_up_proj`), `down_proj` at `vb`'s path
    /// through the plan, `intermediate_size` wide.
    pub(crate) fn load(c: &LlamaConfig, vb: VarBuilder, plan: &AdapterPlan) -> Result<Self> {
        Self::load_sized(c, c.intermediate_size, vb, plan)
    }

    /// [`Mlp::load`] `i` wide (Qwen2-MoE's shared expert).
    pub(crate) fn load_sized(
        c: &LlamaConfig,
        i: usize,
        vb: VarBuilder,
        plan: &AdapterPlan,
    ) -> Result<Self> {
        let (h, bias) = (c.hidden_size, c.mlp_bias);
        Ok(Self {
            gate_up: GateUpProjection::load(c, i, &vb, plan)?,
            down_proj: linear_b(i, h, bias, vb.pp("down_proj"), plan)?,
            act: c.hidden_act,
        })
    }

    /// [`Mlp::load`] with frozen projections that no adapter targets (Qwen3-MoE's dense
    /// layers: see [`LlamaConfig::dense_mlp_adaptable`]).
    pub(crate) fn load_frozen(c: &LlamaConfig, vb: VarBuilder, plan: &AdapterPlan) -> Result<Self> {
        let (h, i, bias) = (c.hidden_size, c.intermediate_size, c.mlp_bias);
        let frozen = |d_in: usize, d_out: usize, name: &str| -> Result<Linear> {
            let vb = vb.pp(name);
            let base = FrozenLinear::from_var_builder(d_in, d_out, bias, vb.clone())?;
            plan.frozen_linear(&vb.prefix(), base)
        };
        let gate_up = GateUpProjection::Separate {
            gate: frozen(h, i, "gate_proj")?,
            up: frozen(h, i, "up_proj")?,
        };
        Ok(Self::new(gate_up, frozen(i, h, "down_proj")?, c.hidden_act))
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (gate, up) = self.gate_up.forward(x)?;
        let gated = match self.act {
            GateActivation::Silu => fused::silu_mul(&gate, &up)?,
            GateActivation::GeluTanh => (fused::gelu_tanh(&gate)? * up)?,
        };
        Ok(self.down_proj.forward(&gated)?)
    }
}
