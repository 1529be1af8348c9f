//! [`AdapterRecipe`]: which variant to train where, with which settings — the one value
//! that builds the plan a model is loaded with, the PEFT config the adapter is saved
//! with, and the variant's training rule.

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde_json::json;

use crate::adapter::Variant;
use crate::error::{Error, Result};
use crate::model::{AdapterPlan, ParameterTargets};
use crate::peft::PeftConfig;
use crate::train::{DeltaLoraUpdate, LoraDropConfig, RankAllocatorConfig};
use crate::variants::{AdaLoraConfig, LoraConfig, VeraConfig, VeraShared};

/// A fresh adapter to train: the variant, its rank and alpha, the modules it targets
/// (PEFT's `target_modules`: suffixes such as `q_proj`, or `all-linear`), and each
/// variant's own settings (ignored by the other variants).
///
/// The defaults are PEFT's and the papers': LoRA+ ratio 16; VeRA's `r` is the shared
/// pair's rank (PEFT's default 256); Delta-LoRA λ = 0.5 from step K = 0; LoRA-FA projects
/// B's gradient; AdaLoRA prunes to `adalora_target_r` between 10% and 80% of the run;
/// LoRA-drop trains stage 1 on a 10% sample for `lora_drop.stage1_steps` steps.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// use lorakit::finetune::AdapterRecipe;
/// use lorakit::models::llama::{LlamaConfig, LlamaForCausalLM};
/// use lorakit::Variant;
/// # fn main() -> lorakit::Result<()> {
/// let dir = "tests/fixtures/models/llama/mistral/base";
/// let dev = Device::Cpu;
/// let config = LlamaConfig::from_file(format!("{dir}/config.json"))?;
/// let recipe = AdapterRecipe::new(Variant::Vera, 16, 0.0, &["q_proj", "v_proj"]);
/// let adapter_vars = VarMap::new();
/// let vb = VarBuilder::from_varmap(&adapter_vars, DType::F32, &dev);
/// // VeRA's shared pair must cover every targeted layer: pass the model's linear shapes.
/// let plan = recipe.plan(vb, &config.linear_shapes(), DType::F32, &dev)?;
/// let model = LlamaForCausalLM::from_pretrained(dir, DType::F32, &dev, &plan)?;
/// let adapters = plan.finish()?;
/// assert_eq!(adapters.len(), 4); // 2 layers × q_proj, v_proj
/// assert_eq!(recipe.peft_config(100)?.variant(), Variant::Vera);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct AdapterRecipe {
    /// The variant.
    pub variant: Variant,
    /// The rank (AdaLoRA: the initial rank; VeRA: the shared pair's rank).
    pub r: usize,
    /// LoRA's alpha (unused by VeRA).
    pub alpha: f64,
    /// PEFT's `target_modules`: module-name suffixes, or the single entry `all-linear`.
    pub target_modules: Vec<String>,
    /// PEFT's `target_parameters` (LoRA and LoRA+ only): a mixture of experts' stacked
    /// parameters to adapt, by suffix of `module.parameter` (gpt-oss's
    /// `experts.gate_up_proj`, `experts.down_proj`, `router.weight`; Mixtral's, Qwen3-MoE's
    /// and OLMoE's are also reached through `target_modules`, as PEFT converts them).
    /// Empty by default.
    pub target_parameters: Vec<String>,
    /// Modules trained in full instead of adapted (PEFT's `modules_to_save`): a new
    /// classifier head, `["classifier"]` for BERT (PEFT adds it for `task_type`
    /// `SEQ_CLS`). Empty by default.
    pub modules_to_save: Vec<String>,
    /// Dropout on the adapter's input.
    pub dropout: f64,
    /// rsLoRA scaling (`alpha / √r`) for the LoRA family.
    pub use_rslora: bool,
    /// Seed of the fresh factors (and of VeRA's shared pair).
    pub seed: u64,
    /// LoRA+: B's learning rate over A's.
    pub lora_plus_ratio: f64,
    /// LoRA-FA: project B's gradient as the paper's optimizer does.
    pub lora_fa_projection: bool,
    /// Delta-LoRA: λ and the step K after which W moves.
    pub delta_lora: DeltaLoraUpdate,
    /// AdaLoRA: the average rank to prune to.
    pub adalora_target_r: usize,
    /// LoRA-drop: stage 1 and the layer selection.
    pub lora_drop: LoraDropConfig,
}

impl AdapterRecipe {
    /// A recipe with the defaults for everything but the variant, rank, alpha and targets.
    pub fn new(variant: Variant, r: usize, alpha: f64, target_modules: &[&str]) -> Self {
        Self {
            variant,
            r,
            alpha,
            target_modules: target_modules.iter().map(|s| s.to_string()).collect(),
            target_parameters: Vec::new(),
            modules_to_save: Vec::new(),
            dropout: 0.0,
            use_rslora: false,
            seed: 0,
            lora_plus_ratio: 16.0,
            lora_fa_projection: true,
            delta_lora: DeltaLoraUpdate::new(0.5, 0),
            adalora_target_r: (r / 2).max(1),
            lora_drop: LoraDropConfig::default(),
        }
    }

    /// The PEFT config the trained adapter is saved with (LoRA+, LoRA-FA, LoRA-drop and
    /// Delta-LoRA save as LoRA, DoRA as LoRA with `use_dora`); `total_steps` is AdaLoRA's
    /// `total_step`. Errors on settings PEFT refuses (no target at all, a bad rank,
    /// `target_parameters` for a variant other than LoRA and LoRA+).
    pub fn peft_config(&self, total_steps: usize) -> Result<PeftConfig> {
        if self.target_modules.is_empty() && self.target_parameters.is_empty() {
            return Err(Error::settings(
                "adapter recipe",
                "target_modules",
                "is empty: name the modules to adapt (e.g. q_proj, v_proj) or all-linear",
            ));
        }
        let lora = matches!(self.variant, Variant::Lora | Variant::LoraPlus);
        if !self.target_parameters.is_empty() && !lora {
            return Err(Error::settings(
                "adapter recipe",
                "target_parameters",
                format!(
                    "is {:?}: only LoRA and LoRA+ adapt parameters (PEFT's LoRA), not {}",
                    self.target_parameters, self.variant
                ),
            ));
        }
        let names: Vec<&str> = self.target_modules.iter().map(String::as_str).collect();
        let mut config = PeftConfig::new(self.variant, self.r, self.alpha, &names);
        if names == ["all-linear"] {
            config = config.with_setting("target_modules", json!("all-linear"))?;
        }
        if !self.target_parameters.is_empty() {
            config = config.with_setting("target_parameters", json!(self.target_parameters))?;
        }
        let dropout_key = match self.variant {
            Variant::Vera => "vera_dropout",
            _ => "lora_dropout",
        };
        config = config.with_setting(dropout_key, json!(self.dropout))?;
        if !self.modules_to_save.is_empty() {
            config = config.with_setting("modules_to_save", json!(self.modules_to_save))?;
        }
        match self.variant {
            Variant::Vera => {
                config = config.with_setting("projection_prng_key", json!(self.seed))?;
            }
            Variant::AdaLora => {
                let c = self.allocator(total_steps);
                for (key, value) in [
                    ("total_step", json!(c.total_step)),
                    ("target_r", json!(c.target_r)),
                    ("tinit", json!(c.tinit)),
                    ("tfinal", json!(c.tfinal)),
                    ("deltaT", json!(c.delta_t)),
                    ("beta1", json!(c.beta1)),
                    ("beta2", json!(c.beta2)),
                    ("orth_reg_weight", json!(c.orth_reg_weight)),
                ] {
                    config = config.with_setting(key, value)?;
                }
            }
            _ => {
                if self.use_rslora {
                    config = config.with_setting("use_rslora", json!(true))?;
                }
            }
        }
        Ok(config)
    }

    /// AdaLoRA's allocator settings for a run of `total_steps`: pruning from 10% of the
    /// run to 80%, re-allocating every step, PEFT's betas and orthogonality weight.
    pub fn allocator(&self, total_steps: usize) -> RankAllocatorConfig {
        RankAllocatorConfig {
            target_r: self.adalora_target_r,
            tinit: total_steps / 10,
            tfinal: total_steps / 5,
            delta_t: 1,
            ..RankAllocatorConfig::new(total_steps)
        }
    }

    /// The plan that gives every target a fresh layer of this recipe's variant, its
    /// variables created through `adapter_vb`. `linear_shapes` lists the model's
    /// `(d_in, d_out)` linear shapes (e.g. [`LlamaConfig::linear_shapes`](crate::models::llama::LlamaConfig::linear_shapes)):
    /// VeRA's shared pair is sized to cover them; the other variants ignore it. `dtype`
    /// and `device` are the shared pair's.
    pub fn plan(
        &self,
        adapter_vb: VarBuilder<'static>,
        linear_shapes: &[(usize, usize)],
        dtype: DType,
        device: &Device,
    ) -> Result<AdapterPlan> {
        // The PEFT config parses the targets and ranks exactly as a saved file would be.
        let peft = self.peft_config(1)?;
        let (targets, ranks) = (peft.targets.clone(), peft.ranks.clone());
        let lora = LoraConfig {
            dropout: self.dropout,
            use_rslora: self.use_rslora,
            seed: self.seed,
            ..LoraConfig::new(self.r, self.alpha)
        };
        Ok(match self.variant {
            Variant::Lora | Variant::LoraPlus => {
                let parameters =
                    ParameterTargets::new(self.target_parameters.clone(), lora.clone());
                AdapterPlan::lora(targets, ranks, lora, adapter_vb)
                    .with_parameter_targets(parameters)
            }
            Variant::LoraFa => AdapterPlan::lora_fa(targets, ranks, lora, adapter_vb),
            Variant::LoraDrop => AdapterPlan::lora_drop(targets, ranks, lora, adapter_vb),
            Variant::DeltaLora => AdapterPlan::delta_lora(targets, ranks, lora, adapter_vb),
            Variant::Dora => AdapterPlan::dora(targets, ranks, lora, adapter_vb),
            Variant::AdaLora => {
                let config = AdaLoraConfig {
                    dropout: self.dropout,
                    seed: self.seed,
                    ..AdaLoraConfig::new(self.r, self.alpha)
                };
                AdapterPlan::adalora(targets, ranks, config, adapter_vb)
            }
            Variant::Vera => {
                let shapes = linear_shapes.iter().copied();
                let shared = VeraShared::covering(self.r, self.seed, shapes, dtype, device)?;
                let config = VeraConfig {
                    dropout: self.dropout,
                    ..VeraConfig::new(shared)
                };
                AdapterPlan::vera(targets, config, adapter_vb)
            }
        })
    }

    /// A one-line description (variant, rank, alpha, targets) that a resumed run must match.
    pub fn describe(&self) -> String {
        let mut text = format!(
            "{} r={} alpha={} targets=[{}] seed={}",
            self.variant,
            self.r,
            self.alpha,
            self.target_modules.join(", "),
            self.seed
        );
        if !self.modules_to_save.is_empty() {
            text += &format!(" modules_to_save=[{}]", self.modules_to_save.join(", "));
        }
        if !self.target_parameters.is_empty() {
            let names = self.target_parameters.join(", ");
            text += &format!(" target_parameters=[{names}]");
        }
        text
    }
}
