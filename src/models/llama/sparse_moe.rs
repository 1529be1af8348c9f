//! [`SparseMoe`]: a sparse mixture-of-experts MLP (Mixtral's, Qwen2-MoE's, Qwen3-MoE's,
//! OLMoE's; gpt-oss's, loaded by `super::gpt_oss_moe`), as transformers 5.25 runs it: the
//! router's softmax in f32 (gpt-oss: the softmax of the chosen logits, in the model's
//! dtype), the top `k` experts per token, each expert a gated SiLU MLP (gpt-oss: a
//! clamped SwiGLU, `super::clamped_expert`) run on its tokens only, their outputs weighted
//! and summed.
//!
//! The experts' rows are gathered once (`index_select`) in expert order and their weighted
//! outputs scattered back in one `index_add`, so a gradient flows through the experts and
//! the routing weights to the layer's input (the chosen experts themselves are a discrete
//! choice, made on the host from the probabilities).

use std::sync::Arc;

use candle_core::{DType, Module, Tensor, D};
use candle_nn::VarBuilder;

use crate::checkpoint::stacked_params::{StackedRows, EXPERT_NAMES};
use crate::error::Result;
use crate::frozen::FrozenLinear;
use crate::model::{linear_b, AdapterPlan, Linear, StackedLora, StackedParameter};
use crate::models::ops::{sigmoid, softmax_last};

use super::clamped_expert::ClampedExpert;
use super::config::LlamaConfig;
use super::family::LlamaFamily;
use super::mlp::Mlp;
use super::moe::MoeConfig;
use super::projections::GateUpProjection;
use super::routing::Routing;

/// Qwen2-MoE's shared expert: an MLP every token goes through, scaled by
/// `sigmoid(shared_expert_gate(x))`.
#[derive(Clone, Debug)]
pub(super) struct SharedExpert {
    mlp: Mlp,
    gate: Linear,
}

/// How a router's logits weight the chosen experts.
#[derive(Clone, Copy, Debug)]
pub(super) enum Scoring {
    /// The softmax of all the logits (in f32), the top `k` chosen and their probabilities
    /// the weights (Mixtral, Qwen, OLMoE).
    Softmax {
        /// The chosen probabilities divided by their sum.
        normalize_top_k: bool,
        /// Whether the experts' outputs are multiplied by the routing weights in f32 (f64
        /// for an f64 model) and then cast, as Mixtral does; Qwen casts the weights to the
        /// model's dtype first.
        weights_in_f32: bool,
    },
    /// The top `k` logits chosen and the softmax of those `k` (in the model's dtype) the
    /// weights (gpt-oss's `GptOssTopKRouter`).
    TopKSoftmax,
}

/// One expert: a gated MLP, or gpt-oss's clamped SwiGLU expert.
#[derive(Clone, Debug)]
pub(super) enum Expert {
    Gated(Mlp),
    Clamped(ClampedExpert),
}

impl Expert {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Gated(mlp) => mlp.forward(x),
            Self::Clamped(expert) => expert.forward(x),
        }
    }
}

/// One sparse layer's router, experts and (Qwen2-MoE) shared expert.
#[derive(Clone, Debug)]
pub(crate) struct SparseMoe {
    /// `gate` (gpt-oss: `router`): `(num_experts, hidden)`, frozen.
    pub(super) router: Linear,
    pub(super) experts: Vec<Expert>,
    pub(super) top_k: usize,
    pub(super) scoring: Scoring,
    pub(super) jitter: f64,
    pub(super) shared: Option<SharedExpert>,
}

/// The checkpoint's names of a family's experts: the block (`block_sparse_moe` for
/// Mixtral, whose `w1`, `w3`, `w2` are the gate, up and down projections; `mlp` for Qwen).
fn expert_names(family: LlamaFamily) -> (&'static str, [&'static str; 3]) {
    let [mixtral, others] = EXPERT_NAMES;
    match family {
        LlamaFamily::Mixtral => mixtral,
        _ => others,
    }
}

impl SparseMoe {
    /// The path of a sparse layer's block under the layer's path (`model.layers.N`).
    pub(crate) fn block_name(family: LlamaFamily) -> &'static str {
        expert_names(family).0
    }

    /// Loads the router (`gate`), the experts (`experts.E.…`) and the shared expert of the
    /// layer at `layer`'s path (`model.layers.N`; the block is its `mlp`, Mixtral's
    /// `block_sparse_moe`). A loaded adapter's LoRAs on the router's and the experts'
    /// parameters (PEFT's `target_parameters`, named at transformers 5's
    /// `model.layers.N.mlp.gate.weight`, `….mlp.experts.gate_up_proj` and `…down_proj`),
    /// and a fresh LoRA plan's ([`AdapterPlan::stacked_loras`]), run through each expert's
    /// layers.
    pub(crate) fn load(
        c: &LlamaConfig,
        moe: &MoeConfig,
        layer: &VarBuilder,
        plan: &AdapterPlan,
    ) -> Result<Self> {
        let h = c.hidden_size;
        let vb = layer.pp(Self::block_name(c.family));
        let width = moe.expert_intermediate_size;
        let adapter_block = format!("{}.mlp", layer.prefix());
        let (experts_module, router_module) = (
            format!("{adapter_block}.experts"),
            format!("{adapter_block}.gate"),
        );
        let (_, [gate, up, down]) = expert_names(c.family);
        // The transformers 4 modules PEFT's conversion of `target_modules` maps to each
        // parameter, on the models it converts.
        let converted = |parent: &str, names: &[&str]| -> Vec<String> {
            match c.peft_all_linear_adds_parameters() {
                true => names.iter().map(|n| format!("{parent}.{n}")).collect(),
                false => Vec::new(),
            }
        };
        let e = moe.num_experts;
        let expert_params = [
            StackedParameter {
                converted_from: converted(&experts_module, &[gate, up]),
                parts: vec![StackedRows::Gate, StackedRows::Up],
                ..StackedParameter::new("gate_up_proj", "gate_up_proj", e, (2 * width, h), &vb)
            },
            StackedParameter {
                converted_from: converted(&experts_module, &[down]),
                ..StackedParameter::new("down_proj", "down_proj", e, (h, width), &vb)
            },
        ];
        let router_param = StackedParameter {
            converted_from: converted(&adapter_block, &["gate"]),
            ..StackedParameter::new("weight", "gate.weight", 1, (e, h), &vb)
        };
        let loras = plan.stacked_loras(&experts_module, &expert_params)?;
        let lora_of = |i, e, part| lora_part(&loras, i, e, part);
        let experts = (0..e)
            .map(|e| {
                let vb = vb.pp(format!("experts.{e}"));
                let gate_up = GateUpProjection::Separate {
                    gate: stored_expert_linear(plan, (h, width), vb.pp(gate), lora_of(0, e, 0))?,
                    up: stored_expert_linear(plan, (h, width), vb.pp(up), lora_of(0, e, 1))?,
                };
                let down = stored_expert_linear(plan, (width, h), vb.pp(down), lora_of(1, e, 0))?;
                Ok(Expert::Gated(Mlp::new(gate_up, down, c.hidden_act)))
            })
            .collect::<Result<Vec<_>>>()?;
        let router_base = FrozenLinear::new(vb.pp("gate").get((e, h), "weight")?, None)?;
        let router_path = (router_module.as_str(), vb.pp("gate").prefix());
        let router = router_linear(plan, router_path, router_param, router_base)?;
        let shared = match moe.shared_expert_intermediate_size {
            Some(width) => Some(SharedExpert {
                mlp: Mlp::load_sized(c, width, vb.pp("shared_expert"), plan)?,
                gate: linear_b(h, 1, false, vb.pp("shared_expert_gate"), plan)?,
            }),
            None => None,
        };
        Ok(Self {
            router,
            experts,
            top_k: moe.experts_per_token,
            scoring: Scoring::Softmax {
                normalize_top_k: moe.normalize_top_k,
                weights_in_f32: c.family == LlamaFamily::Mixtral,
            },
            jitter: moe.router_jitter_noise,
            shared,
        })
    }

    /// The block on `x` `(.., hidden)`; `train`: Mixtral's router jitter applies.
    pub(crate) fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let hidden = x.dim(D::Minus1)?;
        let x = if train && self.jitter > 0.0 {
            let (lo, hi) = ((1.0 - self.jitter) as f32, (1.0 + self.jitter) as f32);
            let noise = Tensor::rand(lo, hi, x.shape(), x.device())?.to_dtype(x.dtype())?;
            (x * noise)?
        } else {
            x.clone()
        };
        let flat = x.reshape(((), hidden))?;
        let routed = self.routed(&flat)?;
        let out = match &self.shared {
            Some(shared) => {
                let scale = sigmoid(&shared.gate.forward(&flat)?)?;
                let shared_out = shared.mlp.forward(&flat)?.broadcast_mul(&scale)?;
                (routed + shared_out)?
            }
            None => routed,
        };
        Ok(out.reshape(dims)?)
    }

    /// The experts' weighted sum for the tokens `flat` `(n, hidden)`.
    fn routed(&self, flat: &Tensor) -> Result<Tensor> {
        let n = flat.dim(0)?;
        if n == 0 {
            return Ok(flat.zeros_like()?);
        }
        let num_experts = self.experts.len();
        let logits = self.router.forward(flat)?;
        let scores = match self.scoring {
            // In f32 as transformers computes it (f64 models: f64).
            Scoring::Softmax { .. } => {
                let routing_dtype = match flat.dtype() {
                    DType::F64 => DType::F64,
                    _ => DType::F32,
                };
                softmax_last(&logits.to_dtype(routing_dtype)?)?
            }
            // The logits rank the experts as their softmax would.
            Scoring::TopKSoftmax => logits,
        };
        let host = scores
            .detach()
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let routing = Routing::top_k(&host, num_experts, self.top_k);
        let dev = flat.device();
        let chosen = Tensor::from_vec(routing.chosen, (n, self.top_k), dev)?;
        let chosen_scores = scores.gather(&chosen, 1)?;
        let weights = match self.scoring {
            Scoring::Softmax {
                normalize_top_k,
                weights_in_f32,
            } => {
                let weights = match normalize_top_k {
                    true => chosen_scores.broadcast_div(&chosen_scores.sum_keepdim(1)?)?,
                    false => chosen_scores,
                };
                match weights_in_f32 {
                    true => weights,
                    false => weights.to_dtype(flat.dtype())?,
                }
            }
            Scoring::TopKSoftmax => softmax_last(&chosen_scores)?,
        };
        let rows = routing.tokens.len();
        let tokens = Tensor::from_vec(routing.tokens, rows, dev)?;
        let slots = Tensor::from_vec(routing.slots, rows, dev)?;
        let row_weights = weights.flatten_all()?.index_select(&slots, 0)?;
        // Each expert gathers its rows from the tokens itself: the backward of a gather is
        // token-sized, where slicing one gathered block would give each expert a gradient
        // the size of all the rows (`narrow`'s backward pads it).
        let mut outputs = Vec::new();
        let mut start = 0;
        for (expert, &count) in self.experts.iter().zip(&routing.counts) {
            if count > 0 {
                let inputs = flat.index_select(&tokens.narrow(0, start, count)?, 0)?;
                outputs.push(expert.forward(&inputs)?);
                start += count;
            }
        }
        let outputs = Tensor::cat(&outputs, 0)?;
        let weighted = outputs
            .to_dtype(row_weights.dtype())?
            .broadcast_mul(&row_weights.unsqueeze(1)?)?
            .to_dtype(flat.dtype())?;
        Ok(flat.zeros_like()?.index_add(&tokens, &weighted, 0)?)
    }
}

/// Expert `e`'s `part` of the LoRA on the `i`-th of a block's stacked parameters
/// (`loras`, as [`AdapterPlan::stacked_loras`] gives them), if it has one.
pub(super) fn lora_part(
    loras: &[Option<Arc<StackedLora>>],
    i: usize,
    e: usize,
    part: usize,
) -> Option<(&StackedLora, usize, usize)> {
    let lora = loras.get(i).and_then(Option::as_ref)?;
    Some((&**lora, e, part))
}

/// A block's router `base` with the plan's LoRA on its `param` (`weight`) if it has one:
/// `(module, path)` are its module path in transformers 5 (where a LoRA sits) and its path
/// in the checkpoint (which the plan's quantization reads).
pub(super) fn router_linear(
    plan: &AdapterPlan,
    (module, path): (&str, String),
    param: StackedParameter,
    base: FrozenLinear,
) -> Result<Linear> {
    let loras = plan.stacked_loras(module, &[param])?;
    expert_linear(plan, &path, base, lora_part(&loras, 0, 0, 0))
}

/// The `d_in → d_out` layer of the weight at `vb` ([`expert_linear`]).
fn stored_expert_linear(
    plan: &AdapterPlan,
    (d_in, d_out): (usize, usize),
    vb: VarBuilder,
    lora: Option<(&StackedLora, usize, usize)>,
) -> Result<Linear> {
    let base = FrozenLinear::new(vb.get((d_out, d_in), "weight")?, None)?;
    expert_linear(plan, &vb.prefix(), base, lora)
}

/// The layer of `base` (at `path`, which the plan's quantization reads): frozen, or expert
/// `e`'s `part` of a LoRA on its stacked parameter (`lora`: the LoRA, `e`, `part`).
pub(super) fn expert_linear(
    plan: &AdapterPlan,
    path: &str,
    base: FrozenLinear,
    lora: Option<(&StackedLora, usize, usize)>,
) -> Result<Linear> {
    match lora {
        Some((lora, e, part)) => Ok(Linear::Adapted(lora.expert_layer(
            e,
            part,
            plan.quantized_base(path, base)?,
        )?)),
        None => plan.frozen_linear(path, base),
    }
}
