//! [`PeftConfig::with_parameter_loras`]: the config that describes the LoRAs on stacked
//! parameters a model trains, as PEFT saves it.

use serde_json::{json, Map, Value};

use crate::adapter::Variant;
use crate::error::{Error, Result};
use crate::model::AdaptedSet;
use crate::peft::config::PeftConfig;

impl PeftConfig {
    /// This config naming the LoRAs on stacked parameters (a mixture of experts' experts
    /// and router) that `set` trains, as PEFT 0.21 saves them: each one's entry in
    /// `target_parameters` (`gate_up_proj`, `down_proj`, `gate.weight`), and its rank and
    /// alpha as `rank_pattern` / `alpha_pattern` entries (`.*\.gate_up_proj`) where the
    /// config's own rules give others (PEFT's doubled rank of a fused pair). Unchanged when
    /// `set` has none; an error for a config other than LoRA's.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use lorakit::models::llama::LlamaForCausalLM;
    /// use lorakit::peft::PeftConfig;
    /// use lorakit::LoraConfig;
    /// # fn main() -> lorakit::Result<()> {
    /// let config = PeftConfig::lora(4, 8.0, &["q_proj", "w1", "w3"]);
    /// let vars = VarMap::new();
    /// let plan = config.fresh_plan(VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu), &LoraConfig::default())?;
    /// let dir = "tests/fixtures/models/llama/mixtral/base";
    /// let _model = LlamaForCausalLM::from_pretrained(dir, DType::F32, &Device::Cpu, &plan)?;
    /// let set = plan.finish()?;
    /// // PEFT turns Mixtral's `w1` and `w3` into the experts' `gate_up_proj`, rank 2r.
    /// let saved = config.with_parameter_loras(&set)?;
    /// assert_eq!(saved.target_parameters, ["gate_up_proj"]);
    /// assert_eq!(saved.raw["rank_pattern"][r".*\.gate_up_proj"], 8);
    /// assert_eq!(saved.raw["alpha_pattern"][r".*\.gate_up_proj"], 16);
    /// # Ok(()) }
    /// ```
    pub fn with_parameter_loras(&self, set: &AdaptedSet) -> Result<Self> {
        let stacked = set.stacked_loras();
        let Some(first) = stacked.first() else {
            return Ok(self.clone());
        };
        if self.variant() != Variant::Lora {
            return Err(Error::layer_config(
                first.key(),
                "peft_type",
                format!(
                    "LoRAs on parameters save with a LoRA config, not {}",
                    self.describe()
                ),
            ));
        }
        let mut names = self.target_parameters.clone();
        let object = |field: &str| match self.raw.get(field) {
            Some(Value::Object(o)) => o.clone(),
            _ => Map::new(),
        };
        let (mut rank_pattern, mut alpha_pattern) =
            (object("rank_pattern"), object("alpha_pattern"));
        for lora in &stacked {
            if !self.targets_parameter(lora.key()) && !names.iter().any(|n| n == lora.entry()) {
                names.push(lora.entry().to_string());
            }
            let settings = self.ranks.for_module(lora.key());
            let pattern = format!(r".*\.{}", regex::escape(lora.entry()));
            if settings.r != lora.rank() {
                rank_pattern.insert(pattern.clone(), json!(lora.rank()));
            }
            if settings.alpha != lora.alpha() {
                alpha_pattern.insert(pattern, json_number(lora.alpha()));
            }
        }
        let mut config = self.with_setting("target_parameters", json!(names))?;
        for (field, pattern) in [
            ("rank_pattern", rank_pattern),
            ("alpha_pattern", alpha_pattern),
        ] {
            if !pattern.is_empty() {
                config = config.with_setting(field, Value::Object(pattern))?;
            }
        }
        Ok(config)
    }
}

/// `x` as JSON, an integer when it is one (PEFT writes a doubled integer alpha as one).
fn json_number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}
