//! [`MoeConfig`]: the mixture-of-experts settings of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and
//! gpt-oss, read from `config.json` as transformers 5.25 reads them.

use std::path::Path;

use serde::Deserialize;

use super::family::LlamaFamily;
use crate::error::{Error, Result};

/// A sparse mixture-of-experts MLP's settings (transformers' `MixtralSparseMoeBlock`,
/// `Qwen2MoeSparseMoeBlock`, `Qwen3MoeSparseMoeBlock`, `OlmoeSparseMoeBlock`; gpt-oss's
/// `GptOssMLP`, whose router and experts differ: [`ClampedSwiGlu`]).
///
/// Each sparse layer's router (`gate`, `num_experts × hidden_size`) scores every token;
/// the softmax of the scores (in f32) gives each expert a probability, the
/// `experts_per_token` most probable experts run on the token (a gated SiLU MLP each,
/// `expert_intermediate_size` wide), and their outputs are summed weighted by those
/// probabilities (renormalized to sum to 1 over the chosen experts when
/// `normalize_top_k`). Qwen2-MoE adds a shared expert that every token goes through,
/// scaled by `sigmoid(shared_expert_gate(x))`.
///
/// The router and the experts are frozen and not module targets: transformers 5 holds
/// them as parameters, not linear modules. A loaded PEFT LoRA on them (`target_parameters`
/// `experts.gate_up_proj`, `experts.down_proj`, `gate.weight` (gpt-oss: `router.weight`),
/// which PEFT 0.21's `all-linear` adds for Mixtral, Qwen3-MoE and OLMoE) runs with each
/// expert a LoRA layer ([`crate::model::StackedLora::from_loaded`]). A fresh LoRA plan
/// trains LoRAs on them where PEFT's LoRA would ([`crate::model::ParameterTargets`]: its
/// `all-linear` on Mixtral, Qwen3-MoE and OLMoE; a config's `target_parameters` on any of
/// them), each expert running as a LoRA layer
/// ([`crate::model::StackedLora`]); other variants adapt the linear modules only
/// (attention, the shared expert and its gate, the dense layers' MLPs but Qwen3-MoE's:
/// [`LlamaConfig::dense_mlp_adaptable`](super::LlamaConfig::dense_mlp_adaptable)).
/// `lorakit merge` writes them into the checkpoint's per-expert tensors (gpt-oss's stacks,
/// stored whole, whole) ([`crate::checkpoint::stacked_params`]).
///
/// ```
/// use lorakit::models::llama::LlamaConfig;
/// # fn main() -> lorakit::Result<()> {
/// let config = LlamaConfig::from_json(r#"{"model_type": "qwen3_moe", "vocab_size": 64,
///     "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
///     "num_hidden_layers": 4, "num_attention_heads": 4, "num_experts": 8,
///     "num_experts_per_tok": 2, "mlp_only_layers": [0], "decoder_sparse_step": 1}"#)?;
/// let moe = config.moe.as_ref().unwrap();
/// assert_eq!((moe.num_experts, moe.experts_per_token, moe.expert_intermediate_size), (8, 2, 16));
/// assert_eq!(moe.sparse_layers, [false, true, true, true]);
/// assert!(!moe.normalize_top_k); // Qwen3MoeConfig's default
///
/// let err = LlamaConfig::from_json(r#"{"model_type": "mixtral", "vocab_size": 64,
///     "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
///     "num_attention_heads": 4, "num_local_experts": 4, "num_experts_per_tok": 5}"#)
///     .unwrap_err()
///     .to_string();
/// assert!(err.contains("num_experts_per_tok"), "{err}");
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    /// Experts per sparse layer (`num_experts`, or its alias `num_local_experts` but for
    /// Qwen2-MoE).
    pub num_experts: usize,
    /// Experts each token goes through (`num_experts_per_tok`).
    pub experts_per_token: usize,
    /// Width of one expert's MLP (`moe_intermediate_size`; Mixtral, OLMoE, gpt-oss:
    /// `intermediate_size`).
    pub expert_intermediate_size: usize,
    /// Whether the chosen experts' probabilities are divided by their sum (`norm_topk_prob`;
    /// Mixtral always; unused by gpt-oss, whose weights are a softmax over the chosen
    /// experts).
    pub normalize_top_k: bool,
    /// Whether each layer's MLP is sparse (`num_hidden_layers` entries; the others are
    /// dense MLPs `intermediate_size` wide): Mixtral's all are; Qwen's are unless listed in
    /// `mlp_only_layers` or off the `decoder_sparse_step`.
    pub sparse_layers: Vec<bool>,
    /// Qwen2-MoE's shared expert's width (`shared_expert_intermediate_size`); `None` for
    /// the families without one.
    pub shared_expert_intermediate_size: Option<usize>,
    /// Mixtral's `router_jitter_noise`: in training mode each sparse layer's input is
    /// multiplied by noise uniform in `[1 − j, 1 + j]` (0: none).
    pub router_jitter_noise: f64,
    /// `router_aux_loss_coef` when `output_router_logits` is true: transformers then adds the
    /// router's load-balancing loss, times this, to the language-modelling loss. lorakit does
    /// not compute that loss, so its losses refuse such a config (the logits are the same).
    pub router_aux_loss_coef: Option<f64>,
    /// gpt-oss's experts and router ([`ClampedSwiGlu`]); `None` for the gated-SiLU experts
    /// of the other families.
    pub clamped_swiglu: Option<ClampedSwiGlu>,
}

/// gpt-oss's experts (transformers' `GptOssExperts`, `GptOssTopKRouter`): each expert's
/// `gate_up_proj` (biased) gives interleaved gate and up columns (gate at the even ones),
/// and its output is `down_proj((up + 1) · g · sigmoid(alpha · g))` (biased) with
/// `g = min(gate, limit)` and `up` clamped to `[−limit, limit]`. The router (biased) picks
/// the `experts_per_token` largest logits and weights the chosen experts by the softmax of
/// those logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClampedSwiGlu {
    /// `swiglu_limit` (7 by default).
    pub limit: f64,
    /// `swiglu_alpha` (1.702 by default).
    pub alpha: f64,
}

/// The mixture-of-experts keys of `config.json`, as written.
#[derive(Deserialize, Default)]
pub(super) struct MoeKeys {
    num_local_experts: Option<usize>,
    num_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    shared_expert_intermediate_size: Option<usize>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
    router_jitter_noise: Option<f64>,
    output_router_logits: Option<bool>,
    router_aux_loss_coef: Option<f64>,
    swiglu_limit: Option<f64>,
    swiglu_alpha: Option<f64>,
}

impl MoeKeys {
    /// The settings of a `family` model with `layers` layers and MLP width
    /// `intermediate_size`, transformers' class defaults filling absent keys; errors name
    /// `file`.
    pub(super) fn resolve(
        &self,
        family: LlamaFamily,
        layers: usize,
        intermediate_size: usize,
        file: &Path,
    ) -> Result<MoeConfig> {
        let invalid = |field: &'static str, reason: String| Error::file_config(file, field, reason);
        let mixtral = family == LlamaFamily::Mixtral;
        let gpt_oss = family == LlamaFamily::GptOss;
        let qwen2 = family == LlamaFamily::Qwen2Moe;
        let (experts, per_token, width, shared) = match family {
            LlamaFamily::Mixtral => (
                self.num_local_experts.or(self.num_experts).unwrap_or(8),
                self.num_experts_per_tok.unwrap_or(2),
                intermediate_size,
                None,
            ),
            LlamaFamily::Qwen2Moe => (
                self.num_experts.unwrap_or(60),
                self.num_experts_per_tok.unwrap_or(4),
                self.moe_intermediate_size.unwrap_or(1408),
                Some(self.shared_expert_intermediate_size.unwrap_or(5632)),
            ),
            // GptOssConfig's experts are `intermediate_size` wide; its attribute map reads
            // `num_experts` as `num_local_experts`, and a file's `num_experts` wins.
            LlamaFamily::GptOss => (
                self.num_experts.or(self.num_local_experts).unwrap_or(128),
                self.num_experts_per_tok.unwrap_or(4),
                intermediate_size,
                None,
            ),
            // OlmoeConfig maps `num_local_experts` to `num_experts`; its experts are
            // `intermediate_size` wide.
            LlamaFamily::Olmoe => (
                self.num_experts.or(self.num_local_experts).unwrap_or(64),
                self.num_experts_per_tok.unwrap_or(8),
                intermediate_size,
                None,
            ),
            // Qwen3MoeConfig maps `num_experts` to `num_local_experts` (what 5.25 writes).
            _ => (
                self.num_local_experts.or(self.num_experts).unwrap_or(128),
                self.num_experts_per_tok.unwrap_or(8),
                self.moe_intermediate_size.unwrap_or(768),
                None,
            ),
        };
        let experts_key = if mixtral || (!qwen2 && self.num_experts.is_none()) {
            "num_local_experts"
        } else {
            "num_experts"
        };
        if experts == 0 {
            // Qwen's configs allow 0 experts (every MLP dense); not a checkpoint that exists.
            return Err(invalid(
                experts_key,
                "must be at least 1, got 0".to_string(),
            ));
        }
        if per_token == 0 || per_token > experts {
            return Err(invalid(
                "num_experts_per_tok",
                format!("must be in 1..={experts} ({experts_key}), got {per_token}"),
            ));
        }
        if width == 0 || shared == Some(0) {
            // Mixtral's and OLMoE's experts are `intermediate_size` wide.
            let width_key = if mixtral || gpt_oss || family == LlamaFamily::Olmoe {
                "intermediate_size"
            } else {
                "moe_intermediate_size"
            };
            let field = if width == 0 {
                width_key
            } else {
                "shared_expert_intermediate_size"
            };
            return Err(invalid(field, "must be at least 1, got 0".to_string()));
        }
        let sparse_layers = if mixtral || gpt_oss || family == LlamaFamily::Olmoe {
            vec![true; layers]
        } else {
            let step = self.decoder_sparse_step.unwrap_or(1);
            if step == 0 {
                return Err(invalid(
                    "decoder_sparse_step",
                    "must be at least 1, got 0".to_string(),
                ));
            }
            let dense = self.mlp_only_layers.clone().unwrap_or_default();
            (0..layers)
                .map(|i| !dense.contains(&i) && (i + 1).is_multiple_of(step))
                .collect()
        };
        let jitter = if mixtral {
            self.router_jitter_noise.unwrap_or(0.0)
        } else {
            0.0
        };
        if !(jitter.is_finite() && (0.0..1.0).contains(&jitter)) {
            return Err(invalid(
                "router_jitter_noise",
                format!("must be in [0, 1), got {jitter}"),
            ));
        }
        let clamped_swiglu = match gpt_oss {
            true => Some(self.clamped_swiglu(file)?),
            false => None,
        };
        let default_coef = if family == LlamaFamily::Olmoe {
            0.01
        } else {
            0.001
        };
        Ok(MoeConfig {
            num_experts: experts,
            experts_per_token: per_token,
            expert_intermediate_size: width,
            normalize_top_k: mixtral || self.norm_topk_prob.unwrap_or(false),
            sparse_layers,
            shared_expert_intermediate_size: shared,
            router_jitter_noise: jitter,
            router_aux_loss_coef: self
                .output_router_logits
                .unwrap_or(false)
                .then(|| self.router_aux_loss_coef.unwrap_or(default_coef)),
            clamped_swiglu,
        })
    }

    /// gpt-oss's `swiglu_limit` and `swiglu_alpha` (GptOssConfig's defaults 7 and 1.702).
    fn clamped_swiglu(&self, file: &Path) -> Result<ClampedSwiGlu> {
        let limit = self.swiglu_limit.unwrap_or(7.0);
        let alpha = self.swiglu_alpha.unwrap_or(1.702);
        for (field, value) in [("swiglu_limit", limit), ("swiglu_alpha", alpha)] {
            if !(value.is_finite() && value > 0.0) {
                let reason = format!("must be a positive number, got {value}");
                return Err(Error::file_config(file, field, reason));
            }
        }
        Ok(ClampedSwiGlu { limit, alpha })
    }
}

impl MoeConfig {
    /// Whether layer `i`'s MLP is sparse.
    pub(crate) fn is_sparse(&self, i: usize) -> bool {
        self.sparse_layers.get(i).copied().unwrap_or(false)
    }

    /// The error a loss gives for a config whose transformers loss adds the router's
    /// load-balancing term ([`MoeConfig::router_aux_loss_coef`]).
    pub(crate) fn check_loss(&self) -> Result<()> {
        match self.router_aux_loss_coef {
            None => Ok(()),
            Some(coef) => Err(Error::Unsupported {
                what: "output_router_logits (the router's load-balancing loss)",
                got: format!("true (router_aux_loss_coef {coef})"),
                supported: "output_router_logits false, as the released Mixtral, Qwen MoE, \
                            OLMoE and gpt-oss configs have it: set it to false in config.json \
                            to train without that term"
                    .to_string(),
            }),
        }
    }
}
