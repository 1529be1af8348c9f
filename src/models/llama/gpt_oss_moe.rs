//! gpt-oss's sparse block (transformers 5.25's `GptOssMLP`): a biased router
//! (`mlp.router`) whose softmax over the chosen experts' logits weights them, and experts
//! stored as stacked parameters (`mlp.experts.gate_up_proj` `(E, hidden, 2I)`,
//! `….down_proj` `(E, I, hidden)`, each with a bias `(E, ·)`), each a clamped SwiGLU
//! ([`ClampedSwiGlu`]) over interleaved gate and up columns. It runs as a [`SparseMoe`]
//! whose experts are [`ClampedExpert`]s.
//!
//! The stacks are `(in, out)` per expert (transformers' `is_transposed`); each expert's
//! slice is transposed once at load into a [`FrozenLinear`] `(out, in)` with its bias, so
//! an expert runs through the fused kernel, with a LoRA on the stacked parameter (PEFT's
//! `target_parameters`, which PEFT does not transpose for gpt-oss: `lora_A` `(r · E,
//! hidden)`, `lora_B` `(2I, r · E)` for `gate_up_proj`) when the plan has one. The
//! `gate_up_proj` layer keeps the interleaved column order, so its LoRA's rows are PEFT's.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::error::{Error, Result};
use crate::frozen::FrozenLinear;
use crate::model::{AdapterPlan, StackedParameter};

use super::clamped_expert::ClampedExpert;
use super::config::LlamaConfig;
use super::moe::{ClampedSwiGlu, MoeConfig};
use super::sparse_moe::{expert_linear, lora_part, router_linear, Expert, Scoring, SparseMoe};

/// Loads the sparse block at `layer`'s path (`model.layers.N`): `mlp.router` and
/// `mlp.experts`, with the plan's LoRAs on `experts.gate_up_proj`, `experts.down_proj` and
/// `router.weight` (fresh, or a loaded adapter's).
pub(super) fn load(
    c: &LlamaConfig,
    moe: &MoeConfig,
    swiglu: ClampedSwiGlu,
    layer: &VarBuilder,
    plan: &AdapterPlan,
) -> Result<SparseMoe> {
    let (h, width, e) = (c.hidden_size, moe.expert_intermediate_size, moe.num_experts);
    let block = format!("{}.mlp", layer.prefix());
    let (experts_module, router_module) = (format!("{block}.experts"), format!("{block}.router"));
    let vb = layer.pp("mlp");
    // PEFT 0.21 converts no module names into parameters on gpt-oss: none to convert from.
    let expert_params = [
        StackedParameter::new("gate_up_proj", "gate_up_proj", e, (2 * width, h), &vb),
        StackedParameter::new("down_proj", "down_proj", e, (h, width), &vb),
    ];
    let loras = plan.stacked_loras(&experts_module, &expert_params)?;
    if e == 1 && loras.iter().any(Option::is_some) {
        // PEFT's ParamWrapper treats a one-expert stack as a plain linear and adds `B·A`
        // untransposed to the `(1, in, out)` stack: not the model's LoRA.
        return Err(Error::Unsupported {
            what: "LoRA on the experts of a gpt-oss with one expert (num_local_experts 1)",
            got: format!("target_parameters on `{experts_module}`"),
            supported: "two or more experts (PEFT adds a one-expert stack's change \
                        untransposed)"
                .to_string(),
        });
    }
    let lora_of = |i, e| lora_part(&loras, i, e, 0);
    let experts_vb = vb.pp("experts");
    let gate_up = experts_vb.get((e, h, 2 * width), "gate_up_proj")?;
    let gate_up_bias = experts_vb.get((e, 2 * width), "gate_up_proj_bias")?;
    let down = experts_vb.get((e, width, h), "down_proj")?;
    let down_bias = experts_vb.get((e, h), "down_proj_bias")?;
    // Expert `e`'s `(in, out)` slice of a stack as a layer `(out, in)` with its bias.
    let layer_of = |stack: &Tensor, bias: &Tensor, e: usize| -> Result<FrozenLinear> {
        let weight = stack.get(e)?.t()?.contiguous()?;
        FrozenLinear::new(weight, Some(bias.get(e)?.contiguous()?))
    };
    let experts = (0..e)
        .map(|i| {
            let path = |name: &str| format!("{experts_module}.{i}.{name}");
            let gate_up = layer_of(&gate_up, &gate_up_bias, i)?;
            let down = layer_of(&down, &down_bias, i)?;
            Ok(Expert::Clamped(ClampedExpert::new(
                expert_linear(plan, &path("gate_up_proj"), gate_up, lora_of(0, i))?,
                expert_linear(plan, &path("down_proj"), down, lora_of(1, i))?,
                swiglu,
            )))
        })
        .collect::<Result<Vec<_>>>()?;
    let router_param = StackedParameter::new("weight", "router.weight", 1, (e, h), &vb);
    let router_vb = vb.pp("router");
    let router = FrozenLinear::new(
        router_vb.get((e, h), "weight")?,
        Some(router_vb.get(e, "bias")?),
    )?;
    let router_path = (router_module.as_str(), router_module.clone());
    let router = router_linear(plan, router_path, router_param, router)?;
    Ok(SparseMoe {
        router,
        experts,
        top_k: moe.experts_per_token,
        scoring: Scoring::TopKSoftmax,
        jitter: 0.0,
        shared: None,
    })
}
